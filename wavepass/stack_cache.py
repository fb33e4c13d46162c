"""First Block Cache around a block stack that Dynamo splits into several graphs.

Where a graph break inside a block (MoE routing, `nonzero`, `.item()`, a print) or between
blocks keeps the stack out of one graph, the backend cannot cut a graph at the first block.
It then learns the stack from the module tree (`module_stack.py`) and puts this cache around
it at the module level, while every graph Dynamo makes of the blocks is still compiled by the
backend (`backend.py`: fragments).

    the owner's forward (Python)             each block of the anchor container
    -----------------------------            -----------------------------------------------
    x = embed(...)                           blocks[0]:  run; signal = out - in; decide
    for block in self.blocks:                blocks[1..n-2]: computing: run (compiled frames)
        x = glue(block(x, ...))                              skipping: return the inputs
    return head(x)                           blocks[n-1]: computing: run, keep out - base
                                                          skipping: return inputs + residual

The rule is First Block Cache with the settings, contexts, `same_step` and stats of
`runtime.CachedProgram`. Streams are paired at run time: each tensor a block returns
continues the first unused tensor among its arguments with the same shape, dtype and device
(a block that returns anything else, or a last block whose streams the second block's
arguments do not hold, turns the cache off for the model with a warning that says so).
The residual a skipping call adds is `last block's output - second block's input` of the last
computing call, added to the input the last block receives when the blocks between pass their
inputs through. Where the code between blocks only forwards the streams (most models) that
is First Block Cache's `first block's output + residual`; where it concatenates per-block
tokens and slices them off again (HiDream), the tokens the model keeps get exactly that.

The cache stays on the blocks (their `forward`, an instance attribute) for the life of the
model. A call made outside a wavespeed `torch.compile` (the model run eagerly, or compiled
with another backend) runs every block as written; Dynamo tracing a caller of a block with
another backend stops at it (a graph break per block, in a model that had them anyway).

State per cache context, as in `runtime`: signal, residuals, calls, hits in a row, cleared
at a new signature (arguments of the first block, the owner's parameters and their versions)
or after a call that failed between its first and its last block (an exception in a block, or
in the code between blocks: the next call finds the last one unfinished); plus the call in
progress. A call that fails before its first block changed nothing. The first model call after the
stack is learned runs every block uncached (the stack is learned while it runs).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import torch_api
from .module_stack import Stack, enclosing_stack
from .notices import warn_once
from .options import CacheOptions, CacheSettings
from .runtime import _context, _Deciding, _Program, _ran, _State, _versions

_installed: weakref.WeakKeyDictionary[torch.nn.Module, StackCache] = weakref.WeakKeyDictionary()
_depth = threading.local()  # block calls of an installed stack running on this thread


class Unpairable(Exception):
    """A block's outputs do not continue its inputs (the message says which)."""


@dataclass
class _Call:
    """A model call in progress: its decision, the next block it expects, its signal, and
    (computing) copies of the second block's arguments that the residual is taken against."""

    skip: bool
    settings: CacheSettings
    signal: torch.Tensor | None
    next: int = 1
    base: list[Any] | None = None


@dataclass
class _Run:
    """A block about to run whose outputs `_after` reads."""

    state: _StackState
    index: int
    inputs: list[Any]
    settings: CacheSettings


_PASS = object()  # `_before`: run the block, the cache is not involved


@dataclass
class _StackState(_State):
    # per block index: how to build its outputs from its arguments (see `_pair`)
    pairings: dict[int, tuple[Callable[[list[Any]], Any], tuple[int, ...]]] = field(default_factory=dict)
    call: _Call | None = None

    def clear(self) -> None:
        super().clear()
        self.pairings, self.call = {}, None


class StackCache(_Deciding):
    """The cache put around `stack` (one per owner module); `backend` is the function whose
    `torch.compile` must be running a call for the cache to act (otherwise, e.g. the model
    called eagerly, every block runs as written)."""

    def __init__(self, stack: Stack, backend: Callable[..., Any]) -> None:
        super().__init__((), CacheSettings())
        self._module = weakref.ref(stack.owner)
        self._backend = backend
        self._blocks = stack.blocks
        self.blocks = tuple(f"{stack.container}.{i}" for i in range(len(self._blocks)))
        self.description = (f"{type(stack.owner).__name__}.{stack.container}[0..{len(self._blocks) - 1}] "
                            f"at the module level (the stack does not fit in one graph)")
        self._states: dict[str, _StackState] = {}
        self._options: tuple[Any, CacheSettings] | None = None  # (options dict, its settings)
        self._parameter_ids: tuple[int, ...] = ()
        # the cache's own code runs as Python, never traced (disabled here, not where the
        # methods are defined: `import wavepass` imports no private torch module)
        self._before, self._after, self._abort = map(torch.compiler.disable, (self._before, self._after, self._abort))
        self._parameter_slots = [(m._parameters, name) for m in stack.owner.modules() for name in m._parameters]
        self._signature(())  # records the owner's parameters, for `stats(model)`
        for index, block in enumerate(self._blocks):
            block.forward = self._entry(index, block.forward)

    def _entry(self, index: int, forward: Callable[..., Any]) -> Callable[..., Any]:
        callback = torch_api.api("get_eval_frame_callback")  # a builtin: Dynamo makes no frame of it

        def entry(*args: Any, **kwargs: Any) -> Any:
            _depth.value = getattr(_depth, "value", 0) + 1
            try:
                plan = self._before(callback(), index, args, kwargs)
                if plan is _PASS:
                    return forward(*args, **kwargs)
                if not isinstance(plan, _Run):
                    return plan  # the outputs of a skipped block
                return self._after(plan, forward(*args, **kwargs))
            except BaseException:
                self._abort()
                raise
            finally:
                _depth.value -= 1

        # Dynamo runs this frame as Python (the cache's own code too: `_before` and `_after`
        # are disabled) and compiles the block's forward, called here, as a frame of its own.
        # (`torch.compiler.disable(recursive=False)` does the same, at ~0.3 ms a call.)
        torch_api.api("skip_code")(entry.__code__)
        return entry

    def _before(self, callback: Any, index: int, args: tuple, kwargs: dict) -> Any:
        """Before block `index` runs: `_PASS` (run it, the cache is not involved), a `_Run`
        (run it, then `_after`), or the outputs it returns without running. `callback`:
        Dynamo's frame callback where the block was called (this function runs without one)."""
        if self.reason is not None or not self._wavespeed_runs(callback):
            return _PASS
        state = self._states.setdefault(_context.get(), _StackState())
        if index == 0:
            _ran.calls = getattr(_ran, "calls", 0) + 1
            inputs, _ = _flatten((args, kwargs))
            signature = self._signature(inputs)
            if signature != state.signature or state.call is not None:  # or the last call failed
                state.clear()
                state.signature = signature
            return _Run(state, index, inputs, self.settings())
        call, last = state.call, index == len(self._blocks) - 1
        if call is None or call.next != index:  # this model call did not start at block 0
            state.call = None
            if last:
                self._count(False)
            return _PASS
        call.next += 1
        if not call.settings.may_skip:  # nothing to keep: the block runs as written, the last counted
            return _Run(state, index, [], call.settings) if last else _PASS
        inputs, _ = _flatten((args, kwargs))
        if not call.skip:
            if index == 1:  # before the block can write into them
                call.base = [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]
            return _Run(state, index, inputs, call.settings)
        rebuild, pairing = state.pairings[index]
        values = [inputs[j] for j in pairing]
        if last:
            if not all(map(_alike, values, state.residuals)):
                self._turn_off(f"the arguments of {self.blocks[-1]} changed shape within a generation")
                raise RuntimeError(f"wavespeed: {self.reason}; run the model again")
            values = [value + residual for value, residual in zip(values, state.residuals_now(call.settings))]
            state.call = None
            self._count(True)
        return rebuild(values)

    def _after(self, run: _Run, outputs: Any) -> Any:
        """After block `run.index` ran: decide (block 0), or keep what the cache needs."""
        state, index, settings = run.state, run.index, run.settings
        last = index == len(self._blocks) - 1
        signal = None
        try:
            if settings.may_skip:
                leaves, rebuild = _flatten(outputs)
                pairing = _pair(run.inputs, leaves, self.blocks[index])
                state.pairings[index] = (rebuild, pairing)
                if index == 0:
                    main = max(range(len(leaves)), key=lambda k: leaves[k].numel())
                    signal = leaves[main] - run.inputs[pairing[main]]
                elif last:
                    residuals = _residuals(leaves, pairing, state.call.base, self.blocks)
                    state.keep(state.call.signal, residuals, settings)
        except Unpairable as exc:
            self._turn_off(str(exc))
            return outputs
        if index == 0:
            state.call = _Call(self._decide(state, signal, settings), settings, signal)
        elif last:
            state.call = None
            self._count(False)
        return outputs

    def _abort(self) -> None:
        """An exception inside a block: what this context kept is stale."""
        state = self._states.get(_context.get())
        if state is not None:
            state.clear()

    def _wavespeed_runs(self, callback: Any) -> bool:
        """Whether `callback` is the frame callback of a wavespeed compile; if so, its
        `options=` become the defaults `settings()` reads."""
        running = torch_api.backend_of(callback)
        if running is None or running[0] is not self._backend:
            return False
        options = running[1].get("options")
        if self._options is None or self._options[0] is not options:
            self._options = (options, CacheOptions.from_dict(options).settings)
        self._defaults = self._options[1]
        return True

    def _signature(self, inputs: Sequence[Any]) -> tuple:
        # each parameter slot read anew (a LoRA may replace a parameter), without walking
        # the module tree every call
        parameters = tuple(p for slots, name in self._parameter_slots if (p := slots.get(name)) is not None)
        ids = tuple(map(id, parameters))
        if ids != self._parameter_ids:
            self._parameter_ids = ids
            self._owner = tuple(map(weakref.ref, parameters))
        shapes = tuple((x.shape, x.dtype, x.device) if isinstance(x, torch.Tensor) else None for x in inputs)
        return shapes, ids, _versions(parameters)

    def _turn_off(self, why: str) -> None:
        module = self._module()
        self.reason = (f"{why}; the blocks of {type(module).__name__} run every call "
                       f"(First Block Cache needs each block output to continue an input of its shape)")
        self._states.clear()
        warn_once(f"wavespeed: {self.reason}")

    def reset(self) -> None:
        super().reset()
        self._states.clear()


class FragmentProgram(_Program):
    """A graph of a frame inside a split stack (a block, or part of one), compiled without
    the cache: the stack's `StackCache` decides, these only run. Not counted by `stats`.

    `adopts`: the graph is of a block of the anchor container. A call of it outside the
    cache's wrappers means another instance of the owner (a second checkpoint of the same
    class shares Dynamo's compiled code) is running its blocks uncached: the cache is put
    around that owner's stack too, from the call stack, as the backend did for the first.
    """

    counted = False

    def __init__(self, compiled: Callable[..., Any], adopts: bool, backend: Callable[..., Any]) -> None:
        super().__init__(())
        self._compiled = compiled
        self._adopts = adopts
        self._backend = backend

    def __call__(self, *args: Any) -> Any:
        _ran.calls = getattr(_ran, "calls", 0) + 1
        if self._adopts and not getattr(_depth, "value", 0):
            adopt(enclosing_stack(), self._backend)
        return self._compiled(*args)


def adopt(stack: Stack | None, backend: Callable[..., Any]) -> StackCache | None:
    """The cache around `stack`'s owner, put there now if it has none."""
    if stack is None or not torch_api.enabled("split_stacks"):
        return None
    cache = _installed.get(stack.owner)
    if cache is None:
        cache = _installed[stack.owner] = StackCache(stack, backend)
    return cache


def _residuals(leaves: Sequence[torch.Tensor], pairing: tuple[int, ...], base: list[Any] | None,
               blocks: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """`output - base` per output of the last block, `base` being the second block's
    argument at the position the last block's output continues."""
    residuals = []
    for k, (value, j) in enumerate(zip(leaves, pairing)):
        start = base[j] if base is not None and j < len(base) else None
        if not isinstance(start, torch.Tensor) or not _alike(start, value):
            raise Unpairable(f"output {k} of {blocks[-1]} continues argument {j}, which {blocks[1]} "
                             f"does not receive with its shape")
        residuals.append(value - start)
    return tuple(residuals)


def _pair(inputs: Sequence[Any], outputs: Sequence[Any], block: str) -> tuple[int, ...]:
    """Per output tensor, the first unused input tensor it continues (same shape, dtype and
    device)."""
    used: set[int] = set()
    pairing = []
    for k, value in enumerate(outputs):
        if not isinstance(value, torch.Tensor):
            raise Unpairable(f"{block} returns a {type(value).__name__} as output {k}")
        j = next((j for j, x in enumerate(inputs)
                  if j not in used and isinstance(x, torch.Tensor) and _alike(x, value)), None)
        if j is None:
            raise Unpairable(f"output {k} of {block} (shape {tuple(value.shape)}) has no argument of its "
                             f"shape, dtype and device to continue")
        used.add(j)
        pairing.append(j)
    return tuple(pairing)


def _alike(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


def _flatten(value: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
    """The leaves of nested tuples, lists and dicts, and a function that builds the same
    structure from new leaves."""
    if isinstance(value, (tuple, list)):
        parts = [_flatten(item) for item in value]
        kind = type(value)

        def rebuild(leaves: list[Any]) -> Any:
            items, start = [], 0
            for part_leaves, part_rebuild in parts:
                items.append(part_rebuild(leaves[start:start + len(part_leaves)]))
                start += len(part_leaves)
            return kind(items) if kind in (tuple, list) else kind(*items)
        return [leaf for part_leaves, _ in parts for leaf in part_leaves], rebuild
    if isinstance(value, dict):
        keys = list(value)
        values_leaves, values_rebuild = _flatten([value[k] for k in keys])
        return values_leaves, lambda leaves: dict(zip(keys, values_rebuild(leaves)))
    return [value], lambda leaves: leaves[0]
