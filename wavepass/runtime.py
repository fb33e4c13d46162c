"""The cached program Dynamo calls, and all of wavepass's mutable state.

One `CachedProgram` per compiled graph runs head, decides, then runs rest or adds the stored
residuals, then runs tail. Its state is kept per cache context (see `cache_context`):

    state        meaning                                           cleared when
    -----------  ------------------------------------------------  ---------------------------
    signal       first-block residual at the last full call        reset(), new signature,
    residuals    rest's residual per stream at that call           an exception in a call
    calls        calls since the last clear (for warmup_steps)
    hits_in_row  consecutive skipped calls

The *signature* of a call is the shapes, dtypes and devices of its activations and the
identity and version counters of its parameters: a new resolution or batch, another model,
or weights changed by a LoRA each start a new generation by themselves.

Counting for `stats()` (calls, hits, recent decisions) is per program and cleared only by
`reset()`. Passes and the backend hold no state; everything mutable lives here.
"""

from __future__ import annotations

import itertools
import operator
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

from .options import CacheOptions

DEFAULT_CONTEXT = "default"
_DECISIONS_KEPT = 10_000
_context: ContextVar[str] = ContextVar("wavepass_cache_context", default=DEFAULT_CONTEXT)
_skipping_allowed: ContextVar[bool] = ContextVar("wavepass_skipping_allowed", default=True)
_step_key: ContextVar[Any] = ContextVar("wavepass_step", default=None)
_sequence = itertools.count()
_programs: weakref.WeakSet[CachedProgram] = weakref.WeakSet()


@dataclass(frozen=True)
class Stats:
    """What the cache did since the last `reset`: `decisions[i]` is True where call i skipped."""

    calls: int
    hits: int
    decisions: tuple[bool, ...]

    def __str__(self) -> str:
        return f"wavespeed: skipped {self.hits} of {self.calls} model calls"


@contextmanager
def cache_context(name: str) -> Iterator[None]:
    """Keep separate cache state for the calls made inside, e.g. per CFG branch."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"wavepass.cache_context: name must be a non-empty string, got {name!r}")
    token = _context.set(name)
    try:
        yield
    finally:
        _context.reset(token)


def current_context() -> str:
    """The name of the cache context calls are made in now (`DEFAULT_CONTEXT` outside any)."""
    return _context.get()


@contextmanager
def skipping(allowed: bool) -> Iterator[None]:
    """`with wavepass.skipping(False):` calls inside run every block (and refresh the cache).

    Integrations use it for the start/end window of sampling: outside it, every step computes.
    """
    token = _skipping_allowed.set(bool(allowed))
    try:
        yield
    finally:
        _skipping_allowed.reset(token)


@contextmanager
def same_step(key: Any) -> Iterator[None]:
    """`with wavepass.same_step(key):` calls of one model made with an equal `key` (e.g. the
    sampling step's timestep) decide together: the first decides, later ones follow it.

    For samplers that split one step into several calls (cond and uncond chunks, in separate
    cache contexts): they all skip or all compute. A follower that has nothing stored to
    reuse computes.
    """
    token = _step_key.set(key)
    try:
        yield
    finally:
        _step_key.reset(token)


@dataclass
class _State:
    signature: tuple | None = None
    signal: torch.Tensor | None = None
    residuals: tuple[torch.Tensor, ...] = ()
    strides: tuple[tuple[int, ...], ...] = ()  # of each stream's result at that call
    calls: int = 0
    hits_in_row: int = 0

    def clear(self) -> None:
        self.signal, self.residuals, self.strides, self.calls, self.hits_in_row = None, (), (), 0, 0


@dataclass(frozen=True)
class Wiring:
    """Value slots: 0..P-1 are the graph's inputs; each piece reads and writes slots."""

    num_slots: int
    head_in: tuple[int, ...]
    head_out: tuple[int, ...]
    rest_in: tuple[int, ...]
    rest_out: tuple[int, ...]
    tail_in: tuple[int, ...]
    # per cached residual: (source slots, None or the dim they are concatenated along, result slot)
    streams: tuple[tuple[tuple[int, ...], int | None, int], ...]
    parameters: tuple[int, ...]
    activations: tuple[int, ...]
    # (slot, sizes, strides) rest and tail were compiled for, of values passed between pieces
    layouts: tuple[tuple[int, tuple[int, ...], tuple[int, ...]], ...] = ()


class CachedProgram:
    """The callable the `wavespeed` backend returns to Dynamo for a graph with blocks."""

    def __init__(self, head: Callable, rest: Callable, tail: Callable, wiring: Wiring,
                 options: CacheOptions, blocks: tuple[str, ...], description: str,
                 stores_copies: bool = False) -> None:
        self._head, self._rest, self._tail = head, rest, tail
        # Pieces run as CUDA graphs return outputs that their next replay overwrites: the
        # signal and residuals kept for later calls are then copies.
        self._kept: Callable[[torch.Tensor], torch.Tensor] = torch.clone if stores_copies else _itself
        self.blocks = blocks
        self._wiring = wiring
        self._head_args, self._rest_args, self._tail_args = map(_picker, (wiring.head_in, wiring.rest_in, wiring.tail_in))
        self._parameters_of, self._activations_of = map(_picker, (wiring.parameters, wiring.activations))
        self._options = options
        self.description = description
        self._states: dict[str, _State] = {}
        self._owner: tuple[weakref.ref, ...] = ()  # the parameters of the model that ran last
        self._step: tuple[Any, bool] | None = None  # (same_step key, its decision)
        self._calls = self._hits = 0
        self._decisions: deque[tuple[int, bool]] = deque(maxlen=_DECISIONS_KEPT)
        _programs.add(self)

    def __call__(self, *args: Any) -> Any:
        w = self._wiring
        state = self._states.setdefault(_context.get(), _State())
        signature = self._signature(args)
        if signature != state.signature:
            state.clear()
            state.signature = signature
            self._owner = tuple(map(weakref.ref, self._parameters_of(args)))
        values = list(args) + [None] * (w.num_slots - len(args))
        try:
            outputs = self._head(*self._head_args(values))
            for slot, value in zip(w.head_out, outputs):
                values[slot] = value
            skip = self._decide(state, outputs[-1])
            if skip:
                for (sources, dim, result), residual, stride in zip(w.streams, state.residuals, state.strides):
                    source = values[sources[0]] if dim is None else torch.cat([values[i] for i in sources], dim)
                    values[result] = _add_strided(source, residual, stride)
            else:
                outputs_rest = self._rest(*self._rest_args(values))
                for slot, value in zip(w.rest_out, outputs_rest):
                    values[slot] = value
                if self._options.may_skip:
                    state.signal = self._kept(outputs[-1])
                    state.residuals = tuple(map(self._kept, outputs_rest[len(w.rest_out):]))
                    state.strides = tuple(values[result].stride() for *_, result in w.streams)
            _check_layouts(values, w.layouts)
            result = self._tail(*self._tail_args(values))
        except BaseException:
            state.clear()
            raise
        self._calls += 1
        self._hits += skip
        self._decisions.append((next(_sequence), skip))
        return result

    def _decide(self, state: _State, signal: torch.Tensor) -> bool:
        """First Block Cache, with calls of one `same_step` following the first one's decision."""
        state.calls += 1
        key = _step_key.get()
        if key is not None and self._step is not None and self._step[0] == key:
            skip = self._step[1] and state.signal is not None and _skipping_allowed.get()
            state.hits_in_row = state.hits_in_row + 1 if skip else 0
            return skip
        skip = self._decide_alone(state, signal)
        self._step = (key, skip) if key is not None else None
        return skip

    def _decide_alone(self, state: _State, signal: torch.Tensor) -> bool:
        """First Block Cache: skip when the first-block residual barely moved."""
        opts = self._options
        if (
            not opts.may_skip
            or not _skipping_allowed.get()
            or state.signal is None
            or state.calls <= opts.warmup_steps
            or 0 < opts.max_consecutive_cache_hits <= state.hits_in_row
        ):
            state.hits_in_row = 0
            return False
        skip = relative_l1(signal, state.signal) < opts.residual_diff_threshold
        state.hits_in_row = state.hits_in_row + 1 if skip else 0
        return skip

    def _signature(self, args: Sequence[Any]) -> tuple:
        activations = tuple(
            (a.shape, a.dtype, a.device) if isinstance(a, torch.Tensor) else a
            for a in self._activations_of(args)
        )
        parameters = self._parameters_of(args)
        return activations, tuple(map(id, parameters)), _versions(parameters)

    def reset(self) -> None:
        self._states.clear()
        self._step = None
        self._calls = self._hits = 0
        self._decisions.clear()

    def owned_by(self, parameter_ids: set[int]) -> bool:
        """Whether the model with these parameter ids ran this program last: it shares a
        parameter with that run (held by weak references: while one lives, no other object
        can have its id; a LoRA that replaces some weights leaves the others shared)."""
        return any((p := ref()) is not None and id(p) in parameter_ids for ref in self._owner)

    def stats(self) -> tuple[int, int, list[tuple[int, bool]]]:
        return self._calls, self._hits, list(self._decisions)


def _itself(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _check_layouts(values: Sequence[Any], layouts: tuple[tuple[int, tuple, tuple], ...]) -> None:
    """Compiled pieces run without Inductor's per-input size asserts (hundreds of weights,
    which Dynamo's guards cover); the few values passed between pieces are checked here."""
    for slot, sizes, strides in layouts:
        value = values[slot]
        if value is not None and (value.shape != sizes or value.stride() != strides):
            raise RuntimeError(
                f"wavespeed: internal error: value {slot} passed between compiled pieces has sizes "
                f"{tuple(value.shape)} and strides {value.stride()}, compiled for {sizes} and {strides}; "
                "please report it (torch.compile(model, backend='inductor') compiles without the cache)")


def _picker(slots: tuple[int, ...]) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """`values -> tuple(values[i] for i in slots)`, at C speed (called several times a step
    with hundreds of slots: every weight is an argument)."""
    if len(slots) == 1:
        return lambda values: (values[slots[0]],)
    return operator.itemgetter(*slots) if slots else (lambda values: ())


def _versions(parameters: Sequence[torch.Tensor]) -> tuple[int | None, ...]:
    """Each parameter's version counter (None for an inference tensor, which has none)."""
    try:
        return tuple(map(_version_of, parameters))
    except RuntimeError:  # an inference tensor among them
        return tuple(None if p.is_inference() else p._version for p in parameters)


_version_of = operator.attrgetter("_version")


def _add_strided(source: torch.Tensor, residual: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """source + residual, laid out as the skipped blocks lay out their result (a slice of a
    concatenation is not contiguous, and compiled code after it expects its strides)."""
    out = torch.empty_strided(source.shape, stride, dtype=source.dtype, device=source.device)
    return torch.add(source, residual, out=out)


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """mean|current - previous| / mean|previous|, in float32; inf or nan never skip."""
    change = torch.mean(torch.abs(current - previous), dtype=torch.float32)
    scale = torch.mean(torch.abs(previous), dtype=torch.float32)
    return (change / scale).item()


def programs_of(model: Any | None) -> list[CachedProgram]:
    """The cached programs that last ran with `model`'s parameters (all of them for None).

    `model` is a torch.nn.Module (the compiled model or the original one) or an object that
    holds one as `.model`, such as the MODEL (a ComfyUI ModelPatcher) the ComfyUI nodes return.
    """
    if model is None:
        return list(_programs)
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "model", None)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(
            f"wavepass: expected a torch.nn.Module (the compiled model or the original one) or "
            f"an object holding one as `.model` (a ComfyUI MODEL), got {type(model).__name__}"
        )
    ids = {id(p) for p in module.parameters()}
    return [p for p in _programs if p.owned_by(ids)]


def reset(model: Any | None = None) -> None:
    """Start a new generation: forget stored residuals (of `model`, or of every model)."""
    for program in programs_of(model):
        program.reset()


def stats(model: Any | None = None) -> Stats:
    """Calls, skipped calls and per-call decisions since the last `reset` of `model`."""
    calls = hits = 0
    decisions: list[tuple[int, bool]] = []
    for program in programs_of(model):
        c, h, d = program.stats()
        calls, hits = calls + c, hits + h
        decisions += d
    return Stats(calls, hits, tuple(skip for _, skip in sorted(decisions)))
