"""Every private torch API goes through `wavepass/torch_api.py`; each optional one can be missing.

For each optional feature, its APIs are made to look missing (the one lookup, `_lookup`,
raises ImportError for their paths, as on a torch without them): the feature turns itself
off with one INFO line, and the tiny FLUX still compiles and equals the eager model. Where a
core API is missing, the graph is compiled as plain Inductor after one warning that names
the torch version. `import wavepass` needs no private module at all.
"""

from __future__ import annotations

import gc
import inspect
import json
import logging
import re
import subprocess
import sys
import warnings

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.codecache import PyCodeCache
from torch._inductor.codegen.custom_extern_kernel_codegen import CUSTOM_EXTERN_KERNEL_CODEGEN

import models
import wavepass
import wavepass.backend
from wavepass import cpp_bundle, torch_api
from wavepass.block_op import BLOCKS, _registry
from wavepass.pipeline import plain_fallback
from wavepass.options import CacheOptions

BLOCKS_CODEGEN_KEY = f"torch.ops.{BLOCKS.namespace}.{BLOCKS.__name__}"  # block_op's entry




@pytest.fixture(autouse=True)
def no_live_block_graphs():
    """Block graphs an earlier test compiled die with its programs: each test compiles its own."""
    gc.collect()


@pytest.fixture(scope="module")
def flux():
    return models.flux()


def call(case: models.Case, model):
    return model(**case.call_kwargs(case.inputs["hidden_states"], torch.tensor([0.5])))[0]


def compile_and_compare(case: models.Case) -> None:
    """The tiny FLUX compiled (cache on, every step computed) equals the eager model."""
    compiled = torch.compile(case.model, backend="wavespeed", options={"residual_diff_threshold": 0.0})
    torch.testing.assert_close(call(case, compiled), call(case, case.model), atol=1e-4, rtol=1e-4)
    assert wavepass.stats(case.model).calls == 1  # the cached program ran


def off_lines(caplog, feature: str) -> list[str]:
    what = torch_api.FEATURES[feature].what
    return [r.getMessage() for r in caplog.records if r.name == "wavepass" and what in r.getMessage()]


def test_the_tested_torch_has_every_api_and_the_table_lists_them():
    doc = torch_api.__doc__
    for name in torch_api.APIS:
        assert name.split(".")[0] in doc, f"{name} is not in torch_api's table"
        torch_api.api(name)  # the tested torch has them all
    for feature in torch_api.FEATURES.values():
        assert set(feature.apis) <= set(torch_api.APIS)
        assert feature.check is None or feature.check() is None
    assert set(torch_api.CORE) <= set(torch_api.APIS)
    assert torch_api.core_unavailable_reason() is None
    assert all(map(torch_api.enabled, torch_api.FEATURES))


def test_import_needs_no_private_torch_module():
    """With every private module wavepass looks up made unimportable (those `import torch`
    has not loaded itself), `import wavepass` works, the core says why it is unavailable
    (naming the torch version), and the features that need those modules are off."""
    modules = {".".join(path.split(".")[:i]) for paths in torch_api.APIS.values() for path in paths
               for i in range(2, len(path.split(".")) + 1)
               if any(p.startswith("_") or p == "experimental" for p in path.split(".")[1:i])}
    # until wavepass/__init__.py registers the backend through torch_api, it calls Dynamo's
    # registry directly, which imports every Dynamo backend: those imports come first
    direct = "from torch._dynamo import" in inspect.getsource(wavepass)
    code = (
        "import json, sys, torch\n"
        + ("import torch._dynamo; torch._dynamo.list_backends(exclude_tags=())\n" if direct else "") +
        "for name in json.loads(sys.argv[1]):\n"
        "    if name not in sys.modules:\n"
        "        sys.modules[name] = None  # its import raises ImportError\n"
        "import wavepass\n"
        "from wavepass import torch_api\n"
        "print(json.dumps([torch_api.core_unavailable_reason(), [f for f in torch_api.FEATURES if torch_api.enabled(f)]]))\n"
    )
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code, json.dumps(sorted(modules))],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    reason, enabled = json.loads(done.stdout.strip().splitlines()[-1])
    assert reason is not None and f"torch {torch.__version__} has no" in reason, reason
    assert "bundle_kernels" not in enabled and "direct_block_calls" not in enabled, enabled


@pytest.mark.parametrize("feature", sorted(torch_api.FEATURES))
def test_a_feature_without_its_api_turns_off_and_the_rest_works(feature, flux, without, caplog, monkeypatch, no_fallback):
    """The feature's APIs missing: one INFO line names them and the torch version, no other
    feature is off, no fallback warning, the program caches and equals the eager model, and
    what the feature did is not done (counted by wavepass's counters and the registry)."""
    without(*torch_api.FEATURES[feature].apis)
    bundles = []
    build_chunk = cpp_bundle._build_chunk
    monkeypatch.setattr(cpp_bundle, "_build_chunk", lambda kernels: bundles.append(kernels) or build_chunk(kernels))
    if feature == "direct_block_calls":  # as on a torch that never had the hook
        monkeypatch.delitem(CUSTOM_EXTERN_KERNEL_CODEGEN, BLOCKS_CODEGEN_KEY, raising=False)
    caplog.set_level(logging.INFO, logger="wavepass")
    compile_and_compare(flux)
    lines = off_lines(caplog, feature)
    assert len(lines) == 1 and torch.__version__ in lines[0] and "simulated" in lines[0], lines
    others = [f for f in torch_api.FEATURES if f != feature and off_lines(caplog, f)]
    assert not others, others
    assert not torch_api.enabled(feature)
    counts = (torch_api._own_counters if feature == "dynamo_counters" else counters)["wavepass"]
    assert counts["pieces"] == 3
    if feature == "dynamo_counters":
        assert not counters["wavepass"]
    if feature == "outline_blocks":
        assert counts["blocks"] == 0 and counts["whole_graphs"] == 3
    else:
        assert counts["blocks"] == 4 and counts["block_graphs"] == 2
    assert counts["python_pieces"] == (0 if feature in ("outline_blocks", "python_pieces") else 1)
    runs = {type(s.run).__name__ for s in _registry.values()}
    if feature == "bare_block_graphs":
        assert "CompiledFxGraph" not in runs
    elif feature != "outline_blocks":
        assert runs == {"CompiledFxGraph"}
    if feature == "bundle_kernels":
        assert not bundles


def test_without_the_direct_call_hook_inductor_calls_blocks_through_the_dispatcher(flux, without, monkeypatch,
                                                                                   no_fallback):
    """The code Inductor generates for `head` (which calls a block graph): through
    `torch.ops.wavepass.blocks` without the hook, `run_blocks` itself with it. Inductor's
    caches are off here, so that the code is generated."""
    def generated(case) -> str:
        loaded = len(PyCodeCache.modules)
        with torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            compile_and_compare(case)
        return "".join(open(m.__file__).read() for m in PyCodeCache.modules[loaded:])

    assert "wavepass_run_blocks(" in generated(flux)
    torch._dynamo.reset()
    without("CUSTOM_EXTERN_KERNEL_CODEGEN")
    monkeypatch.delitem(CUSTOM_EXTERN_KERNEL_CODEGEN, BLOCKS_CODEGEN_KEY)
    code = generated(flux)
    assert "wavepass_run_blocks(" not in code and "torch.ops.wavepass.blocks" in code


def test_a_torch_without_a_core_api_compiles_plainly(flux, without, caplog):
    """What the backend does where `core_unavailable_reason()` is not None: the whole graph
    through `plain_fallback`, one warning with the reason (naming the torch version), the
    graph compiled as plain Inductor (here compile_fx itself is missing: through Dynamo's
    registered "inductor" backend). The results are the eager model's."""
    without("compile_fx")
    reason = torch_api.core_unavailable_reason()
    assert reason is not None and f"torch {torch.__version__}" in reason and "compile_fx" in reason

    def backend(gm, example_inputs):
        return plain_fallback(gm, example_inputs, CacheOptions(), None, torch_api.core_unavailable_reason())

    with pytest.warns(wavepass.WavespeedWarning, match=re.escape(f"torch {torch.__version__} has no")) as record:
        compiled = torch.compile(flux.model, backend=backend)
        torch.testing.assert_close(call(flux, compiled), call(flux, flux.model), atol=1e-4, rtol=1e-4)
        call(flux, compiled)
    assert len([w for w in record if "wavespeed" in str(w.message)]) == 1


@pytest.mark.skipif("core_unavailable_reason" not in inspect.getsource(wavepass.backend),
                    reason="backend.py does not ask torch_api.core_unavailable_reason() yet (issue 22)")
def test_the_backend_falls_back_where_the_core_is_unavailable(flux, without):
    without("FakeTensor")
    compiled = torch.compile(flux.model, backend="wavespeed", options={"residual_diff_threshold": 0.0})
    with pytest.warns(wavepass.WavespeedWarning, match=re.escape(f"torch {torch.__version__} has no") + ".*FakeTensor") as record:
        for _ in range(2):
            torch.testing.assert_close(call(flux, compiled), call(flux, flux.model), atol=1e-4, rtol=1e-4)
    assert len([w for w in record if "wavespeed" in str(w.message)]) == 1
    stats = wavepass.stats(flux.model)
    assert (stats.calls, stats.hits) == (2, 0) and torch.__version__ in stats.reason


def test_registering_without_dynamos_registry_says_so_once(without, caplog):
    without("list_backends")
    caplog.set_level(logging.INFO, logger="wavepass")
    torch_api.register_backend(lambda gm, inputs: gm, name="wavespeed")
    (line,) = [r.getMessage() for r in caplog.records if "could not register" in r.getMessage()]
    assert "torch_dynamo_backends entry point" in line


def test_a_warning_at_import_under_an_error_filter_does_not_make_an_api_missing(tmp_path, monkeypatch):
    """torch modules warn at import (deprecations); under a caller's `-W error` the import
    would raise, and wavepass would take Inductor for missing and run uncached."""
    (tmp_path / "warns_at_import.py").write_text(
        "import warnings\nwarnings.warn('deprecated', DeprecationWarning)\nvalue = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch_api._lookup("warns_at_import.value") == 1
