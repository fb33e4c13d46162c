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

The settings of the decision rule (`CacheSettings`: threshold, hit limit, warm-up) are
read at every call: the program's defaults (the backend's `options=`), overridden by
`cache_settings(...)` around the call. Changing them compiles nothing.

Counting for `stats()` (calls, hits, recent decisions) is per program and cleared only by
`reset()`. A graph the backend compiled without the cache (`UncachedProgram`) counts its
calls with the reason; a call of a watched model that reached no program of ours at all
(`watch`: Dynamo stopped compiling it) is counted against the model with the reason
`diagnosis.py` finds. Passes and the backend hold no state; everything mutable lives here.
"""

from __future__ import annotations

import itertools
import operator
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from .notices import warn_once
from .options import EXTRAPOLATING, CacheSettings

DEFAULT_CONTEXT = "default"
_DECISIONS_KEPT = 10_000
_context: ContextVar[str] = ContextVar("wavepass_cache_context", default=DEFAULT_CONTEXT)
_skipping_allowed: ContextVar[bool] = ContextVar("wavepass_skipping_allowed", default=True)
_step_key: ContextVar[Any] = ContextVar("wavepass_step", default=None)
_overrides: ContextVar[dict[str, Any]] = ContextVar("wavepass_cache_settings", default={})
_sequence = itertools.count()
_programs: weakref.WeakSet[_Program] = weakref.WeakSet()
# calls of wavepass programs made by this thread, for `watch` to see whether any ran
_ran = threading.local()
_watched: ContextVar[torch.nn.Module | None] = ContextVar("wavepass_watched", default=None)
# per watched module: its calls that reached no wavepass program, and why
_missed: weakref.WeakKeyDictionary[torch.nn.Module, _Missed] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Stats:
    """What the cache did since the last `reset`: `decisions[i]` is True where call i skipped.
    `reason`: why some calls ran without the cache (None when every call was cached)."""

    calls: int
    hits: int
    decisions: tuple[bool, ...]
    reason: str | None = None

    def __str__(self) -> str:
        text = f"wavespeed: skipped {self.hits} of {self.calls} model calls"
        return f"{text} (not cached: {self.reason})" if self.reason else text


@contextmanager
def cache_settings(**overrides: Any) -> Iterator[None]:
    """`with wavepass.cache_settings(residual_diff_threshold=0.2):` the calls inside decide
    with these settings instead of the defaults the model was compiled with (`options=`).

    Names: residual_diff_threshold, max_consecutive_cache_hits, warmup_steps. They are read
    at every call, so a new value takes effect at the next call and compiles nothing.
    Nested blocks add to the outer one's settings.
    """
    checked = CacheSettings.check_overrides(overrides)
    token = _overrides.set({**_overrides.get(), **checked})
    try:
        yield
    finally:
        _overrides.reset(token)


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
    computed_at: int = 0  # `calls` at the last computed call
    # (extrapolating policies) the signal and residuals of the computed call before it, and its `calls`
    previous: tuple[torch.Tensor, tuple[torch.Tensor, ...], int] | None = None

    def clear(self) -> None:
        self.signal, self.residuals, self.strides, self.calls, self.hits_in_row = None, (), (), 0, 0
        self.computed_at, self.previous = 0, None

    def keep(self, signal: torch.Tensor, residuals: tuple[torch.Tensor, ...], settings: CacheSettings) -> None:
        """What a computed call leaves for the skipped calls after it."""
        extrapolates = settings.policy in EXTRAPOLATING and len(self.residuals) == len(residuals)
        self.previous = (self.signal, self.residuals, self.computed_at) if extrapolates else None
        self.signal, self.residuals, self.computed_at = signal, residuals, self.calls

    def _extrapolated(self, now: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        """`now` (kept at the last computed call) carried to this call along its change since
        `before` (kept at the computed call before it): now + (now - before) * n / m."""
        factor = (self.calls - self.computed_at) / (self.computed_at - self.previous[2])
        return torch.add(now, now - before, alpha=factor)

    def signal_now(self, settings: CacheSettings) -> torch.Tensor:
        """What this call's first-block residual is compared with, by `settings.policy`."""
        if settings.policy != "predictive" or self.previous is None:
            return self.signal
        return self._extrapolated(self.signal, self.previous[0])

    def residuals_now(self, settings: CacheSettings) -> tuple[torch.Tensor, ...]:
        """The residuals a skipped call adds, by `settings.policy` (see `CacheSettings`)."""
        if settings.policy not in EXTRAPOLATING or self.previous is None:
            return self.residuals
        return tuple(map(self._extrapolated, self.residuals, self.previous[1]))


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


class _Program:
    """What every callable the backend returns to Dynamo shares: the model it ran with last,
    its counts for `stats`, and the reason it runs uncached (None: it caches)."""

    reason: str | None = None
    counted = True  # False: a fragment of a model another program counts (stack_cache)

    def __init__(self, parameters: tuple[int, ...]) -> None:
        self._parameters_of = _picker(parameters)
        self._owner: tuple[weakref.ref, ...] = ()  # the parameters of the model that ran last
        self._calls = self._hits = 0
        self._decisions: deque[tuple[int, bool]] = deque(maxlen=_DECISIONS_KEPT)
        _programs.add(self)

    def _count(self, skip: bool) -> None:
        self._calls += 1
        self._hits += skip
        self._decisions.append((next(_sequence), skip))

    def _switch_owner(self, args: Sequence[Any]) -> bool:
        """Record the model of this call as the owner; True when it is another model (it
        shares no parameter with the last one), whose stats and cache start anew."""
        parameters = self._parameters_of(args)
        shared = self.owned_by(set(map(id, parameters)))
        other = bool(self._owner) and not shared
        self._owner = tuple(map(weakref.ref, parameters))
        if other:
            self.reset()
        return other

    def reset(self) -> None:
        self._calls = self._hits = 0
        self._decisions.clear()

    def owned_by(self, parameter_ids: set[int]) -> bool:
        """Whether the model with these parameter ids ran this program last: it shares a
        parameter with that run (held by weak references: while one lives, no other object
        can have its id; a LoRA that replaces some weights leaves the others shared)."""
        return any((p := ref()) is not None and id(p) in parameter_ids for ref in self._owner)

    def stats(self) -> tuple[int, int, list[tuple[int, bool]]]:
        return self._calls, self._hits, list(self._decisions)


class UncachedProgram(_Program):
    """A graph compiled without the cache (`reason` says why): counted, never skips."""

    def __init__(self, compiled: Callable, parameters: tuple[int, ...], reason: str) -> None:
        super().__init__(parameters)
        self._compiled = compiled
        self.reason = reason

    def __call__(self, *args: Any) -> Any:
        _ran.calls = getattr(_ran, "calls", 0) + 1
        self._switch_owner(args)
        result = self._compiled(*args)
        self._count(False)
        return result


class _Deciding(_Program):
    """A program that decides per call whether to skip blocks: the settings it decides with,
    First Block Cache's rule, and `same_step` followers. `defaults`: the settings when no
    `cache_settings` block overrides them. `reduce`: where the decision is shared by several
    processes (context parallelism), sums the two float32 sums it compares over them (see
    `relative_l1`)."""

    def __init__(self, parameters: tuple[int, ...], defaults: CacheSettings,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__(parameters)
        self._defaults = defaults
        self._reduce = reduce
        self._step: tuple[Any, bool] | None = None  # (same_step key, its decision)

    def settings(self) -> CacheSettings:
        """The settings a call made now decides with."""
        overrides = _overrides.get()
        return dataclasses.replace(self._defaults, **overrides) if overrides else self._defaults

    def _decide(self, state: _State, signal: torch.Tensor, settings: CacheSettings) -> bool:
        """First Block Cache, with calls of one `same_step` following the first one's decision."""
        state.calls += 1
        key = _step_key.get()
        if key is not None and self._step is not None and self._step[0] == key:
            skip = self._step[1] and state.signal is not None and _skipping_allowed.get()
            state.hits_in_row = state.hits_in_row + 1 if skip else 0
            return skip
        skip = self._decide_alone(state, signal, settings)
        self._step = (key, skip) if key is not None else None
        return skip

    def _decide_alone(self, state: _State, signal: torch.Tensor, opts: CacheSettings) -> bool:
        """First Block Cache: skip when the first-block residual barely moved."""
        if (
            not opts.may_skip
            or not _skipping_allowed.get()
            or state.signal is None
            or state.calls <= opts.warmup_steps
            or 0 < opts.max_consecutive_cache_hits <= state.hits_in_row
        ):
            state.hits_in_row = 0
            return False
        skip = relative_l1(signal, state.signal_now(opts), self._reduce) < opts.residual_diff_threshold
        state.hits_in_row = state.hits_in_row + 1 if skip else 0
        return skip

    def reset(self) -> None:
        super().reset()
        self._step = None


class CachedProgram(_Deciding):
    """The callable the `wavespeed` backend returns to Dynamo for a graph with blocks."""

    def __init__(self, head: Callable, rest: Callable, tail: Callable, wiring: Wiring,
                 defaults: CacheSettings, blocks: tuple[str, ...], description: str,
                 stores_copies: bool = False,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__(wiring.parameters, defaults, reduce)
        self._head, self._rest, self._tail = head, rest, tail
        # Pieces run as CUDA graphs return outputs that their next replay overwrites: the
        # signal and residuals kept for later calls are then copies.
        self._kept: Callable[[torch.Tensor], torch.Tensor] = torch.clone if stores_copies else _itself
        self.blocks = blocks
        self._wiring = wiring
        self._head_args, self._rest_args, self._tail_args = map(_picker, (wiring.head_in, wiring.rest_in, wiring.tail_in))
        self._activations_of = _picker(wiring.activations)
        self.description = description
        self._states: dict[str, _State] = {}

    def __call__(self, *args: Any) -> Any:
        _ran.calls = getattr(_ran, "calls", 0) + 1
        w = self._wiring
        settings = self.settings()
        state = self._states.setdefault(_context.get(), _State())
        signature = self._signature(args)
        if signature != state.signature:
            if self._switch_owner(args):  # reset() dropped every context's state
                state = self._states.setdefault(_context.get(), _State())
            state.clear()
            state.signature = signature
        values = list(args) + [None] * (w.num_slots - len(args))
        try:
            outputs = self._head(*self._head_args(values))
            for slot, value in zip(w.head_out, outputs):
                values[slot] = value
            skip = self._decide(state, outputs[-1], settings)
            if skip:
                residuals = state.residuals_now(settings)
                for (sources, dim, result), residual, stride in zip(w.streams, residuals, state.strides):
                    source = values[sources[0]] if dim is None else torch.cat([values[i] for i in sources], dim)
                    values[result] = _add_strided(source, residual, stride)
            else:
                outputs_rest = self._rest(*self._rest_args(values))
                for slot, value in zip(w.rest_out, outputs_rest):
                    values[slot] = value
                if settings.may_skip:
                    state.keep(self._kept(outputs[-1]), tuple(map(self._kept, outputs_rest[len(w.rest_out):])),
                               settings)
                    state.strides = tuple(values[result].stride() for *_, result in w.streams)
            _check_layouts(values, w.layouts)
            result = self._tail(*self._tail_args(values))
        except BaseException:
            state.clear()
            raise
        self._count(skip)
        return result

    def _signature(self, args: Sequence[Any]) -> tuple:
        activations = tuple(
            (a.shape, a.dtype, a.device) if isinstance(a, torch.Tensor) else a
            for a in self._activations_of(args)
        )
        parameters = self._parameters_of(args)
        return activations, tuple(map(id, parameters)), _versions(parameters)

    def reset(self) -> None:
        super().reset()
        self._states.clear()


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


def relative_l1(current: torch.Tensor, previous: torch.Tensor,
                reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """mean|current - previous| / mean|previous|, in float32; inf or nan never skip.

    With `reduce` (each process holds a shard of the sequence), the ratio of the two sums
    over all shards: sum|change| / sum|previous|, which is the ratio of the means of the
    whole sequence, so every process decides alike and as one process would."""
    if reduce is None:
        change = torch.mean(torch.abs(current - previous), dtype=torch.float32)
        scale = torch.mean(torch.abs(previous), dtype=torch.float32)
        return (change / scale).item()
    sums = reduce(torch.stack([torch.sum(torch.abs(current - previous), dtype=torch.float32),
                               torch.sum(torch.abs(previous), dtype=torch.float32)]))
    return (sums[0] / sums[1]).item()


def programs_of(model: Any | None) -> list[_Program]:
    """The programs that last ran with `model`'s parameters (all of them for None), but for
    fragments of a split stack, whose `StackCache` is the model's program.

    `model` is a torch.nn.Module (the compiled model or the original one) or an object that
    holds one as `.model`, such as the MODEL (a ComfyUI ModelPatcher) the ComfyUI nodes return.
    """
    if model is None:
        return [p for p in _programs if p.counted]
    ids = {id(p) for p in module_of(model).parameters()}
    return [p for p in _programs if p.counted and p.owned_by(ids)]


def module_of(model: Any) -> torch.nn.Module:
    """The torch.nn.Module `model` is, or holds as `.model` (a ComfyUI MODEL)."""
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "model", None)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(
            f"wavepass: expected a torch.nn.Module (the compiled model or the original one) or "
            f"an object holding one as `.model` (a ComfyUI MODEL), got {type(model).__name__}"
        )
    return getattr(module, "_orig_mod", module)


@dataclass
class _Missed:
    """Calls of a watched model that reached no wavepass program."""

    decisions: deque[tuple[int, bool]] = field(default_factory=lambda: deque(maxlen=_DECISIONS_KEPT))
    reason: str | None = None


@contextmanager
def watch(model: Any) -> Iterator[None]:
    """`with wavepass.watch(model): compiled(...)`: the calls inside are `model` compiled
    with the wavespeed backend. If they reach none of its programs (Dynamo stopped compiling
    the model: its recompile limit, a frame it skips, or blocks compiled one by one), the
    call is counted in `stats(model)` as uncached with the reason, and the user is told
    once. The integrations watch every model call; `stats` diagnoses unwatched models too.
    """
    from .diagnosis import why_uncompiled

    module = module_of(model)
    before = getattr(_ran, "calls", 0)
    token = _watched.set(module)
    try:
        yield
    finally:
        _watched.reset(token)
    if getattr(_ran, "calls", 0) == before:
        missed = _missed.setdefault(module, _Missed())
        missed.reason = why_uncompiled(module)
        missed.decisions.append((next(_sequence), False))
        warn_once(f"wavespeed: {type(module).__name__} ran uncompiled and uncached: {missed.reason}",
                  stacklevel=4)  # watch, contextlib's __exit__, the caller's `with`


def _watched_in(model: Any | None) -> list[torch.nn.Module]:
    """The watched modules with missed calls that are `model` or inside it (all for None):
    a ComfyUI MODEL holds the diffusion model its wrappers watch."""
    if model is None:
        return list(_missed.keys())
    return [m for m in module_of(model).modules() if m in _missed]


def watched_module() -> torch.nn.Module | None:
    """The model a `watch` block around the current call names, if any."""
    return _watched.get()


def reset(model: Any | None = None) -> None:
    """Start a new generation: forget stored residuals (of `model`, or of every model)."""
    for program in programs_of(model):
        program.reset()
    for module in _watched_in(model):
        del _missed[module]


def stats(model: Any | None = None) -> Stats:
    """Calls, skipped calls and per-call decisions since the last `reset` of `model`, and
    why calls ran uncached, if any did.

    A model split by graph breaks runs several programs per call. Where one of them caches,
    its calls are the model's (the others are fragments without the block stack, which
    cache nothing and need no excuse); where none does, the model's calls are those of its
    busiest uncached program, with their reasons."""
    programs = programs_of(model)
    cached = [p for p in programs if p.reason is None and p.stats()[0]]
    uncached = [p for p in programs if p.reason is not None and p.stats()[0]]
    counted = cached or sorted(uncached, key=lambda p: -p.stats()[0])[:1]
    calls = hits = 0
    decisions: list[tuple[int, bool]] = []
    for program in counted:
        c, h, d = program.stats()
        calls, hits = calls + c, hits + h
        decisions += d
    reasons = [] if cached else [p.reason for p in uncached]
    for m in map(_missed.__getitem__, _watched_in(model)):  # calls that reached no program
        if m.decisions:
            calls += len(m.decisions)
            decisions += m.decisions
            reasons.append(m.reason)
    if model is not None and not programs and not reasons:
        from .diagnosis import why_uncompiled

        reasons.append(f"no wavespeed program has run with this model since the last reset "
                       f"({why_uncompiled(module_of(model))})")
    return Stats(calls, hits, tuple(skip for _, skip in sorted(decisions)),
                 "; ".join(dict.fromkeys(reasons)) or None)
