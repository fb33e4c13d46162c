"""Build the C++ kernels of one compiled graph as one library: one compiler run per graph,
not one per kernel.

On CPU, Inductor builds every kernel of a graph as a Python extension of its own. Each build
pays the same fixed costs: starting the compiler, loading the precompiled `cpp_prefix.h`
(~0.4 s here) and linking against libtorch (~0.3 s), for a kernel whose own code takes
~0.15 s. A 24-block FLUX piece set has ~30 kernels: ~21 s of compiler time apart, ~1.5 s as
one source (measured on this project's 2-core CPU).

While `bundled_cpp_kernels()` is active (`compiler_interface.InductorAdaptor` enters it
around each `compile_fx` call it makes, and only there), `AsyncCompile.cpp_pybinding`
(which Inductor's generated module calls once per kernel as it loads) records the kernel
instead of building it, and `AsyncCompile.wait` (which the module calls after its last kernel) builds the
recorded kernels as one source per chunk, in parallel where Inductor has compile workers
(chunks of at least `_MIN_CHUNK` kernels); inside `batched_builds`, a graph with few
kernels waits to be built with the next graphs' kernels:

    #include <torch/csrc/inductor/cpp_prefix.h>       (the kernels' includes, once)
    namespace wavepass_kernel_0 { void kernel(const float* in_ptr0, ...) {...} }
    namespace wavepass_kernel_1 { void kernel(float* in_out_ptr0, ...) {...} }
    static PyObject* kernel_0_py(PyObject*, PyObject* args) {...}  (Inductor's calling
    static PyObject* kernel_1_py(PyObject*, PyObject* args) {...}   convention, per kernel)
    PyMODINIT_FUNC PyInit_wavepass_kernels() {...}

The kernel code, compiler flags and argument passing are Inductor's; only the unit of
building changes, so the generated module and Inductor's FX graph cache entries are the same
as without the bundle. The linker changes where GNU gold is installed (Linux): every bundle
links against libtorch_cpu (434 MB here), whose symbol table GNU ld reads in ~0.3 s and gold
in ~0.1 s, a fifth of a small bundle's build; where a link with gold fails, the bundle is
built again with the compiler's default linker, which the process then keeps to. Libraries
are cached on disk like Inductor's (keyed by the bundled source and the compile command), so
a warm start finds them. A kernel the bundle cannot take (not one `extern "C"` entry named
`kernel`, an argument type Inductor's binding does not parse, or a preprocessor directive
other than `#include` and `#pragma`) and every kernel of a chunk that fails to build are
built Inductor's way, one by one: the results never depend on the bundle, and the failure
is logged once. On a torch without the Inductor internals this needs (`torch_api`), the
bundle is off and Inductor builds every kernel its own way.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Any

from . import process_state, torch_api
from .block_op import source_key

# Inductor's internals the bundle patches and extends (`torch_api`, feature `bundle_kernels`).
# This module is imported only where `torch_api.enabled("bundle_kernels")`; on a torch
# without them its import raises `torch_api.Missing` (an ImportError).
AsyncCompile = torch_api.api("AsyncCompile")
CppPythonBindingsCodeCache = torch_api.api("CppPythonBindingsCodeCache")
clear_on_fresh_cache = torch_api.api("clear_on_fresh_cache")
get_compile_threads = torch_api.api("get_compile_threads")
pick_vec_isa = torch_api.api("pick_vec_isa")

log = logging.getLogger("wavepass")
_ENTRY = re.compile(r'extern "C"(?=\s+(?:\w+\s+)*?kernel\s*\()')
_SCALARS = ("int64_t", "uintptr_t", "float")  # the non-pointer types Inductor's binding parses
_MIN_CHUNK = 8  # fewer kernels than this per chunk: the fixed costs outweigh the parallelism
_MIN_BATCH = 8  # a graph with fewer kernels waits inside `batched_builds` for others' kernels
_BUILD_NICENESS = 10  # added to the builds' nice value (`_yield_to_lowering`)
_GOLD = ("-fuse-ld=gold",)
_ORIGINAL = {"cpp_pybinding": AsyncCompile.cpp_pybinding, "wait": AsyncCompile.wait}
_failures: set[str] = set()  # the build failures logged so far, and "gold" once a link with gold failed
_running: set[Future[Any]] = set()
_waiting: list[list[tuple[str, Kernel, dict[str, Any]]]] = []  # one batch per active `batched_builds`


@clear_on_fresh_cache
class BundleCodeCache(CppPythonBindingsCodeCache):
    """Inductor's cache of C++ Python extensions, for extensions with one method per kernel."""

    cache: dict[str, Any] = {}
    cache_clear = staticmethod(cache.clear)
    entry_function = "wavepass_kernels"


class Kernel:
    """A kernel recorded by `cpp_pybinding`, bound under its name in the generated module
    until its build is done. `wait` hands it to a bundle build; its first call waits for
    that build (if still running) and puts the built kernel in its place, so later calls go
    straight to the C++ code. Called before `wait` (nothing in Inductor does), it is built
    on its own."""

    def __init__(self, argtypes: list[str], source: str) -> None:
        self.argtypes, self.source = list(argtypes), source
        self._bound: tuple[Future[Any], int, dict[str, Any], str] | None = None

    def bind(self, build: Future[Any], index: int, scope: dict[str, Any], name: str) -> None:
        self._bound = (build, index, scope, name)

    def __call__(self, *args: Any) -> Any:
        if self._bound is None:
            return self._alone()(*args)
        build, index, scope, name = self._bound
        module = build.result()
        built = getattr(module, f"kernel_{index}") if module is not None else self._alone()
        if scope.get(name) is self:
            scope[name] = built
        return built(*args)

    def _alone(self) -> Any:
        """This kernel built Inductor's way, as an extension of its own."""
        return CppPythonBindingsCodeCache.load_pybinding(self.argtypes, self.source)


@contextmanager
def bundled_cpp_kernels() -> Iterator[None]:
    """Inside: every Inductor-generated module builds its C++ kernels in bundles."""
    patched = AsyncCompile.cpp_pybinding is not _ORIGINAL["cpp_pybinding"]
    if not patched:
        AsyncCompile.cpp_pybinding, AsyncCompile.wait = _record, _build_then_wait
    try:
        yield
    finally:
        if not patched:
            AsyncCompile.cpp_pybinding, AsyncCompile.wait = _ORIGINAL["cpp_pybinding"], _ORIGINAL["wait"]


@contextmanager
def batched_builds() -> Iterator[None]:
    """Inside: the kernels of a graph with fewer than `_MIN_BATCH` kernels wait for those of
    the graphs compiled after it, and are built with them in one bundle once `_MIN_BATCH`
    have gathered or the context ends. Each build pays the same fixed costs (~0.8 s of
    compiler time here); the small graphs (the head and tail pieces around the blocks) are
    lowered last, when their builds would queue behind the others anyway. The graphs are
    compiled in the same order in every process, so a warm start builds the same bundles
    and finds them on disk."""
    _waiting.append([])
    try:
        yield
    finally:
        _submit(_waiting.pop())


def _record(self: AsyncCompile, argtypes: list[str], source_code: str) -> Any:
    if not _bundleable(argtypes, source_code):
        return _ORIGINAL["cpp_pybinding"](self, argtypes, source_code)
    return Kernel(argtypes, source_code)


def _build_then_wait(self: AsyncCompile, scope: dict[str, Any]) -> None:
    """Start the bundle builds in the background and let Inductor wait for the rest: the
    builds run while the next piece is lowered, and a kernel waits for its build when first
    called."""
    recorded = [(name, value, scope) for name, value in scope.items() if isinstance(value, Kernel)]
    if _waiting and len(recorded) < _MIN_BATCH:
        batch = _waiting[-1]
        batch += recorded
        if len(batch) >= _MIN_BATCH:
            _submit(batch[:])
            batch.clear()
    else:
        _submit(recorded)
    _ORIGINAL["wait"](self, scope)


def _submit(recorded: list[tuple[str, Kernel, dict[str, Any]]]) -> None:
    """Build these kernels in the background, in chunks; each kernel waits for its chunk.
    Inductor's choice of vector instructions is settled first, here, in the calling thread
    (`_settle_vec_isa`)."""
    if recorded:
        _settle_vec_isa()
    for chunk in _chunks(recorded):
        build = _builders().submit(_build_chunk, [kernel for _, kernel, _ in chunk])
        _running.add(build)
        build.add_done_callback(_running.discard)
        for index, (name, kernel, scope) in enumerate(chunk):
            kernel.bind(build, index, scope, name)


def _settle_vec_isa() -> None:
    """Pick Inductor's vector instruction set (`pick_vec_isa`, cached per process) in this
    thread, before any build thread needs it. The pick is not thread-safe: its probe for
    AVX512-BF16 appends " -mavx512bf16" to the chosen ISA's flags while it builds a test
    library, then restores the old flags; two build threads that make the first pick of a
    process at once can leave the flag in them twice. The flags are part of every library's
    compile command, so of its on-disk key: a process whose first C++ build is two bundles at
    once (a warm start: every graph loaded from the cache, no lowering before) then looked
    for every bundle under other keys than the process that built them, and built them
    all again (issue 29). Inductor itself picks in the thread that lowers or loads a graph."""
    pick_vec_isa()


def wait_for_builds() -> None:
    """Block until every bundle build started so far is done (a kernel's first call waits
    only for its own): for a cache folder that no build still writes to."""
    wait(list(_running))


def _forget_builds() -> None:
    """After every running build is done: no build is running, no failure was logged."""
    wait_for_builds()
    _running.clear()
    _failures.clear()


process_state.owns("C++ bundle builds", _running, _forget_builds)
process_state.owns("C++ bundle failures", _failures, _forget_builds)


def _bundleable(argtypes: list[str], source: str) -> bool:
    """One C entry named `kernel`, arguments Inductor's binding parses, and no preprocessor
    directive but `#include` and `#pragma`: a macro one kernel defines would reach the
    kernels after it in the bundle."""
    types = [_parsed_type(t) for t in argtypes]
    directives = (line.lstrip() for line in source.splitlines() if line.lstrip().startswith("#"))
    return (source.count('extern "C"') == 1 and _ENTRY.search(source) is not None
            and all(t.endswith("*") or t in _SCALARS for t in types)
            and all(d.startswith(("#include", "#pragma")) for d in directives))


def _parsed_type(argtype: str) -> str:
    """The type an argument is parsed as (Inductor's binding drops `const`)."""
    return argtype.replace("const ", "").strip()


def _chunks(recorded: list[tuple[str, Kernel, dict[str, Any]]]) -> list[list[tuple[str, Kernel, dict[str, Any]]]]:
    """As many chunks as Inductor has compile workers, of at least `_MIN_CHUNK` kernels."""
    count = max(1, min(get_compile_threads(), len(recorded) // _MIN_CHUNK))
    size = max(1, -(-len(recorded) // count))
    return [recorded[i : i + size] for i in range(0, len(recorded), size)]


@functools.cache
def _builders() -> ThreadPoolExecutor:
    """Threads that wait on the compiler (a subprocess each), one per compile worker."""
    return ThreadPoolExecutor(max(1, get_compile_threads()), thread_name_prefix="wavepass-cpp",
                              initializer=_yield_to_lowering)


def _yield_to_lowering() -> None:
    """Lower this build thread's priority, and so its compilers' (Linux: a nice value is per
    thread, and a process started from a thread inherits it). A build runs while the next
    piece is lowered in the main thread, which is what the whole compile waits on: with as
    many builds as cores (2 here), an equal share slowed the lowering of SD3-12's pieces
    from 5.1 s to 6.2 s. Elsewhere (macOS: per process) nothing changes."""
    if sys.platform.startswith("linux"):
        thread = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + _BUILD_NICENESS))
        except OSError:  # a sandbox without setpriority: builds keep the process's priority
            pass


def _build_chunk(kernels: list[Kernel]) -> Any:
    """The extension module of one chunk, or None (its kernels are built one by one)."""
    try:
        return _load(bundle_source(kernels))
    except Exception as exc:  # a compiler error: Inductor's own per-kernel builds still work
        reason = _reason(exc)
        if reason not in _failures:
            _failures.add(reason)
            log.warning("wavespeed: building %d C++ kernels as one library failed (%s); "
                        "building them one by one", len(kernels), reason)
        return None


def _load(source: str) -> Any:
    """Build (or find on disk) and load one bundle, linked by gold where it serves."""
    if _has_gold() and "gold" not in _failures:
        try:
            return BundleCodeCache.load(source, extra_flags=_GOLD)
        except Exception as exc:
            _failures.add("gold")
            log.info("wavespeed: linking C++ kernels with GNU gold failed (%s); linking with the "
                     "compiler's default linker from now on", _reason(exc))
    return BundleCodeCache.load(source)


@functools.cache
def _has_gold() -> bool:
    return sys.platform.startswith("linux") and shutil.which("ld.gold") is not None


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def bundle_source(kernels: list[Kernel]) -> str:
    """One C++ source: every kernel in a namespace of its own (its includes hoisted), then a
    Python method `kernel_<i>` per kernel and the module's init. Its first line names
    wavepass's sources (`block_op.source_key`), so the library's on-disk key (the source and
    the compile command) changes with the binding code that wraps Inductor's kernels."""
    includes: dict[str, None] = {}
    bodies, methods, table = [], [], []
    for index, kernel in enumerate(kernels):
        lines = kernel.source.splitlines()
        includes.update(dict.fromkeys(line for line in lines if line.lstrip().startswith("#include")))
        body = "\n".join(line for line in lines if not line.lstrip().startswith("#include"))
        bodies.append(f"namespace wavepass_kernel_{index} {{\n{_ENTRY.sub('', body, count=1)}\n}}")
        arguments = ", ".join(f"arg<{_parsed_type(t)}>(args, {n})" for n, t in enumerate(kernel.argtypes))
        methods.append(_METHOD.format(index=index, count=len(kernel.argtypes), arguments=arguments))
        table.append(f'    {{"kernel_{index}", kernel_{index}_py, METH_VARARGS, ""}},')
    return "\n".join([f"// wavepass {source_key()}", *includes, *bodies, _BINDING, *methods,
                      _MODULE.format(table="\n".join(table))])


_BINDING = """
// Python methods for the kernels above, in Inductor's calling convention: tensors by their
// data pointer (through the function whose address Inductor puts in the environment),
// sizes as Python ints, scalars as Python floats.
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <cerrno>
#include <cstdlib>
#include <stdexcept>

static void* (*wavepass_tensor_data_ptr)(PyObject* obj);

template <typename T> static inline T arg(PyObject* args, Py_ssize_t n) {
    static_assert(std::is_pointer_v<T>, "a kernel argument is a pointer, an int or a float");
    return static_cast<T>(wavepass_tensor_data_ptr(PyTuple_GET_ITEM(args, n)));
}
template <> inline int64_t arg<int64_t>(PyObject* args, Py_ssize_t n) {
    auto value = PyLong_AsSsize_t(PyTuple_GET_ITEM(args, n));
    if (value == -1 && PyErr_Occurred()) throw std::runtime_error("expected an int argument");
    return value;
}
template <> inline uintptr_t arg<uintptr_t>(PyObject* args, Py_ssize_t n) {
    auto value = PyLong_AsVoidPtr(PyTuple_GET_ITEM(args, n));
    if (value == reinterpret_cast<void*>(-1) && PyErr_Occurred()) throw std::runtime_error("expected an int argument");
    return reinterpret_cast<uintptr_t>(value);
}
template <> inline float arg<float>(PyObject* args, Py_ssize_t n) {
    auto value = PyFloat_AsDouble(PyTuple_GET_ITEM(args, n));
    if (value == -1.0 && PyErr_Occurred()) throw std::runtime_error("expected a float argument");
    return static_cast<float>(value);
}
"""

_METHOD = """
static PyObject* kernel_{index}_py(PyObject*, PyObject* args) {{
    try {{
        if (!PyTuple_CheckExact(args) || PyTuple_GET_SIZE(args) != {count})
            throw std::runtime_error("kernel_{index} takes {count} arguments");
        wavepass_kernel_{index}::kernel({arguments});
        Py_RETURN_NONE;
    }} catch (std::exception const& e) {{
        PyErr_SetString(PyExc_RuntimeError, e.what());
        return nullptr;
    }}
}}
"""

_MODULE = """
static PyMethodDef wavepass_methods[] = {{
{table}
    {{nullptr, nullptr, 0, nullptr}}}};

static struct PyModuleDef wavepass_module = {{PyModuleDef_HEAD_INIT, "wavepass_kernels", nullptr, -1, wavepass_methods}};

PyMODINIT_FUNC PyInit_wavepass_kernels(void) {{
    const char* address = std::getenv("_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR");
    char* end = nullptr;
    errno = 0;
    uintptr_t value = address ? std::strtoull(address, &end, 10) : 0;
    if (errno != 0 || end == address || value == 0) {{
        PyErr_SetString(PyExc_RuntimeError, "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR must be set");
        return nullptr;
    }}
    wavepass_tensor_data_ptr = reinterpret_cast<decltype(wavepass_tensor_data_ptr)>(value);
    PyObject* module = PyModule_Create(&wavepass_module);
#ifdef Py_GIL_DISABLED
    if (module != nullptr) PyUnstable_Module_SetGIL(module, Py_MOD_GIL_NOT_USED);
#endif
    return module;
}}
"""
