"""Every private torch API wavepass uses, in one place, and what happens on a torch without it.

wavepass is tested on torch `TESTED` (pyproject's range): 2.13.0 in CI, 2.11 and 2.15 once by
hand. Inductor, Dynamo and AOTAutograd change their internals between releases, so nothing
here imports a private module when wavepass is imported: each API is looked up by its dotted
path at use (`api(name)`, through `_lookup`), and `import wavepass` works on any torch.

Three kinds of use:

- **The core** (`CORE`): compile_fx per piece, FakeTensor values, the partition's symbolic
  size facts. Where one is missing, `core_unavailable_reason()` says which (naming the
  torch version), and the backend compiles the whole graph as plain Inductor
  (`plain_inductor`) after one warning: no cache, the model's results.
- **Optional features** (`FEATURES`): each needs some APIs; `enabled(feature)` looks them
  up once per process, and where one is missing (ImportError/AttributeError, or a version
  check) the feature turns itself off with ONE INFO line on the "wavepass" logger naming
  the missing API and the torch version. The rest keeps working: what the feature sped up
  is done the plain way (each piece by Inductor), with the same results.
- **Registration** (`register_backend`): the `wavespeed` name in Dynamo's registry.

Public torch APIs (torch.fx, torch.compile, torch.library, torch.autocast) are used where
they are needed and are not listed. Neither are Dynamo's node metadata keys the passes read
(`example_value`/`val`, `nn_module_stack`, `grapharg`): they are dict entries, and where one
is absent the passes find no blocks and the graph is compiled whole after the usual warning.

| API (`APIS` name) | where torch keeps it | torch | used for | missing |
| --- | --- | --- | --- | --- |
| compile_fx, compile_fx_inner | torch._inductor.compile_fx | 2.11-2.15 | core: each piece, each block graph | core off |
| list_mode_options | torch._inductor | 2.11-2.15 | core: a mode's Inductor options | core off |
| TracingContext, tracing | torch._guards | 2.11-2.15 | core: a tracing context per graph | core off |
| FakeTensor | torch._subclasses.fake_tensor | 2.11-2.15 | core: the fake mode of Dynamo's values | core off |
| free_symbols, statically_known_true | torch.fx.experimental.symbolic_shapes | 2.11-2.15 | core: the passes' size facts | core off |
| list_backends, register_backend | torch._dynamo | 2.11-2.15 | registering `wavespeed` at `import wavepass` | INFO line; the entry point registers it |
| lookup_backend | torch._dynamo | 2.11-2.15 | `plain_inductor` where compile_fx is missing | the graph runs eagerly |
| inductor_config_patch | torch._inductor.config.patch | 2.11-2.15 | `plain_inductor` through Dynamo's backend | the patches are not applied |
| counters | torch._dynamo.utils | 2.11-2.15 | dynamo_counters | counts kept in `counters()` |
| inductor_cudagraphs | torch._inductor.config.triton.cudagraphs | 2.11-2.15 | python_pieces | such pieces are compiled |
| invoke_subgraph | torch.ops.higher_order | 2.11-2.15 | outline_blocks | pieces compiled whole |
| is_traceable_wrapper_subclass | torch.utils._python_dispatch | 2.11-2.15 | outline_blocks: a structure's key names a wrapper subclass's inner tensors; block graphs on subclasses are not called by name | pieces compiled whole |
| FunctionalTensor | torch._subclasses.functional_tensor | 2.11-2.15 | outline_blocks: a plain tensor while AOTAutograd traces | pieces compiled whole |
| StorageWeakRef | torch.multiprocessing.reductions | 2.11-2.15 | outline_blocks: fresh outputs | pieces compiled whole |
| CUSTOM_EXTERN_KERNEL_CODEGEN, CustomCodegen | torch._inductor.codegen.custom_extern_kernel_codegen | 2.11-2.15 | direct_block_calls | calls go through the dispatcher |
| V | torch._inductor.virtualized | 2.11-2.15 | direct_block_calls: the wrapper's imports | calls go through the dispatcher |
| current_compile_id | torch._guards.CompileContext | 2.11-2.15 | static_inputs | weights copied under CUDA graphs |
| aot_reads_dynamo_marks | torch._functorch._aot_autograd.frontend_utils._try_get_metadata_from_dynamo | 2.11-2.15 | static_inputs: AOTAutograd reads the marks | weights copied under CUDA graphs |
| CompiledFxGraph | torch._inductor.output_code | 2.11-2.15 | bare_block_graphs | AOTAutograd's wrappers run |
| OutputType | torch._functorch._aot_autograd.schemas | 2.11-2.15 | bare_block_graphs | AOTAutograd's wrappers run |
| TracingContext.try_get | torch._guards | 2.11-2.15 | bare_block_graphs: AOTAutograd's metadata | AOTAutograd's wrappers run |
| SerializableCompiledFunction | torch._functorch._aot_autograd.runtime_wrappers | 2.11-2.15 | bare_block_graphs: the metadata of the AOTAutograd entry loaded from its cache | AOTAutograd's wrappers run |
| is_any_autocast_enabled | torch._C._is_any_autocast_enabled | 2.11-2.15 | bare_block_graphs | AOTAutograd's wrappers run |
| AsyncCompile (.cpp_pybinding, .wait), get_compile_threads | torch._inductor.async_compile | 2.11-2.15 | bundle_kernels | one library per kernel |
| CppPythonBindingsCodeCache (.load_pybinding, .entry_function) | torch._inductor.codecache | 2.11-2.15 | bundle_kernels | one library per kernel |
| clear_on_fresh_cache | torch._inductor.utils | 2.11-2.15 | bundle_kernels | one library per kernel |
| pick_vec_isa | torch._inductor.cpu_vec_isa | 2.11-2.15 | bundle_kernels: the ISA picked before the build threads start (its probe is not thread-safe) | one library per kernel |
| dynamo_config | torch._dynamo.config | 2.11-2.15 | diagnosis.py (its owner's) | less specific reasons |
| debug_get_cache_entry_list | torch._dynamo.eval_frame._debug_get_cache_entry_list | 2.11-2.15 | diagnosis.py | less specific reasons |
| InstructionTranslator | torch._dynamo.symbolic_convert | 2.11-2.15 | diagnosis.py | less specific reasons |
| get_eval_frame_callback | torch._C._dynamo.eval_frame | 2.11-2.15 | split_stacks: is `wavespeed` running this call | a stack split by graph breaks is not cached (the old warning) |
| skip_code | torch._dynamo.eval_frame | 2.11-2.15 | split_stacks: the cache's block entry runs as Python, the block compiled | as above |
| RestartAnalysis | torch._dynamo.exc | 2.13 (2.11, 2.15 not run) | dynamo_restarts: a restart raised inside a piece's compile goes on to Dynamo | caught as a failed outline: the piece compiled whole |
| TensorifyState (.force_specializations) | torch._dynamo.symbolic_convert | 2.13 (2.11, 2.15 not run) | piece_floats: floats other pieces read stay symbolic | a float read in only some pieces is specialized: one graph per value |
| SymT, symbol_is_type | torch.utils._sympy.symbol | 2.13 (2.11, 2.15 not run) | piece_floats: which symbols are floats | as above |
| inductor_cache_dir | torch._inductor.runtime.cache_dir_utils.cache_dir | 2.11-2.15 | notices.py: an error raised in code Inductor generated is the compiler's | such an error is judged by its type and other frames |
| OpOverload, OpOverloadPacket | torch._ops | 2.11-2.15 | distributed.py (its owner's) | no collectives found |
| resolve_process_group | torch.distributed.distributed_c10d._resolve_process_group | 2.11-2.15 | distributed.py | no collectives found |

The "torch" column: the releases that have the API at that path. 2.11.0, 2.13.0 and 2.15.0
ran the tests (`tests/test_torch_api.py` looks every API up; 2.11.0 and 2.15.0 by hand,
December 2026); 2.12 and 2.14 lie between releases that have them all. The bundle also
speaks Inductor's C++ calling convention (`_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR`, in
2.11-2.15): a torch whose `CppPythonBindingsCodeCache` does not mention it has the bundle off
(the version check).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import threading
import types
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from . import process_state

log = logging.getLogger("wavepass")
TESTED = "torch>=2.11,<2.16"

# Where torch keeps each API, by the name wavepass uses; the first path found wins (older
# names after newer ones).
APIS: dict[str, tuple[str, ...]] = {
    # the core
    "compile_fx": ("torch._inductor.compile_fx.compile_fx",),
    "compile_fx_inner": ("torch._inductor.compile_fx.compile_fx_inner",),
    "list_mode_options": ("torch._inductor.list_mode_options",),
    "TracingContext": ("torch._guards.TracingContext",),
    "tracing": ("torch._guards.tracing",),
    "FakeTensor": ("torch._subclasses.fake_tensor.FakeTensor",),
    "free_symbols": ("torch.fx.experimental.symbolic_shapes.free_symbols",),
    "statically_known_true": ("torch.fx.experimental.symbolic_shapes.statically_known_true",),
    # registration and the plain fallback
    "list_backends": ("torch._dynamo.list_backends",),
    "register_backend": ("torch._dynamo.register_backend",),
    "lookup_backend": ("torch._dynamo.lookup_backend",),
    "inductor_config_patch": ("torch._inductor.config.patch",),
    # optional features
    "counters": ("torch._dynamo.utils.counters",),
    "inductor_cudagraphs": ("torch._inductor.config.triton.cudagraphs",),
    "invoke_subgraph": ("torch.ops.higher_order.invoke_subgraph",),
    "StorageWeakRef": ("torch.multiprocessing.reductions.StorageWeakRef",),
    "CUSTOM_EXTERN_KERNEL_CODEGEN": ("torch._inductor.codegen.custom_extern_kernel_codegen.CUSTOM_EXTERN_KERNEL_CODEGEN",),
    "CustomCodegen": ("torch._inductor.codegen.custom_extern_kernel_codegen.CustomCodegen",),
    "V": ("torch._inductor.virtualized.V",),
    "current_compile_id": ("torch._guards.CompileContext.current_compile_id",),
    "aot_reads_dynamo_marks": ("torch._functorch._aot_autograd.frontend_utils._try_get_metadata_from_dynamo",
                               "torch._functorch.aot_autograd._try_get_metadata_from_dynamo"),
    "CompiledFxGraph": ("torch._inductor.output_code.CompiledFxGraph",),
    "OutputType": ("torch._functorch._aot_autograd.schemas.OutputType",),
    "TracingContext.try_get": ("torch._guards.TracingContext.try_get",),
    "is_traceable_wrapper_subclass": ("torch.utils._python_dispatch.is_traceable_wrapper_subclass",),
    "FunctionalTensor": ("torch._subclasses.functional_tensor.FunctionalTensor",),
    "SerializableCompiledFunction": ("torch._functorch._aot_autograd.runtime_wrappers.SerializableCompiledFunction",),
    "is_any_autocast_enabled": ("torch._C._is_any_autocast_enabled",),
    "AsyncCompile": ("torch._inductor.async_compile.AsyncCompile",),
    "AsyncCompile.cpp_pybinding": ("torch._inductor.async_compile.AsyncCompile.cpp_pybinding",),
    "AsyncCompile.wait": ("torch._inductor.async_compile.AsyncCompile.wait",),
    "get_compile_threads": ("torch._inductor.async_compile.get_compile_threads",),
    "pick_vec_isa": ("torch._inductor.cpu_vec_isa.pick_vec_isa",),
    "CppPythonBindingsCodeCache": ("torch._inductor.codecache.CppPythonBindingsCodeCache",),
    "CppPythonBindingsCodeCache.load_pybinding": ("torch._inductor.codecache.CppPythonBindingsCodeCache.load_pybinding",),
    "CppPythonBindingsCodeCache.entry_function": ("torch._inductor.codecache.CppPythonBindingsCodeCache.entry_function",),
    "clear_on_fresh_cache": ("torch._inductor.utils.clear_on_fresh_cache",),
    "RestartAnalysis": ("torch._dynamo.exc.RestartAnalysis",),
    "TensorifyState": ("torch._dynamo.symbolic_convert.TensorifyState",),
    "TensorifyState.force_specializations": ("torch._dynamo.symbolic_convert.TensorifyState.force_specializations",),
    "SymT": ("torch.utils._sympy.symbol.SymT",),
    "symbol_is_type": ("torch.utils._sympy.symbol.symbol_is_type",),
    # for diagnosis.py and distributed.py (their owners' files)
    "dynamo_config": ("torch._dynamo.config",),
    "debug_get_cache_entry_list": ("torch._dynamo.eval_frame._debug_get_cache_entry_list",),
    "InstructionTranslator": ("torch._dynamo.symbolic_convert.InstructionTranslator",),
    "get_eval_frame_callback": ("torch._C._dynamo.eval_frame.get_eval_frame_callback",),
    "skip_code": ("torch._dynamo.eval_frame.skip_code",),
    "inductor_cache_dir": ("torch._inductor.runtime.cache_dir_utils.cache_dir",),
    "OpOverload": ("torch._ops.OpOverload",),
    "OpOverloadPacket": ("torch._ops.OpOverloadPacket",),
    "resolve_process_group": ("torch.distributed.distributed_c10d._resolve_process_group",),
}

CORE = ("compile_fx", "compile_fx_inner", "list_mode_options", "TracingContext", "tracing", "FakeTensor",
        "free_symbols", "statically_known_true")


class Missing(ImportError):
    """This torch lacks an API wavepass uses (the message names it and the torch version)."""


@dataclass(frozen=True)
class Feature:
    """An optional feature: `what` it does, the `apis` it needs, what happens `without` it,
    and a version `check` beyond their presence (the reason it fails, or None)."""

    what: str
    apis: tuple[str, ...]
    without: str
    check: Callable[[], str | None] | None = None


def _speaks_bundle_convention() -> str | None:
    """The bundle's binding reads the tensor-pointer function where Inductor's does."""
    try:
        source = inspect.getsource(api("CppPythonBindingsCodeCache"))
    except (OSError, TypeError):  # no source to read: assume the convention holds
        return None
    if "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR" in source:
        return None
    return (f"torch {torch.__version__}'s CppPythonBindingsCodeCache no longer passes "
            "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR (the C++ calling convention the bundle speaks)")


FEATURES: dict[str, Feature] = {
    "bundle_kernels": Feature(
        "building a piece's C++ kernels as one library (cpp_bundle, option bundle_kernels)",
        ("AsyncCompile", "AsyncCompile.cpp_pybinding", "AsyncCompile.wait", "get_compile_threads", "pick_vec_isa",
         "CppPythonBindingsCodeCache", "CppPythonBindingsCodeCache.load_pybinding",
         "CppPythonBindingsCodeCache.entry_function", "clear_on_fresh_cache"),
        "Inductor builds each kernel as a library of its own (slower cold compiles, same kernels)",
        _speaks_bundle_convention),
    "outline_blocks": Feature(
        "compiling each block structure once (outline_blocks, option outline_blocks)",
        ("invoke_subgraph", "StorageWeakRef", "is_traceable_wrapper_subclass", "FunctionalTensor"),
        "Inductor compiles every piece whole, each block inlined (slower compiles, same results)"),
    "direct_block_calls": Feature(
        "Inductor's code calling compiled block graphs directly (block_op.call_directly_from_inductor)",
        ("CUSTOM_EXTERN_KERNEL_CODEGEN", "CustomCodegen", "V"),
        "block graphs are called through the dispatcher (~1.4 us more per operand and call)"),
    "python_pieces": Feature(
        "running a piece that only calls block graphs as Python (call_blocks_directly)",
        ("inductor_cudagraphs",),
        "Inductor compiles such pieces too (it cannot be told whether it records them as CUDA graphs)"),
    "static_inputs": Feature(
        "marking each piece's weights as static inputs, as Dynamo marks its graphs "
        "(compiler_interface._mark_dynamo_inputs)",
        ("current_compile_id", "aot_reads_dynamo_marks"),
        "under CUDA graphs every input of a piece, the weights included, is copied at each replay"),
    "bare_block_graphs": Feature(
        "running block graphs without AOTAutograd's runtime wrappers (InductorAdaptor.compile_block)",
        ("CompiledFxGraph", "OutputType", "TracingContext.try_get", "SerializableCompiledFunction",
         "is_any_autocast_enabled"),
        "block graphs run inside AOTAutograd's runtime wrappers (~10-15 us more a call)"),
    "split_stacks": Feature(
        "caching a block stack that Dynamo splits into several graphs (stack_cache.py)",
        ("get_eval_frame_callback", "skip_code"),
        "such a model compiles without the cache, after the warning that names the graph break"),
    "dynamo_restarts": Feature(
        "passing Dynamo's restarts of its analysis (RestartAnalysis) from a piece's compile on to Dynamo "
        "(pipeline.compile_plan)",
        ("RestartAnalysis",),
        "a restart raised while a piece's blocks compile is taken for a failed outline: the piece is compiled "
        "whole"),
    "piece_floats": Feature(
        "keeping a float that other pieces of a Dynamo graph read symbolic while one piece compiles "
        "(torch_api.floats_read_elsewhere)",
        ("TensorifyState", "TensorifyState.force_specializations", "SymT", "symbol_is_type"),
        "a float the model reads (a LoRA strength under ComfyUI's partial loading) is specialized by each "
        "piece that does not read it: one Dynamo graph per value"),
    "dynamo_counters": Feature(
        "counting in torch._dynamo.utils.counters['wavepass']",
        ("counters",),
        "wavepass counts in a dictionary of its own, wavepass.torch_api.counters()"),
}

_off_reasons: dict[str, str | None] = {}  # feature (or "core") -> why it is off, None where on
_lock = threading.Lock()
_own_counters: defaultdict[str, Counter[str]] = defaultdict(Counter)
process_state.owns("torch features", _off_reasons)
process_state.owns("own counters", _own_counters)


def _lookup(path: str) -> Any:
    """The object at dotted `path` ("torch._inductor.compile_fx.compile_fx"): modules
    imported as needed, the rest read as attributes. The one place a torch name is resolved;
    raises ImportError or AttributeError where this torch has no such thing."""
    parts = path.split(".")
    found: Any = _import(parts[0])
    for index, part in enumerate(parts[1:], start=2):
        try:
            found = getattr(found, part)
        except AttributeError:
            if not isinstance(found, types.ModuleType):
                raise
            found = _import(".".join(parts[:index]))
    return found


def _import(module: str) -> types.ModuleType:
    """Import `module` with warnings shown, never raised: a warning a torch module gives at
    import (a deprecation) under a caller's `-W error` filter does not make it missing."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        return importlib.import_module(module)


def api(name: str) -> Any:
    """The API wavepass calls `name` (see `APIS`), looked up now; `Missing` where this torch
    has it at none of its paths."""
    paths = APIS[name]
    errors = []
    for path in paths:
        try:
            return _lookup(path)
        except Exception as exc:  # ImportError, AttributeError, or an import that fails outright
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    raise Missing(f"torch {torch.__version__} has no {' or '.join(paths)} ({errors[0]})")


def _missing(names: Iterable[str]) -> str | None:
    """Why the first of `names` that this torch lacks is missing, or None."""
    for name in names:
        try:
            api(name)
        except Missing as exc:
            return str(exc)
    return None


def enabled(feature: str) -> bool:
    """Whether this torch has what optional `feature` (see `FEATURES`) needs. The first time
    it does not, one INFO line on the "wavepass" logger says what is missing and what
    happens instead; the answer holds for the process (until `reset_process_state`)."""
    if feature not in _off_reasons:
        with _lock:
            if feature not in _off_reasons:
                spec = FEATURES[feature]
                reason = _missing(spec.apis)
                if reason is None and spec.check is not None:
                    reason = spec.check()
                if reason is not None:
                    log.info("wavespeed: %s is off: %s; %s", spec.what, reason, spec.without)
                _off_reasons[feature] = reason
    return _off_reasons[feature] is None


def core_unavailable_reason() -> str | None:
    """None where this torch has every API the core needs (compile_fx per piece, FakeTensor
    values, the partition's size facts); otherwise why, naming the API and the torch
    version: the backend then compiles the whole graph as plain Inductor after one warning
    with these words."""
    if "core" not in _off_reasons:
        _off_reasons["core"] = _missing(CORE)
    reason = _off_reasons["core"]
    if reason is None:
        return None
    return f"{reason}, which wavepass needs to cache (it is tested on {TESTED})"


# --- the core ---------------------------------------------------------------------------

def compile_fx(gm: torch.fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Any:
    return api("compile_fx")(gm, example_inputs, **kwargs)


def compile_fx_inner(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Any:
    return api("compile_fx_inner")(gm, example_inputs, **kwargs)


def mode_options(mode: str) -> dict[str, Any]:
    """Inductor's config patches for `mode` ("max-autotune", "reduce-overhead", ...)."""
    return api("list_mode_options")(mode)


def tracing(fake_mode: Any) -> Any:
    """A tracing context of its own over `fake_mode`, entered with `with`."""
    return api("tracing")(api("TracingContext")(fake_mode))


def fake_mode_of(values: Iterable[Any]) -> Any:
    """The fake mode of the first FakeTensor among `values`, or None."""
    fake = api("FakeTensor")
    return next((x.fake_mode for x in values if isinstance(x, fake)), None)


def free_symbols(value: Any) -> Any:
    return api("free_symbols")(value)


def statically_known_true(value: Any) -> bool:
    return api("statically_known_true")(value)


def inductor_setting(name: str, default: Any) -> Any:
    """Inductor's config value `name` ("triton.cudagraphs"), or `default` where this torch
    has no such setting."""
    try:
        return _lookup(f"torch._inductor.config.{name}")
    except Exception:
        return default


def plain_inductor(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], patches: dict[str, Any]) -> Any:
    """`gm` compiled as `backend="inductor"` would, with Inductor's config `patches`:
    through compile_fx where this torch has it, else through the "inductor" backend Dynamo
    registered, else `gm` itself (run eagerly: the model's results, nothing compiled). For a
    torch whose core is unavailable (`core_unavailable_reason`)."""
    try:
        return compile_fx(gm, list(example_inputs), config_patches=patches)
    except Missing:
        pass
    try:
        backend = api("lookup_backend")("inductor")
    except Exception as exc:
        log.info("wavespeed: no Inductor to compile with (%s); running the graph as it is", exc)
        return gm
    try:
        patched = api("inductor_config_patch")(patches)
    except Missing:
        patched = nullcontext()
    with patched:
        return backend(gm, list(example_inputs))


# --- registration -----------------------------------------------------------------------

def register_backend(compiler_fn: Callable[..., Any], name: str) -> None:
    """Register `compiler_fn` as Dynamo backend `name`, unless a backend has that name (the
    `torch_dynamo_backends` entry point registers it too). On a torch without Dynamo's
    registry functions: one INFO line, and the entry point is left to register it."""
    try:
        if name not in api("list_backends")(exclude_tags=()):
            api("register_backend")(compiler_fn, name=name)
    except Exception as exc:  # Missing, or another signature
        log.info("wavespeed: could not register the %r backend with Dynamo (%s: %s); "
                 "torch.compile finds it through the torch_dynamo_backends entry point",
                 name, type(exc).__name__, exc)


# --- optional features ------------------------------------------------------------------

def counters() -> defaultdict[str, Counter[str]]:
    """Dynamo's counters (`torch._dynamo.utils.counters`), where wavepass counts its pieces
    and block graphs; a dictionary of wavepass's own where this torch has none."""
    return api("counters") if enabled("dynamo_counters") else _own_counters


def backend_of(callback: Any) -> tuple[Callable[..., Any], dict[str, Any]] | None:
    """(compiler function, keyword arguments) of the `torch.compile` that Dynamo's frame
    `callback` (`get_eval_frame_callback()`, None outside torch.compile) was made for: the
    callback keeps its backend as `_torchdynamo_orig_backend`, and
    `torch.compile(backend="name", options=...)` wraps it as `compiler_fn` + `kwargs`."""
    backend = callback
    while hasattr(backend, "_torchdynamo_orig_backend"):
        backend = backend._torchdynamo_orig_backend
    if backend is None:
        return None
    return getattr(backend, "compiler_fn", backend), dict(getattr(backend, "kwargs", None) or {})


def invoke_subgraph() -> Any:
    """The higher-order operator of `torch.compiler.nested_compile_region` (outline_blocks)."""
    return api("invoke_subgraph")


def restart_exceptions() -> tuple[type[BaseException], ...]:
    """The exceptions by which Dynamo restarts its analysis of a frame (`RestartAnalysis`:
    `TensorifyScalarRestartAnalysis`, raised inside AOTAutograd by
    `tensorify_python_scalars`, and its siblings): control flow that a backend must let
    through to Dynamo, never take for a failed compile. Empty where `dynamo_restarts` is off."""
    return (api("RestartAnalysis"),) if enabled("dynamo_restarts") else ()


def float_symbols(values: Iterable[Any]) -> frozenset[str]:
    """The names of the float symbols ("zf0") free in the symbolic scalars among `values`
    (and in their lists and tuples), as Dynamo records a float it reads (`x.item()`) and
    what is computed from it; none where `piece_floats` is off. Tensors are not read: a
    float in a size is specialized by the piece that has that size, whatever the others do
    (`tensorify_python_scalars`), and reading every tensor's sizes costs ~60 us a node."""
    if not enabled("piece_floats"):
        return frozenset()
    is_type, float_type = api("symbol_is_type"), api("SymT").FLOAT
    names: set[str] = set()
    pending = list(values)
    while pending:
        value = pending.pop()
        if isinstance(value, (list, tuple)):
            pending.extend(value)
        elif isinstance(value, (torch.SymFloat, torch.SymInt, torch.SymBool)):
            names.update(str(s) for s in free_symbols(value) if is_type(s, float_type))
    return frozenset(names)


@contextmanager
def floats_read_elsewhere(names: Iterable[str]) -> Iterator[None]:
    """While a graph that does not read the float symbols `names` is compiled: AOTAutograd's
    `tensorify_python_scalars` (torch/fx/passes/_tensorify_python_scalars.py, 2.11-2.15)
    ends by specializing every float symbol of the shape environment that the graph it
    compiles did not turn into a tensor, and raising `TensorifyScalarRestartAnalysis`, after
    which Dynamo traces the frame again with those floats as constants, guarded on their
    values. A piece of a Dynamo graph shares its shape environment with the other pieces,
    so every float only another piece reads would be specialized. The pass skips a symbol
    already in `TensorifyState.force_specializations`: `names` are added there for the
    compile and taken out again after it, also when it raises the restart for a float of
    its own (which Dynamo then specializes, as it would for the whole graph)."""
    if not enabled("piece_floats"):
        yield
        return
    specialized = api("TensorifyState.force_specializations")
    added = set(names) - specialized
    specialized.update(added)
    try:
        yield
    finally:
        specialized.difference_update(added)


def is_wrapper_subclass(value: Any) -> bool:
    """Whether `value` is a traceable wrapper subclass (`__tensor_flatten__` over inner
    tensors, `__torch_dispatch__`): quantized and GGUF weights (outline_blocks)."""
    return bool(api("is_traceable_wrapper_subclass")(value))


def plain_tensor_types() -> tuple[type, ...]:
    """The classes of a plain tensor while Dynamo and AOTAutograd trace: fake, functional."""
    return api("FakeTensor"), api("FunctionalTensor")


def aot_entry(compiled: Any) -> Any:
    """The AOTAutograd cache entry that `compiled` (compile_fx's result) was loaded from or
    saved as: the `SerializableCompiledFunction` on its `__wrapped__` chain serializes to it
    (its `runtime_metadata`, `maybe_subclass_meta`); None where the chain has none (the
    AOTAutograd cache off)."""
    serializable = api("SerializableCompiledFunction")
    seen: set[int] = set()
    while compiled is not None and id(compiled) not in seen:
        seen.add(id(compiled))
        if isinstance(compiled, serializable):
            return compiled.serialize()
        compiled = getattr(compiled, "__wrapped__", None)
    return None


def storage_ref(tensor: torch.Tensor) -> Any:
    """A hashable reference to `tensor`'s storage: equal for tensors that share memory."""
    return api("StorageWeakRef")(tensor.untyped_storage())
