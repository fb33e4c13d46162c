"""Hand graphs to Inductor (or run them as they are), and the one way to fall back.

The pieces of a Dynamo graph go through `compile_pieces`, each piece through `compile_graph`,
which returns a plain callable `f(*args) -> tuple`. `plain_fallback` is the single exit for
graphs the cache cannot handle: it says why, once per reason, and compiles the whole graph
as `backend="inductor"` would.

Compile once per block kind: `compile_graph` first rewrites a piece so that each block is a
call of one shared subgraph per block structure (`passes/outline_blocks.py`, structures
counted over all pieces). Each static subgraph is compiled on its own, once for all pieces
and models (`block_op.py`: a registry by name), and the piece calls it through
`wavepass.blocks` (`passes/call_compiled_blocks.py`); subgraphs with symbolic sizes stay
in the piece, which Inductor lowers once per piece. A piece's C++ kernels are built as one
library per compile worker, the small pieces' together (`cpp_bundle.py`).
The pieces share the Dynamo graph's shape environment: a Python float that only some of them
read stays symbolic while the others compile (`_compile_fx`), so a float compiles no more
graphs than under plain Inductor, and Dynamo's restarts of its analysis pass through
`compile_graph` (issue 29).
Counts land in `torch._dynamo.utils.counters["wavepass"]` (`torch_api.counters()`); a
`CompileSession` per Dynamo graph (per fake mode) sums them for the log.

Every private torch API is reached through `torch_api`. Each optional feature (the bundle,
outlined blocks, block graphs called directly or run bare, pieces run as Python, static
inputs) asks `torch_api.enabled` first and is skipped where this torch lacks what it needs;
where the core is missing (`torch_api.core_unavailable_reason`), `compile_graph` compiles
the graph as plain Inductor (`torch_api.plain_inductor`).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import time
import weakref
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from contextlib import nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule

from . import torch_api
from .block_op import BLOCKS, Structure, call_directly_from_inductor, layouts, register, registered, source_key
from .notices import warn_once
from .options import CacheOptions
from .passes.call_blocks_directly import call_blocks_directly, calls_only_blocks
from .passes.call_compiled_blocks import blocks_called, call_compiled_blocks, is_static
from .passes.errors import CannotCache
from .passes.fx_facts import example_value
from .passes.outline_blocks import block_structures, outline_blocks

log = logging.getLogger("wavepass")
# Inductor checks every input's sizes and strides on every call, also inside every block
# subgraph: thousands of checks a step for a model whose weights are inputs, ~3% of a step of
# the 57-block benchmark model. Dynamo's guards cover the graph's inputs and the runtime
# checks the values passed between pieces (`runtime._check_layouts`), so pieces skip them;
# options={"inductor": {"size_asserts": True}} turns them back on.
PIECE_PATCHES = {"size_asserts": False}


@dataclass
class CompileSession:
    """What was compiled for one Dynamo graph: pieces, outlined blocks, block graphs, time."""

    structures: set[Hashable] = field(default_factory=set)
    pieces: int = 0
    blocks: int = 0
    block_graphs: int = 0
    seconds: float = 0.0

    def add(self, piece: GraphModule, structures: dict[str, Structure], compiled: int) -> str:
        """Count the block calls of one outlined piece and its block graphs: those it lowers
        itself and the `compiled` new ones of `structures` it calls; describe them."""
        calls = (len(piece.graph.find_nodes(op="call_function", target=torch_api.invoke_subgraph()))
                 + sum(map(blocks_called, piece.graph.find_nodes(op="call_function", target=BLOCKS))))
        kinds = [m for m in piece.children() if "structure" in getattr(m, "meta", {})]
        self.blocks += calls
        self.block_graphs += len(kinds) + compiled
        self.structures.update(m.meta["structure"] for m in kinds)
        self.structures.update(s.key for s in structures.values())
        counts = torch_api.counters()["wavepass"]
        counts["blocks"] += calls
        counts["block_graphs"] += len(kinds) + compiled
        return f"{calls} block(s) as calls of {len(kinds) + len(structures)} block graph(s)"

    def summary(self) -> str:
        return (f"{self.pieces} piece(s), {self.blocks} block(s) as calls of {self.block_graphs} "
                f"compiled block graph(s) ({len(self.structures)} distinct structure(s)), "
                f"{self.seconds:.1f} s compiling")


_sessions: weakref.WeakKeyDictionary[Any, CompileSession] = weakref.WeakKeyDictionary()


def compile_pieces(pieces: Sequence[tuple[str, GraphModule, Sequence[Any]]], options: CacheOptions,
                   mode: str | None = None) -> list[Callable[..., Any]]:
    """Compile the (name, graph, example inputs) pieces of one Dynamo graph; return them in
    order. A block structure that occurs in more than one piece, even once in each, is
    compiled once. The largest piece is compiled first: its C++ kernels, the most, build in
    the background (`cpp_bundle`) while the smaller pieces are lowered. A Python float that
    only some pieces read stays symbolic while the others compile (`_compile_fx`)."""
    occurrences: Counter[Hashable] = Counter()
    if _outlines(options):
        for _, gm, _ in pieces:
            occurrences += _structures_in(gm)
    largest_first = sorted(range(len(pieces)), key=lambda i: -len(pieces[i][1].graph.nodes))
    floats = (frozenset().union(*(_floats_read(gm) for _, gm, _ in pieces))
              if options.compiler != "eager" else frozenset())
    token = _graph_floats.set(floats)
    try:
        with _batched_builds() if _bundles(options) else nullcontext():
            compiled = {i: compile_graph(pieces[i][1], pieces[i][2], options, mode, pieces[i][0], occurrences)
                        for i in largest_first}
    finally:
        _graph_floats.reset(token)
    return [compiled[i] for i in range(len(pieces))]


# The float symbols ("zf0") that the pieces of the Dynamo graph being compiled read, while
# `compile_pieces` compiles them: a piece or block graph that does not read one leaves it
# symbolic for the others (`_compile_fx`). Empty for a graph compiled on its own.
_graph_floats: ContextVar[frozenset[str]] = ContextVar("wavepass_graph_floats", default=frozenset())


def _floats_read(gm: GraphModule) -> frozenset[str]:
    """The float symbols free in the values Dynamo recorded on `gm`'s nodes and on those of
    its subgraphs (outlined blocks): the Python floats it reads (`torch_api.float_symbols`)."""
    return torch_api.float_symbols(example_value(node) for module in gm.modules()
                                   if isinstance(module, GraphModule) for node in module.graph.nodes)


def _outlines(options: CacheOptions) -> bool:
    return options.outline_blocks and options.compiler != "eager" and torch_api.enabled("outline_blocks")


def _bundles(options: CacheOptions) -> bool:
    return options.bundle_kernels and options.compiler != "eager" and torch_api.enabled("bundle_kernels")


def _batched_builds() -> Any:
    from .cpp_bundle import batched_builds

    return batched_builds()


def piece_patches(options: CacheOptions, mode: str | None) -> dict[str, Any]:
    """Inductor's config patches for every piece: ours, then the mode's, then the user's."""
    return {**PIECE_PATCHES, **(torch_api.mode_options(mode) if mode else {}), **options.inductor}


def records_cuda_graphs(options: CacheOptions, mode: str | None) -> bool:
    """Whether Inductor runs the pieces as CUDA graphs (on a CUDA device, e.g. with
    mode="reduce-overhead"): a graph's next replay overwrites the outputs of the last one."""
    return options.compiler != "eager" and _cuda_graphs(piece_patches(options, mode))


def _cuda_graphs(patches: dict[str, Any]) -> bool:
    if "triton.cudagraphs" in patches:
        return bool(patches["triton.cudagraphs"])
    return bool(torch_api.inductor_setting("triton.cudagraphs", False))


def compile_graph(gm: GraphModule, example_inputs: Sequence[Any], options: CacheOptions,
                  mode: str | None = None, name: str = "graph",
                  occurrences: Counter[Hashable] | None = None) -> Callable[..., Any]:
    """Compile `gm` with the configured compiler; the result is called as `f(*args)`.
    `occurrences`: how often each block structure occurs in all pieces (default: in `gm`)."""
    if options.compiler == "eager":
        return gm
    if torch_api.core_unavailable_reason() is not None:  # the backend said why, once
        plain = torch_api.plain_inductor(gm, example_inputs, _plain_patches(options, mode))
        return plain if plain is gm else _unboxed(plain)
    patches = piece_patches(options, mode)
    fake_mode = _fake_mode_of(example_inputs)
    started = time.perf_counter()
    recorded_mode = fake_mode if fake_mode is not None else _placeholders_mode(gm, len(example_inputs))
    session = _session_of(recorded_mode)
    found = _outlined(gm, recorded_mode, name, occurrences, patches) if _outlines(options) else None
    compiled = None
    if found is not None:
        outlined, piece = found
        restarts = torch_api.restart_exceptions()
        try:
            structures, new = _compiled_structures(outlined, patches, options)
            python = _runs_as_python(piece, patches)
            run = call_blocks_directly(piece).forward if python else _inductor(
                piece, example_inputs, patches, fake_mode, options)
            compiled = _Piece(run, tuple(structures.values()))
            detail = session.add(piece, structures, new) + (", run as Python" if python else "")
            if python:
                torch_api.counters()["wavepass"]["python_pieces"] += 1
        except restarts:  # Dynamo's control flow (a float to specialize): not a failure
            raise
        except Exception as exc:  # e.g. a block Inductor cannot compile as a subgraph
            log.info("wavespeed: compiling %s whole: its blocks failed to compile as subgraphs (%s: %s)",
                     name, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    if compiled is None:
        compiled, detail = _inductor(gm, example_inputs, patches, fake_mode, options), "whole"
        torch_api.counters()["wavepass"]["whole_graphs"] += 1
    seconds = time.perf_counter() - started
    session.pieces += 1
    session.seconds += seconds
    torch_api.counters()["wavepass"]["pieces"] += 1
    log.info("wavespeed: compiled %s (%d nodes, %s) in %.1f s", name, len(gm.graph.nodes),
             detail, seconds)
    log.info("wavespeed: this graph so far: %s", session.summary())
    return compiled


def _plain_patches(options: CacheOptions, mode: str | None) -> dict[str, Any]:
    """A mode's and the user's Inductor patches, as far as this torch can say them."""
    try:
        return piece_patches(options, mode)
    except torch_api.Missing:
        return dict(options.inductor)


def _session_of(fake_mode: Any) -> CompileSession:
    """The session of the Dynamo graph whose values live in `fake_mode` (a new one if None)."""
    if fake_mode is None:
        return CompileSession()
    return _sessions.setdefault(fake_mode, CompileSession())


def _outlined(gm: GraphModule, recorded_mode: Any, name: str,
              occurrences: Counter[Hashable] | None,
              patches: dict[str, Any]) -> tuple[GraphModule, GraphModule] | None:
    """`gm` with its blocks as subgraph calls, and that graph as `call_compiled_blocks` makes
    it (its static block subgraphs called by their registry names, `_structure_names`); or
    None (compile it whole) with the reason logged. The pass reads the values Dynamo
    recorded on every node (`example_value`): no node is run again, not even on fake tensors.

    Blocks of a structure that occurs once stay inline, unless outlining them too leaves a
    piece that runs as Python (`_runs_as_python`): SD3's `rest` holds its last block, which
    differs from the others; compiled as a block graph of its own, that one block costs
    less than Inductor's compile of a piece over every block's weights."""
    if recorded_mode is None or torch.is_grad_enabled():
        return None  # no recorded values to key blocks by / training: compile it as Dynamo gave it
    try:
        outlined = outline_blocks(gm, occurrences)
    except CannotCache as exc:
        log.info("wavespeed: compiling %s whole: %s", name, exc)
        return None
    found = outlined, _calling(outlined, patches)
    if _cuda_graphs(patches) or _runs_as_python(found[1], patches):
        return found
    try:
        every = outline_blocks(gm, occurrences, every_block=True)
    except CannotCache:  # a block of its own structure that cannot be a subgraph stays inline
        return found
    calling = _calling(every, patches)
    return (every, calling) if _runs_as_python(calling, patches) else found


def _runs_as_python(piece: GraphModule, patches: dict[str, Any]) -> bool:
    """Whether `piece` (after `call_compiled_blocks`) runs as Python rather than through
    Inductor: it only calls blocks. Under CUDA graphs Inductor compiles even a piece of
    calls: the graph recorded around the piece holds the calls' kernels (so a torch that
    cannot say whether it records them compiles the piece: `python_pieces`)."""
    return calls_only_blocks(piece) and not _cuda_graphs(patches) and torch_api.enabled("python_pieces")


def _calling(outlined: GraphModule, patches: dict[str, Any]) -> GraphModule:
    """`outlined` as `call_compiled_blocks` would make it, nothing compiled."""
    return call_compiled_blocks(outlined, _structure_names(outlined, patches))


def _structures_in(gm: GraphModule) -> Counter[Hashable]:
    try:
        return block_structures(gm)
    except CannotCache:  # `_outlined` says why, when it compiles this piece
        return Counter()


def _compiled_structures(outlined: GraphModule, patches: dict[str, Any],
                         options: CacheOptions) -> tuple[dict[str, Structure], int]:
    """The compiled structure for each static block subgraph of `outlined` (by attribute),
    compiled on its own where no live one has its name, and how many were compiled."""
    call_directly_from_inductor()
    found: dict[str, Structure] = {}
    compiled = 0
    for kind, name in _structure_names(outlined, patches).items():
        structure = registered(name)
        if structure is None:
            subgraph = getattr(outlined, kind)
            structure = _compile_structure(name, subgraph.meta["structure"], subgraph,
                                           _block_patches(patches), options)
            compiled += 1
        found[kind] = structure
    return found, compiled


def _structure_names(outlined: GraphModule, patches: dict[str, Any]) -> dict[str, str]:
    """The registry name of each static block subgraph of `outlined`, by attribute: a hash
    of its structure (the tensor type and dtype of every input included), Inductor's
    patches, the autocast state it is compiled under and wavepass's sources
    (`block_op.source_key`): the name rides in the calling pieces' on-disk cache keys."""
    names = {}
    block_patches = sorted(_block_patches(patches).items())
    for kind, subgraph in outlined.named_children():
        if "structure" in getattr(subgraph, "meta", {}) and is_static(subgraph):
            program = (subgraph.meta["structure"], block_patches, _autocast_state(subgraph), source_key())
            names[kind] = "wp_" + hashlib.sha256(repr(program).encode()).hexdigest()[:20]
    return names


def _block_patches(patches: dict[str, Any]) -> dict[str, Any]:
    """A piece's patches less CUDA graphs: the calling piece may record one around itself."""
    return {**patches, "triton.cudagraphs": False}


def _autocast_state(subgraph: GraphModule) -> tuple[tuple[str, bool, torch.dtype], ...]:
    """Autocast for each device type of the block's inputs: AOTAutograd traces the block
    under it (Dynamo's graph is the same), so a block compiled inside and one outside autocast
    are different programs."""
    values = map(example_value, subgraph.graph.find_nodes(op="placeholder"))
    devices = sorted({v.device.type for v in values if isinstance(v, torch.Tensor)})
    return tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in devices)


def _compile_structure(name: str, key: Hashable, subgraph: GraphModule, patches: dict[str, Any],
                       options: CacheOptions) -> Structure:
    started = time.perf_counter()
    inputs = [example_value(p) for p in subgraph.graph.find_nodes(op="placeholder")]
    (outputs,) = subgraph.graph.find_nodes(op="output")[0].args
    run = _block_callable(name, subgraph, inputs, patches, options)
    log.info("wavespeed: compiled block structure %s (%d nodes) in %.1f s", name,
             len(subgraph.graph.nodes), time.perf_counter() - started)
    return register(Structure(name, key, run, layouts(map(example_value, outputs))))


def _block_callable(name: str, subgraph: GraphModule, inputs: Sequence[Any], patches: dict[str, Any],
                    options: CacheOptions) -> Callable[[list[Any]], Sequence[torch.Tensor]]:
    """A block structure compiled, as the boxed callable `Structure.run` is: Inductor's
    compiled module itself where AOTAutograd's runtime wrappers would do nothing around it.

    A step calls each block graph once per block, and those wrappers (a Dynamo-disabled
    frame, argument flattening, the generated runtime wrapper) cost ~10-15 us a call: 3% of
    a step of the 12-block SD3 benchmark model. They do nothing for a graph on plain tensors
    that mutates no input, returns no alias, uses no effect tokens or functionalized RNG
    (`_runs_bare`), compiled without grad and outside autocast (`_compiled_for_inference`).
    The verdict is read from the artefact this process actually runs: the AOTAutograd
    cache entry it was saved as or loaded from (`torch_api.aot_entry`: its runtime
    metadata and subclass metadata), so a new process that loads the block from the cache
    decides as the process that traced it did, from the same entry, and nothing else on
    disk speaks for it. The bare callable is the compiled module at the end of the
    wrappers' `__wrapped__` chain. Without an entry (the AOTAutograd cache off), the
    metadata of the trace in this process decides; where neither is there, or the chain
    ends elsewhere, or on a torch without the APIs this needs (`bare_block_graphs`), the
    wrappers run."""
    if not torch_api.enabled("bare_block_graphs"):
        unboxed = _unboxed(_compile_fx(subgraph, inputs, patches, _fake_mode_of(inputs), options))
        return lambda args: unboxed(*args)
    traced: list[Any] = []  # AOTAutograd's metadata, where it traced the block in this process

    def capture(gm: GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Any:
        compiled = torch_api.compile_fx_inner(gm, example_inputs, **kwargs)
        context = torch_api.api("TracingContext.try_get")()
        traced.append(getattr(context, "fw_metadata", None) if context is not None else None)
        return compiled

    wrapped = _compile_fx(subgraph, inputs, patches, _fake_mode_of(inputs), options, inner_compile=capture)
    inner = inspect.unwrap(wrapped)
    entry = torch_api.aot_entry(wrapped)
    if entry is not None:
        metadata, subclass = getattr(entry, "runtime_metadata", None), getattr(entry, "maybe_subclass_meta", None)
    else:
        metadata, subclass = (traced[-1] if traced else None), None
    if _compiled_for_inference() and _runs_bare(inner, metadata, subclass, inputs):
        return inner
    unboxed = _unboxed(wrapped)
    return lambda args: unboxed(*args)


def _runs_bare(compiled: Any, metadata: Any, subclass: Any, inputs: Sequence[Any]) -> bool:
    """Whether AOTAutograd's runtime wrappers pass `inputs` to `compiled` (the end of their
    chain) and its outputs back unchanged (see `_block_callable`), by the runtime
    `metadata` (ViewAndMutationMeta) and `subclass` metadata of the graph AOTAutograd
    compiled: one input per input (no duplicate removed, no synthetic base), no tensor
    subclass, no mutated input, no aliased output, no effect tokens, no functionalized RNG.
    Metadata this torch does not have, or none: not bare."""
    output_type = torch_api.api("OutputType")
    try:
        return (isinstance(compiled, torch_api.api("CompiledFxGraph")) and metadata is not None
                and subclass is None
                and not any(isinstance(x, torch.Tensor) and type(x) is not torch.Tensor
                            and not isinstance(x, torch_api.plain_tensor_types()) for x in inputs)
                and len(metadata.input_info) == len(inputs)
                and metadata.num_mutated_inp_runtime_indices == 0
                and metadata.num_intermediate_bases == 0
                and all(o.output_type == output_type.non_alias for o in metadata.output_info)
                and not metadata.tokens and not metadata.is_rng_op_functionalized)
    except AttributeError:  # AOTAutograd's metadata has other fields on this torch
        return False


def _compiled_for_inference() -> bool:
    """No grad, no autocast where the block is compiled. Checked here, outside `compile_fx`:
    inside it AOTAutograd has turned autocast off, so `_runs_bare` cannot see it."""
    return not torch.is_grad_enabled() and not torch_api.api("is_any_autocast_enabled")()


@dataclass(frozen=True)
class _Piece:
    """A compiled piece that calls compiled block structures: it keeps them alive."""

    run: Callable[..., Any]
    structures: tuple[Structure, ...]

    def __call__(self, *args: Any) -> Any:
        return self.run(*args)


def _inductor(gm: GraphModule, example_inputs: Sequence[Any], patches: dict[str, Any],
              fake_mode: Any, options: CacheOptions) -> Callable[..., Any]:
    """`_compile_fx`'s result for a piece (or a whole graph), called as `f(*args)`."""
    if torch_api.enabled("static_inputs"):
        _mark_dynamo_inputs(gm)
    return _unboxed(_compile_fx(gm, example_inputs, patches, fake_mode, options))


def _mark_dynamo_inputs(gm: GraphModule) -> None:
    """Give a piece of a Dynamo graph the marks Dynamo leaves on its own graphs, as Dynamo's
    DDPOptimizer does for the graphs it splits: the compile id, no lifted parameters, and
    each placeholder's source (None for a value another piece computed). From them
    AOTAutograd knows which inputs are static, the weights among them; under CUDA graphs a
    static input is read where it lies, any other is copied into the graph's memory at
    every replay (all the weights: 10% of a step of a 24-block FLUX on an H200, and their
    size again in memory). The placeholders keep Dynamo's `grapharg` and `tensor_dict`
    metadata (the passes copy node metadata); a graph Dynamo marked itself is left as it is.
    AOTAutograd reads these marks in `_try_get_metadata_from_dynamo` (`static_inputs`)."""
    compile_id = torch_api.api("current_compile_id")()
    if (compile_id is None or "dynamo_compile_id" in gm.meta
            or next(gm.parameters(), None) is not None or next(gm.buffers(), None) is not None):
        return
    for node in gm.graph.find_nodes(op="placeholder"):
        grapharg = node.meta.get("grapharg")
        node._dynamo_source = grapharg.source if grapharg is not None else None
    gm.meta["dynamo_compile_id"] = compile_id
    gm._param_name_to_source = {}


def _compile_fx(gm: GraphModule, example_inputs: Sequence[Any], patches: dict[str, Any],
                fake_mode: Any, options: CacheOptions,
                inner_compile: Callable[..., Any] | None = None) -> Callable[..., Any]:
    """compile_fx on one graph, its C++ kernels built as one library (`cpp_bundle`). Graphs
    are compiled on their own, each in a tracing context of its own, so one graph's output
    strides and metadata never leak into another's or Dynamo's. A float that other pieces of
    the Dynamo graph read, and `gm` does not, stays symbolic (`torch_api.floats_read_elsewhere`):
    plain Inductor, which compiles the whole graph, specializes none of them either."""
    elsewhere = _graph_floats.get()
    with (_bundled_cpp_kernels() if _bundles(options) else nullcontext(),
          torch_api.tracing(fake_mode) if fake_mode is not None else nullcontext(),
          torch_api.floats_read_elsewhere(elsewhere - _floats_read(gm)) if elsewhere else nullcontext()):
        return torch_api.compile_fx(gm, list(example_inputs),
                                    inner_compile=inner_compile or torch_api.api("compile_fx_inner"),
                                    config_patches=patches)


def _bundled_cpp_kernels() -> Any:
    from .cpp_bundle import bundled_cpp_kernels

    return bundled_cpp_kernels()


def plain_fallback(gm: GraphModule, example_inputs: Sequence[Any], options: CacheOptions,
                   mode: str | None, reason: str) -> Callable[..., Any]:
    """Compile `gm` without caching, after warning once for this `reason`."""
    warn_once(f"wavespeed: {reason}; compiling without First Block Cache "
              f"({options.compiler} only), results are unchanged")
    return compile_graph(gm, example_inputs, options, mode, name="whole graph (no cache)")


def _placeholders_mode(gm: GraphModule, inputs: int) -> Any:
    """The fake mode of the values Dynamo recorded on `gm`'s placeholders, where it handed
    over real tensors (as it does to a backend for a whole graph; a piece's example inputs
    are fake already). None: no recorded values to key blocks by."""
    recorded = [example_value(p) for p in gm.graph.find_nodes(op="placeholder")]
    return _fake_mode_of(recorded) if len(recorded) == inputs else None


def _fake_mode_of(example_inputs: Sequence[Any]) -> Any:
    """The fake mode of the values Dynamo recorded (not the backend context's own mode)."""
    return torch_api.fake_mode_of(example_inputs)


def _unboxed(compiled: Callable[..., Any]) -> Callable[..., Any]:
    """compile_fx returns either `f(*args)` or a boxed `f(args_list)`; its `_boxed_call` flag is
    copied onto unboxed wrappers too, so the signature of the callable itself decides."""
    parameters = inspect.signature(compiled, follow_wrapped=False).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return compiled
    return lambda *args: compiled(list(args))
