"""A compiled graph's C++ kernels are built as one library (`wavepass/cpp_bundle.py`).

The bundled kernels are Inductor's own, so they must give the same results as Inductor's
per-kernel builds; a kernel the bundle cannot take, and every kernel of a bundle whose build
fails, is built Inductor's way; a warm start builds nothing.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

import pytest
import torch
from torch._inductor.codecache import CppPythonBindingsCodeCache, PyCodeCache
from torch._inductor.compile_fx import compile_fx

from wavepass import CacheOptions, cpp_bundle
from wavepass.pipeline import compile_graph
from wavepass.cpp_bundle import BundleCodeCache, Kernel, bundle_source, bundled_cpp_kernels

# An Inductor-style kernel: one `extern "C"` entry named `kernel`, tensors by pointer, a size.
SCALE = """
#include <torch/csrc/inductor/cpp_prefix.h>
extern "C"  void  kernel(const float* in_ptr0, float* out_ptr0, const int64_t ks0)
{
    for (int64_t i = 0; i < ks0; ++i) out_ptr0[i] = in_ptr0[i] * %s;
}
"""
ARGTYPES = ["const float*", "float*", "const int64_t"]


def fused(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Several kernels: pointwise, a reduction, a softmax; sizes passed as ints when dynamic."""
    a = (x.sin() * y + 1).relu()
    b = a.softmax(-1) @ y.T
    return b.tanh() + a.sum(-1, keepdim=True), (x - y).abs().amax(0)


def bundled_backend(gm, example_inputs):
    with bundled_cpp_kernels():
        return compile_fx(gm, example_inputs)


def kernels_of(modules: list) -> list[object]:
    """The callables bound in these loaded Inductor modules."""
    return [v for module in modules for v in vars(module).values() if callable(v)]


@pytest.fixture
def builds(monkeypatch):
    """Count bundle builds and Inductor's own per-kernel builds (both still run)."""
    counts = {"bundles": 0, "per_kernel": 0}

    def counted(key, function):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(cpp_bundle, "_build_chunk", counted("bundles", cpp_bundle._build_chunk))
    monkeypatch.setattr(CppPythonBindingsCodeCache, "load_pybinding_async",
                        counted("per_kernel", CppPythonBindingsCodeCache.load_pybinding_async))
    return counts


@pytest.mark.parametrize("dynamic", [False, True])
def test_bundled_kernels_equal_inductors_own_builds(dynamic, builds):
    x, y = torch.randn(6, 16), torch.randn(6, 16)
    reference = torch.compile(fused, backend="inductor", dynamic=dynamic)(x, y)
    assert builds == {"bundles": 0, "per_kernel": builds["per_kernel"]} and builds["per_kernel"] >= 2
    torch._dynamo.reset()
    builds["per_kernel"] = 0
    loaded = len(PyCodeCache.modules)
    bundled = torch.compile(fused, backend=bundled_backend, dynamic=dynamic)
    got = bundled(x, y)
    assert builds == {"bundles": 1, "per_kernel": 0}
    for out, ref in zip(got, reference):
        assert torch.equal(out, ref)
    # the first call put the built kernels in place of the recorded ones
    ours = PyCodeCache.modules[loaded:]
    assert ours and not [k for k in kernels_of(ours) if isinstance(k, Kernel)]
    x2, y2 = torch.randn(9, 16), torch.randn(9, 16)
    for out, ref in zip(bundled(x2, y2), fused(x2, y2)):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_bundle_source_builds_one_method_per_kernel():
    module = BundleCodeCache.load(bundle_source([Kernel(ARGTYPES, SCALE % "2.0f"), Kernel(ARGTYPES, SCALE % "-3.0f")]))
    x = torch.arange(5, dtype=torch.float32)
    doubled, tripled = torch.zeros(5), torch.zeros(5)
    module.kernel_0(x, doubled, 5)
    module.kernel_1(x, tripled, 3)
    assert torch.equal(doubled, 2 * x)
    assert torch.equal(tripled, torch.tensor([0.0, -3.0, -6.0, 0.0, 0.0]))
    with pytest.raises(RuntimeError, match="takes 3 arguments"):
        module.kernel_0(x, doubled)


@pytest.mark.parametrize("bundle", [True, False])
def test_the_option_decides(bundle, builds):
    options = CacheOptions(bundle_kernels=bundle)
    x, y = torch.randn(7, 16), torch.randn(7, 16)
    got = torch.compile(fused, backend=lambda gm, inputs: compile_graph(gm, inputs, options))(x, y)
    assert (builds["bundles"] > 0, builds["per_kernel"] > 0) == (bundle, not bundle)
    for out, ref in zip(got, fused(x, y)):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_small_graphs_are_built_together_when_the_batch_ends(builds):
    """Inside `batched_builds`, graphs with few kernels (the head and tail pieces) wait and
    are built as one bundle when the batch ends: one compiler run instead of one per graph."""
    x, y = torch.randn(7, 16), torch.randn(7, 16)

    def other(x):
        return ((x.cos() * 2).softmax(-1),)

    with cpp_bundle.batched_builds():
        with bundled_cpp_kernels():
            compiled_fused = compile_fx(torch.fx.symbolic_trace(fused), [x, y])
            compiled_other = compile_fx(torch.fx.symbolic_trace(other), [x])
        cpp_bundle.wait_for_builds()
        assert builds["bundles"] == 0
    cpp_bundle.wait_for_builds()
    assert builds["bundles"] == 1 and builds["per_kernel"] == 0
    for out, ref in zip(compiled_fused(x, y), fused(x, y)):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled_other(x), other(x), atol=1e-5, rtol=1e-5)


def test_a_kernel_called_before_wait_is_built_alone():
    x, out = torch.arange(4, dtype=torch.float32), torch.zeros(4)
    Kernel(ARGTYPES, SCALE % "5.0f")(x, out, 4)
    assert torch.equal(out, 5 * x)


@pytest.mark.parametrize("argtypes, source", [
    (["const bool", "float*"], SCALE),  # a type Inductor's binding does not parse
    (ARGTYPES, SCALE + '\nextern "C" void helper() {}\n'),  # two C entries
    (ARGTYPES, SCALE.replace("kernel(", "entry(")),  # no entry named `kernel`
    (ARGTYPES, "#define WIDTH 4\n" + SCALE),  # a macro would reach the kernels after it
])
def test_what_the_bundle_cannot_take_is_left_to_inductor(argtypes, source):
    assert not cpp_bundle._bundleable(argtypes, source)
    assert cpp_bundle._bundleable(ARGTYPES, SCALE)


def test_a_failed_bundle_build_falls_back_to_per_kernel_builds(monkeypatch, caplog):
    """Simulated compiler failure (the real compiler does not fail on Inductor's kernels)."""
    def broken(source, **flags):
        raise RuntimeError("simulated compiler crash")

    monkeypatch.setattr(BundleCodeCache, "load", broken)
    monkeypatch.setattr(cpp_bundle, "_failures", set())
    x, y = torch.randn(5, 16), torch.randn(5, 16)
    with caplog.at_level(logging.WARNING, logger="wavepass"):
        got = torch.compile(fused, backend=bundled_backend)(x, y)
    for out, ref in zip(got, fused(x, y)):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    warnings = [r for r in caplog.records if "one library failed" in r.getMessage()]
    assert len(warnings) == 1 and "simulated compiler crash" in warnings[0].getMessage()


@pytest.mark.skipif(not cpp_bundle._has_gold(), reason="GNU gold is not installed")
@pytest.mark.parametrize("linker_works", [True, False])
def test_bundles_link_with_gold_and_fall_back_to_the_default_linker(monkeypatch, tmp_path, linker_works):
    """Where gold is installed a bundle is linked with it; where that link fails (here the
    real compiler finds a broken `ld.gold` first on its `COMPILER_PATH`), the bundle is built
    again with the compiler's default linker, and later bundles go straight to it."""
    loads: list[tuple] = []
    load = BundleCodeCache.load

    def recorded(source, **flags):
        loads.append(tuple(flags.get("extra_flags", ())))
        return load(source, **flags)

    monkeypatch.setattr(BundleCodeCache, "load", recorded)
    monkeypatch.setattr(cpp_bundle, "_failures", set())
    if not linker_works:
        broken = tmp_path / "ld.gold"
        broken.write_text("#!/bin/sh\necho 'simulated broken gold' >&2\nexit 1\n")
        broken.chmod(0o755)
        monkeypatch.setenv("COMPILER_PATH", str(tmp_path))
    x = torch.arange(4, dtype=torch.float32)
    for factor in (7.0, -2.0) if linker_works else (5.0, -6.0):  # sources not built before
        module = cpp_bundle._build_chunk([Kernel(ARGTYPES, SCALE % f"{factor}f")])
        out = torch.zeros(4)
        module.kernel_0(x, out, 4)
        assert torch.equal(out, x * factor)
    gold = cpp_bundle._GOLD
    assert loads == ([gold, gold] if linker_works else [gold, (), ()])


def test_the_vector_isa_is_picked_before_the_build_threads_start(monkeypatch):
    """Inductor's pick of the vector instructions (whose flags are in every library's key)
    is made in the thread that submits the builds, before any build thread runs: two build
    threads making a process's first pick at once could leave `-mavx512bf16` twice in the
    flags, and so every bundle under another key than in the process that built it."""
    events = []
    monkeypatch.setattr(cpp_bundle, "pick_vec_isa", lambda: events.append(("pick", threading.get_ident())))
    monkeypatch.setattr(cpp_bundle, "_build_chunk", lambda kernels: events.append(("build", threading.get_ident())))
    recorded = [(f"k{i}", Kernel(ARGTYPES, SCALE % f"{i}.0f"), {}) for i in range(2 * cpp_bundle._MIN_CHUNK)]
    cpp_bundle._submit(recorded)
    cpp_bundle.wait_for_builds()
    assert events[0] == ("pick", threading.get_ident())
    assert [kind for kind, _ in events[1:]] == ["build"] * len(cpp_bundle._chunks(recorded))


def test_the_bundle_source_names_wavepass_sources():
    from wavepass.block_op import source_key

    assert bundle_source([Kernel(ARGTYPES, SCALE % "2.0f")]).splitlines()[0] == f"// wavepass {source_key()}"


def test_the_bundle_is_active_only_inside_the_context():
    original = torch._inductor.async_compile.AsyncCompile.cpp_pybinding
    with bundled_cpp_kernels():
        assert torch._inductor.async_compile.AsyncCompile.cpp_pybinding is not original
        with bundled_cpp_kernels():  # nested: the outer context restores
            pass
        assert torch._inductor.async_compile.AsyncCompile.cpp_pybinding is not original
    assert torch._inductor.async_compile.AsyncCompile.cpp_pybinding is original


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="nice values are per thread on Linux only")
def test_builds_and_their_compilers_run_below_the_lowering():
    """Bundle builds run at a lower priority than the thread that lowers the next piece, and
    so does every process a build thread starts (the compiler); the main thread keeps its."""
    main = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    build_thread = cpp_bundle._builders().submit(
        lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    compiler = cpp_bundle._builders().submit(
        lambda: subprocess.run([sys.executable, "-c", "import os; print(os.getpriority(os.PRIO_PROCESS, 0))"],
                               capture_output=True, text=True, check=True).stdout)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main
    assert build_thread == min(19, main + cpp_bundle._BUILD_NICENESS) > main
    assert int(compiler.result()) == build_thread


def test_a_wavespeed_compile_leaves_inductors_async_compile_as_it_was(monkeypatch):
    """The bundle patch is active inside each `compile_fx` call it serves, and only there."""
    from test_compiled_blocks import Stack

    from wavepass import torch_api

    async_compile = torch._inductor.async_compile.AsyncCompile
    original = (async_compile.cpp_pybinding, async_compile.wait)
    patched_inside = []
    compile_fx_of_torch = torch_api.compile_fx

    def watched(*args, **kwargs):
        patched_inside.append(async_compile.cpp_pybinding is not original[0])
        return compile_fx_of_torch(*args, **kwargs)

    monkeypatch.setattr(torch_api, "compile_fx", watched)
    torch.manual_seed(0)
    model = Stack(1, [False] * 3).eval()
    inputs = (torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 4))
    compiled = torch.compile(model, backend="wavespeed", options={"residual_diff_threshold": 0.0})
    torch.testing.assert_close(compiled(*inputs), model(*inputs))
    assert patched_inside and all(patched_inside)
    assert (async_compile.cpp_pybinding, async_compile.wait) == original
    assert torch._inductor.async_compile.AsyncCompile is async_compile
