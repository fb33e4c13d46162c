"""Hand graphs to Inductor (or run them as they are), and the one way to fall back.

Every piece the backend produces goes through `compile_graph`, which returns a plain
callable `f(*args) -> tuple`. `plain_fallback` is the single exit for graphs the cache cannot
handle: it says why, once per reason, and compiles the whole graph as `backend="inductor"`
would.
"""

from __future__ import annotations

import inspect
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._guards import TracingContext, tracing
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx import GraphModule
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from .options import CacheOptions

log = logging.getLogger("wavepass")
_warned: set[str] = set()


def compile_graph(gm: GraphModule, example_inputs: Sequence[Any], options: CacheOptions,
                  mode: str | None = None, name: str = "graph") -> Callable[..., Any]:
    """Compile `gm` with the configured compiler; the result is called as `f(*args)`."""
    if options.compiler == "eager":
        return gm
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = {**(list_mode_options(mode) if mode else {}), **options.inductor}
    fake_mode = _fake_mode_of(example_inputs)
    started = time.perf_counter()
    if fake_mode is not None:
        # Pieces are compiled on their own, each in a tracing context of its own, so one
        # piece's output strides and metadata never leak into another's or Dynamo's.
        FakeTensorProp(gm, mode=fake_mode).propagate_dont_convert_inputs(*example_inputs)
        with tracing(TracingContext(fake_mode)):
            compiled = compile_fx(gm, list(example_inputs), config_patches=patches)
    else:
        compiled = compile_fx(gm, list(example_inputs), config_patches=patches)
    log.info("wavespeed: compiled %s (%d nodes) in %.1f s", name, len(gm.graph.nodes),
             time.perf_counter() - started)
    return _unboxed(compiled)


def plain_fallback(gm: GraphModule, example_inputs: Sequence[Any], options: CacheOptions,
                   mode: str | None, reason: str) -> Callable[..., Any]:
    """Compile `gm` without caching, after warning once for this `reason`."""
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"wavespeed: {reason}; compiling without First Block Cache "
                      f"({options.compiler} only), results are unchanged", stacklevel=2)
    return compile_graph(gm, example_inputs, options, mode, name="whole graph (no cache)")



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
