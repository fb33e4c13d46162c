"""Hand graphs to Inductor (or run them as they are), and the one way to fall back.

Every piece the backend produces goes through `compile_graph`, which returns a plain
callable `f(*args) -> tuple`. `plain_fallback` is the single exit for graphs the cache cannot
handle: it says why, once per reason, and compiles the whole graph as `backend="inductor"`
would.

Compile once per block kind: `compile_graph` splits a piece into its blocks and the glue
between them (`passes/split_blocks.py`), compiles each distinct block structure once and
calls that body for every block of the structure with the block's own weights. Compiled
bodies are shared by all pieces of one Dynamo graph (one `CompileSession` per fake mode, so
the head's first block and `rest`'s blocks share one body). Glue runs shorter than
`GLUE_MIN_OPS` ops run as they are: compiling them costs seconds of C++ compilation and
saves microseconds per call. Counts land in `torch._dynamo.utils.counters["wavepass"]`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import operator
import time
import warnings
import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._dynamo.utils import counters
from torch._guards import TracingContext, tracing
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx import GraphModule
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .options import CacheOptions
from .passes.errors import CannotCache
from .passes.fx_facts import example_value
from .passes.split_blocks import split_blocks, structural_key

log = logging.getLogger("wavepass")
_warned: set[str] = set()
GLUE_MIN_OPS = 8


@dataclass
class CompileSession:
    """What was compiled for one Dynamo graph: block bodies by structural key, and totals."""

    bodies: dict[Hashable, Callable[..., Any]] = field(default_factory=dict)
    pieces: int = 0
    blocks: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"{self.pieces} piece(s), {self.blocks} block(s) in {len(self.bodies)} distinct "
                f"compiled block graph(s), {self.seconds:.1f} s compiling")


_sessions: weakref.WeakKeyDictionary[FakeTensorMode, CompileSession] = weakref.WeakKeyDictionary()


def compile_graph(gm: GraphModule, example_inputs: Sequence[Any], options: CacheOptions,
                  mode: str | None = None, name: str = "graph") -> Callable[..., Any]:
    """Compile `gm` with the configured compiler; the result is called as `f(*args)`."""
    if options.compiler == "eager":
        return gm
    from torch._inductor import list_mode_options

    patches = {**(list_mode_options(mode) if mode else {}), **options.inductor}
    fake_mode = _fake_mode_of(example_inputs)
    started = time.perf_counter()
    if fake_mode is not None:
        _propagate(gm, example_inputs, fake_mode)
    recorded = _recorded(gm, example_inputs)
    recorded_mode = _fake_mode_of(recorded)
    session = _session_of(recorded_mode)
    outer = _split(gm, recorded, name, propagated=fake_mode is not None) if options.split_blocks else None
    parts = None if outer is None else _compiled_parts(outer, session, patches, recorded_mode, name)
    if parts is None:
        compiled, detail = _inductor(gm, example_inputs, patches, fake_mode), "whole"
        counters["wavepass"]["whole_graphs"] += 1
    else:
        compiled, detail = parts
    seconds = time.perf_counter() - started
    session.pieces += 1
    session.seconds += seconds
    counters["wavepass"]["pieces"] += 1
    log.info("wavespeed: compiled %s (%d nodes, %s) in %.1f s", name, len(gm.graph.nodes),
             detail, seconds)
    log.info("wavespeed: this graph so far: %s", session.summary())
    return compiled


def _session_of(fake_mode: FakeTensorMode | None) -> CompileSession:
    """The session of the Dynamo graph whose values live in `fake_mode` (a new one if None)."""
    if fake_mode is None:
        return CompileSession()
    return _sessions.setdefault(fake_mode, CompileSession())


def _split(gm: GraphModule, recorded: Sequence[Any], name: str, propagated: bool) -> GraphModule | None:
    """`gm` split into blocks and glue, or None (compile it whole) with the reason logged.
    `propagated`: `gm`'s values are fresh already (its example inputs were the fake ones)."""
    fake_mode = _fake_mode_of(recorded)
    if fake_mode is None or torch.is_grad_enabled():
        return None  # no recorded values to key blocks by / training: compile it as Dynamo gave it
    try:
        if not propagated:
            _propagate(gm, recorded, fake_mode)
    except Exception as exc:  # e.g. `.item()` of a symbolic float under dynamic=True
        log.info("wavespeed: compiling %s whole: its fake values cannot be propagated (%s)",
                 name, str(exc).splitlines()[0])
        return None
    try:
        return split_blocks(gm)
    except CannotCache as exc:
        log.info("wavespeed: compiling %s whole: %s", name, exc)
        return None


def _compiled_parts(outer: GraphModule, session: CompileSession, patches: dict[str, Any],
                    fake_mode: FakeTensorMode, name: str) -> tuple[GraphModule, str] | None:
    """`_compile_parts`, or None (compile the piece whole) where Inductor refuses a part on
    its own, e.g. a part that reads a tensor's value (`.item()`) Dynamo made symbolic."""
    compile_one = functools.partial(_inductor, patches=patches, fake_mode=fake_mode)
    try:
        return _compile_parts(outer, session, compile_one)
    except Exception as exc:
        log.info("wavespeed: compiling %s whole: a part failed to compile on its own (%s: %s)",
                 name, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None


def _compile_parts(outer: GraphModule, session: CompileSession,
                   compile_one: Callable[..., Callable[..., Any]]) -> tuple[GraphModule, str]:
    """Bind every submodule call of `outer` to a compiled body (or the glue as it is)."""
    blocks = new = glue = 0
    for node in outer.graph.find_nodes(op="call_module"):
        sub = outer.get_submodule(node.target)
        inputs = [arg.meta["val"] for arg in node.args]
        if sub.meta["block"] is None:
            compiled = _worth_compiling(sub)
            body = compile_one(sub, inputs) if compiled else sub.forward
            glue += compiled
        else:
            key = structural_key(sub, inputs)
            if key not in session.bodies:
                session.bodies[key] = compile_one(sub, inputs)
                new += 1
            body = session.bodies[key]
            blocks += 1
        # The outer graph's code calls `self.<target>(...)`: a plain attribute in place of
        # the submodule makes that a direct call of the compiled body.
        delattr(outer, node.target)
        setattr(outer, node.target, body)
    session.blocks += blocks
    counters["wavepass"]["blocks"] += blocks
    counters["wavepass"]["block_graphs"] += new
    counters["wavepass"]["glue_graphs"] += glue
    return outer, f"{blocks} block(s), {new} new block graph(s), {glue} compiled glue graph(s)"


def _worth_compiling(glue: GraphModule) -> bool:
    ops = [n for n in glue.graph.nodes
           if n.op.startswith("call_") and n.target is not operator.getitem]
    return len(ops) >= GLUE_MIN_OPS


def _propagate(gm: GraphModule, example_inputs: Sequence[Any], fake_mode: FakeTensorMode) -> None:
    """Fresh `meta["val"]` for every node of `gm`, from `example_inputs` (a split graph's parts
    copy theirs from it)."""
    FakeTensorProp(gm, mode=fake_mode).propagate_dont_convert_inputs(*example_inputs)


def _inductor(gm: GraphModule, example_inputs: Sequence[Any], patches: dict[str, Any],
              fake_mode: FakeTensorMode | None) -> Callable[..., Any]:
    """compile_fx on one graph. Graphs are compiled on their own, each in a tracing context
    of its own, so one graph's output strides and metadata never leak into another's or
    Dynamo's."""
    from torch._inductor.compile_fx import compile_fx

    if fake_mode is None:
        return _unboxed(compile_fx(gm, list(example_inputs), config_patches=patches))
    with tracing(TracingContext(fake_mode)):
        return _unboxed(compile_fx(gm, list(example_inputs), config_patches=patches))


def plain_fallback(gm: GraphModule, example_inputs: Sequence[Any], options: CacheOptions,
                   mode: str | None, reason: str) -> Callable[..., Any]:
    """Compile `gm` without caching, after warning once for this `reason`."""
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"wavespeed: {reason}; compiling without First Block Cache "
                      f"({options.compiler} only), results are unchanged", stacklevel=2)
    return compile_graph(gm, example_inputs, options, mode, name="whole graph (no cache)")


def _recorded(gm: GraphModule, example_inputs: Sequence[Any]) -> Sequence[Any]:
    """The fake values Dynamo recorded for `gm`'s inputs where it handed over real tensors
    (as it does to a backend for a whole graph): blocks are keyed and compiled by them."""
    if _fake_mode_of(example_inputs) is not None:
        return example_inputs
    recorded = [example_value(p) for p in gm.graph.find_nodes(op="placeholder")]
    if len(recorded) == len(example_inputs) and _fake_mode_of(recorded) is not None:
        return recorded
    return example_inputs


def _fake_mode_of(example_inputs: Sequence[Any]) -> FakeTensorMode | None:
    """The fake mode of the values Dynamo recorded (not the backend context's own mode)."""
    return next((x.fake_mode for x in example_inputs if isinstance(x, FakeTensor)), None)


def _unboxed(compiled: Callable[..., Any]) -> Callable[..., Any]:
    """compile_fx returns either `f(*args)` or a boxed `f(args_list)`; its `_boxed_call` flag is
    copied onto unboxed wrappers too, so the signature of the callable itself decides."""
    parameters = inspect.signature(compiled, follow_wrapped=False).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return compiled
    return lambda *args: compiled(list(args))
