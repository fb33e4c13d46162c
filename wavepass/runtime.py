"""The cached program Dynamo calls, and the state it keeps per model.

One `CachedProgram` per compiled graph runs head, decides, then runs rest or adds the stored
residuals, then runs tail. `stack_cache.StackCache` (a stack split into several graphs) runs
the same cycle around the blocks at the module level. Both are `DecidingProgram`s, and the
cycle is the one they share:

    state = program.begin(signature)          this context's state (cleared at a new signature)
    skip = program.decide(state, signal, settings)     signal: the first block's residual
    skip:     add state.residuals_now(settings) to the first block's outputs
    computed: state.keep(signal, residuals, settings)  residuals: last outputs - first outputs
    program.finish(skip)                      counted for `stats`
    an exception between begin and finish: state.clear()

Its state is kept per model that runs it (a `Ledger`: two checkpoints of one architecture run
one compiled graph, each with a ledger of its own) and, within it, per cache context (see
`cache_context`; the default context is one per thread):

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

Counting for `stats()` (calls, hits, recent decisions) is per program and model (its
ledger) and cleared only by `reset()`. A graph the backend compiled without the cache (`UncachedProgram`) counts its
calls with the reason; a call of a watched model that reached no program of ours at all
(`watch`: Dynamo stopped compiling it) is counted against the model with the reason
`diagnosis.py` finds. Passes and the backend hold no state. The stores this module keeps
for the whole process (its programs, the missed calls) are registered with `process_state.py`,
which owns every process-wide store of wavepass and clears them all in one call.
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

from . import process_state
from .notices import compile_failure, warn_once
from .options import EXTRAPOLATING, PREDICTING, CacheSettings

DEFAULT_CONTEXT = "default"
_DECISIONS_KEPT = 10_000
_context: ContextVar[str] = ContextVar("wavepass_cache_context", default=DEFAULT_CONTEXT)
_skipping_allowed: ContextVar[bool] = ContextVar("wavepass_skipping_allowed", default=True)
_step_key: ContextVar[Any] = ContextVar("wavepass_step", default=None)
_overrides: ContextVar[dict[str, Any]] = ContextVar("wavepass_cache_settings", default={})
_sequence = itertools.count()
_programs: weakref.WeakSet[Program] = weakref.WeakSet()
# calls of wavepass programs made by this thread: `calls` all (for `watch` to see whether any
# ran), `cached` those of cached programs (`UncachedProgram` reads whether any ran between two of
# its calls: then it is one piece of a model that caches)
_ran = threading.local()
_thread = threading.local()  # `key`: this thread's default cache context (see `ContextStates`)
_watched: ContextVar[torch.nn.Module | None] = ContextVar("wavepass_watched", default=None)
# per watched module: its calls that reached no wavepass program, and why
_missed: weakref.WeakKeyDictionary[torch.nn.Module, _Missed] = weakref.WeakKeyDictionary()
process_state.owns("programs", _programs)
process_state.owns("missed calls", _missed)


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


def note_call(cached: bool = False) -> None:
    """Record that a wavepass program ran a call on this thread (`cached`: one that caches)."""
    _ran.calls = getattr(_ran, "calls", 0) + 1
    if cached:
        _ran.cached = getattr(_ran, "cached", 0) + 1


class _ThreadContext:
    """The key of one thread's default cache context (weakly held: it goes with the thread)."""


def context_key() -> str | _ThreadContext:
    """The key of the cache context calls are made in now: its name, or, outside any named
    context, this thread's own default context (threads do not share a default state)."""
    name = _context.get()
    if name != DEFAULT_CONTEXT:
        return name
    key = getattr(_thread, "key", None)
    if key is None:
        key = _thread.key = _ThreadContext()
    return key


class ContextStates:
    """The `State` of each cache context of one program: named contexts by name, default
    contexts per thread (an entry is dropped with its thread, so memory stays bounded)."""

    def __init__(self, factory: Callable[[], State]) -> None:
        self._factory = factory
        self._named: dict[str, State] = {}
        self._threads: weakref.WeakKeyDictionary[_ThreadContext, State] = weakref.WeakKeyDictionary()

    def _table(self, key: str | _ThreadContext) -> dict:
        return self._named if isinstance(key, str) else self._threads

    def current(self) -> State:
        """The state of the context calls are made in now (made on first use)."""
        key = context_key()
        table = self._table(key)
        state = table.get(key)
        if state is None:
            state = table[key] = self._factory()
        return state

    def current_if_any(self) -> State | None:
        key = context_key()
        return self._table(key).get(key)

    def clear(self) -> None:
        self._named.clear()
        self._threads.clear()


@dataclass
class State:
    """What one cache context of one program keeps between calls (see the module docstring)."""

    signature: tuple | None = None
    signal: torch.Tensor | None = None
    residuals: tuple[torch.Tensor, ...] = ()
    strides: tuple[tuple[int, ...], ...] = ()  # of each stream's result at that call
    calls: int = 0
    hits_in_row: int = 0
    computed_at: int = 0  # `calls` at the last computed call
    # (extrapolating policies) the signal and residuals of the computed call before it, and its `calls`
    previous: tuple[torch.Tensor, tuple[torch.Tensor, ...], int] | None = None
    # ("accumulated") the sum of the changes compared at the calls skipped since the last computed one
    accumulated: float = 0.0

    def clear(self) -> None:
        self.signal, self.residuals, self.strides, self.calls, self.hits_in_row = None, (), (), 0, 0
        self.computed_at, self.previous, self.accumulated = 0, None, 0.0

    def keep(self, signal: torch.Tensor, residuals: tuple[torch.Tensor, ...], settings: CacheSettings) -> None:
        """What a computed call leaves for the skipped calls after it."""
        extrapolates = settings.policy in EXTRAPOLATING and len(self.residuals) == len(residuals)
        self.previous = (self.signal, self.residuals, self.computed_at) if extrapolates else None
        self.signal, self.residuals, self.computed_at, self.accumulated = signal, residuals, self.calls, 0.0

    def _extrapolated(self, now: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        """`now` (kept at the last computed call) carried to this call along its change since
        `before` (kept at the computed call before it): now + (now - before) * n / m."""
        factor = (self.calls - self.computed_at) / (self.computed_at - self.previous[2])
        return torch.add(now, now - before, alpha=factor)

    def signal_now(self, settings: CacheSettings) -> torch.Tensor:
        """What this call's first-block residual is compared with, by `settings.policy`."""
        if settings.policy not in PREDICTING or self.previous is None:
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
    strides: tuple[tuple[int, tuple[int, ...], tuple[int, ...]], ...] = ()


@dataclass
class Ledger:
    """What a program keeps for one model that runs it: its counts for `stats` and, for a
    deciding program, its state per cache context and its last `same_step` decision.

    The model is known by its parameters, held weakly (while one lives no other object can
    have its id; a LoRA that replaces some weights leaves the others shared). Two models of
    one architecture (Wan 2.2's two experts, two checkpoints) run the same compiled graph, so
    the same program: each keeps its own ledger, and switching between them loses nothing."""

    parameters: tuple[weakref.ref, ...] = ()
    states: ContextStates | None = None
    step: tuple[Any, bool] | None = None  # (same_step key, its decision)
    calls: int = 0
    hits: int = 0
    decisions: deque[tuple[int, bool]] = field(default_factory=lambda: deque(maxlen=_DECISIONS_KEPT))

    def shares(self, parameter_ids: set[int]) -> bool:
        return any((p := ref()) is not None and id(p) in parameter_ids for ref in self.parameters)

    def alive(self) -> bool:
        return not self.parameters or any(ref() is not None for ref in self.parameters)

    def reset(self) -> None:
        self.calls = self.hits = 0
        self.decisions.clear()
        self.step = None
        if self.states is not None:
            self.states.clear()


class Program:
    """What every callable the backend returns to Dynamo shares: a ledger per model that
    runs it (the current one: the model of the last call), and the reason it runs uncached
    (None: it caches)."""

    reason: str | None = None
    counted = True  # False: a fragment of a model another program counts (stack_cache)

    def __init__(self, parameters: tuple[int, ...]) -> None:
        self._parameters_of = _picker(parameters)
        self._ledger = self._new_ledger(())
        self._ledgers = [self._ledger]
        _programs.add(self)

    def _new_ledger(self, parameters: tuple[weakref.ref, ...]) -> Ledger:
        return Ledger(parameters)

    def _count(self, skip: bool) -> None:
        ledger = self._ledger
        ledger.calls += 1
        ledger.hits += skip
        ledger.decisions.append((next(_sequence), skip))

    def _switch_owner(self, args: Sequence[Any]) -> None:
        """Make the ledger of this call's model the current one (a new one for a model that
        shares no parameter with any earlier; the ledgers of models that are gone are
        dropped)."""
        parameters = self._parameters_of(args)
        ids = set(map(id, parameters))
        ledger = self._ledger if self._ledger.shares(ids) or not self._ledger.parameters else next(
            (each for each in self._ledgers if each.shares(ids)), None)
        if ledger is None:
            self._ledgers = [each for each in self._ledgers if each.alive()]
            ledger = self._new_ledger(())
            self._ledgers.append(ledger)
        ledger.parameters = tuple(map(weakref.ref, parameters))
        self._ledger = ledger

    def _ledgers_of(self, parameter_ids: set[int] | None) -> list[Ledger]:
        return [each for each in self._ledgers if parameter_ids is None or each.shares(parameter_ids)]

    def reset(self, parameter_ids: set[int] | None = None) -> None:
        """Forget the counts (and states) of the model with these parameters (all for None)."""
        for ledger in self._ledgers_of(parameter_ids):
            ledger.reset()

    def owned_by(self, parameter_ids: set[int]) -> bool:
        """Whether the model with these parameter ids has run this program (and lives)."""
        return bool(self._ledgers_of(parameter_ids))

    def stats(self, parameter_ids: set[int] | None = None) -> tuple[int, int, list[tuple[int, bool]]]:
        """(calls, hits, decisions) of the model with these parameters (all for None)."""
        ledgers = self._ledgers_of(parameter_ids)
        return (sum(each.calls for each in ledgers), sum(each.hits for each in ledgers),
                [d for each in ledgers for d in each.decisions])


class UncachedProgram(Program):
    """A graph compiled without the cache (`reason` says why): counted, never skips.

    `notice`: words to say once at its second call, unless a cached program ran since its
    first (then it is one piece of a model that caches, and says nothing); None: nothing left
    to say (the backend said it when compiling)."""

    def __init__(self, compiled: Callable, parameters: tuple[int, ...], reason: str,
                 notice: str | None = None) -> None:
        super().__init__(parameters)
        self._compiled = compiled
        self.reason = reason
        self._notice = notice
        self._cached_calls_at_first: int | None = None

    def __call__(self, *args: Any) -> Any:
        note_call()
        if self._notice is not None:
            self._say_if_alone()
        self._switch_owner(args)
        result = self._compiled(*args)
        self._count(False)
        return result

    def _say_if_alone(self) -> None:
        cached_calls = getattr(_ran, "cached", 0)
        if self._cached_calls_at_first is None:
            self._cached_calls_at_first = cached_calls
            return
        if cached_calls == self._cached_calls_at_first:
            warn_once(self._notice)
        self._notice = None


class DecidingProgram(Program):
    """A program that runs First Block Cache's cycle (the module docstring): the settings it
    decides with, the rule, `same_step` followers, its states per cache context and its
    counts. `defaults`: the settings when no `cache_settings` block overrides them. `reduce`:
    where the decision is shared by several processes (context parallelism), sums the two
    float32 sums it compares over them (see `relative_l1`). `state_type`: the `State` (or a
    subclass: what else the program keeps per context)."""

    def __init__(self, parameters: tuple[int, ...], defaults: CacheSettings,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 state_type: type[State] | None = None) -> None:
        self._state_type = state_type or State
        super().__init__(parameters)
        self._defaults = defaults
        self._reduce = reduce

    def _new_ledger(self, parameters: tuple[weakref.ref, ...]) -> Ledger:
        return Ledger(parameters, ContextStates(self._state_type))

    @property
    def _states(self) -> ContextStates:
        """The current model's state per cache context."""
        return self._ledger.states

    def begin(self, signature: tuple) -> State:
        """The state of this call's cache context, cleared where `signature` is new."""
        note_call(cached=True)
        state = self._states.current()
        if signature != state.signature:
            state.clear()
            state.signature = signature
        return state

    def finish(self, skip: bool) -> None:
        """A call ended, having skipped the blocks or computed them."""
        self._count(skip)

    def settings(self) -> CacheSettings:
        """The settings a call made now decides with."""
        overrides = _overrides.get()
        return dataclasses.replace(self._defaults, **overrides) if overrides else self._defaults

    def decide(self, state: State, signal: torch.Tensor | None, settings: CacheSettings) -> bool:
        """First Block Cache, with calls of one `same_step` following the first one's decision.
        (`signal` is read only where `state` holds a signal to compare it with.)"""
        state.calls += 1
        key, ledger = _step_key.get(), self._ledger
        if key is not None and ledger.step is not None and ledger.step[0] == key:
            skip = ledger.step[1] and state.signal is not None and _skipping_allowed.get() and settings.may_skip
            state.hits_in_row = state.hits_in_row + 1 if skip else 0
            return skip
        skip = self._decide_alone(state, signal, settings)
        ledger.step = (key, skip) if key is not None else None
        return skip

    def _decide_alone(self, state: State, signal: torch.Tensor, opts: CacheSettings) -> bool:
        """First Block Cache: skip when the first-block residual barely moved ("accumulated":
        when its changes, summed since the last computed call, stay small)."""
        if (
            not opts.may_skip
            or not _skipping_allowed.get()
            or state.signal is None
            or state.calls <= opts.warmup_steps
            or 0 < opts.max_consecutive_cache_hits <= state.hits_in_row
        ):
            state.hits_in_row, state.accumulated = 0, 0.0
            return False
        change = relative_l1(signal, state.signal_now(opts), self._reduce)
        if opts.policy == "accumulated":
            change += state.accumulated
        skip = change < opts.residual_diff_threshold
        state.hits_in_row = state.hits_in_row + 1 if skip else 0
        state.accumulated = change if skip else 0.0
        return skip


class CachedProgram(DecidingProgram):
    """The callable the `wavespeed` backend returns to Dynamo for a graph with blocks."""

    def __init__(self, head: Callable, rest: Callable, tail: Callable, wiring: Wiring,
                 defaults: CacheSettings, blocks: tuple[str, ...],
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

    def __call__(self, *args: Any) -> Any:
        w = self._wiring
        settings = self.settings()
        signature = self._signature(args)
        if signature != getattr(self._states.current_if_any(), "signature", None):
            self._switch_owner(args)  # maybe another model, with a ledger of its own
        state = self.begin(signature)
        values = list(args) + [None] * (w.num_slots - len(args))
        try:
            outputs = self._head(*self._head_args(values))
            for slot, value in zip(w.head_out, outputs):
                values[slot] = value
            skip = self.decide(state, outputs[-1], settings)
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
            _check_strides(values, w.strides)
            result = self._tail(*self._tail_args(values))
        except BaseException:
            state.clear()
            raise
        self.finish(skip)
        return result

    def _signature(self, args: Sequence[Any]) -> tuple:
        activations = tuple(
            (a.shape, a.dtype, a.device) if isinstance(a, torch.Tensor) else a
            for a in self._activations_of(args)
        )
        parameters = self._parameters_of(args)
        return activations, tuple(map(id, parameters)), parameter_versions(parameters)


def _itself(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _check_strides(values: Sequence[Any], strides_of: tuple[tuple[int, tuple, tuple], ...]) -> None:
    """Compiled pieces run without Inductor's per-input size asserts (hundreds of weights,
    which Dynamo's guards cover); the few values passed between pieces are checked here."""
    for slot, sizes, strides in strides_of:
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


def parameter_versions(parameters: Sequence[torch.Tensor]) -> tuple[int | None, ...]:
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


def programs_of(model: Any | None) -> list[Program]:
    """The programs that have run with `model`'s parameters (all of them for None), but for
    fragments of a split stack, whose `StackCache` is the model's program.

    `model` is a torch.nn.Module (the compiled model or the original one) or an object that
    holds one as `.model`, such as the MODEL (a ComfyUI ModelPatcher) the ComfyUI nodes return.
    """
    if model is None:
        return [p for p in _programs if p.counted]
    ids = _parameter_ids(model)
    return [p for p in _programs if p.counted and p.owned_by(ids)]


def _parameter_ids(model: Any) -> set[int]:
    return {id(p) for p in module_of(model).parameters()}


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


def call_or_fall_back(model: Any, compiled: Callable[[], Any], plain: Callable[[], Any], failed: str | None,
                      retry: str, user_errors: tuple[type[BaseException], ...] = ()) -> tuple[Any, str | None]:
    """One call of `model` for an integration: through `compiled`, or through `plain` (the
    model uncompiled) where compiling failed, now or before. Returns the result and the reason
    the integration keeps for the calls after it (None while `model` compiles).

    `failed`: the reason kept from an earlier failure (then `plain` runs). A compiled call that
    raises a compiler failure (`notices.compile_failure`; never one of `user_errors`, out of
    memory or an interrupt) runs again through `plain`: if that raises too, the error was the
    model's (Dynamo reports some as its own) and propagates, with nothing kept; else the reason,
    the cause and fix followed by `retry` (how to compile again), is kept. Every call through
    `plain` is counted as uncached in `stats(model)` with the reason, said once.
    """
    if failed is None:
        try:
            return compiled(), None
        except Exception as error:  # noqa: BLE001 - only the compiler's failures fall back
            cause = compile_failure(error, user_errors)
            if cause is None:
                raise
        result = plain()
        failed = f"{cause}. {retry}"
        reset(model)  # what the failed call counted (compiles fail at a first call)
    else:
        result = plain()
    module = module_of(model)
    missed = _missed.setdefault(module, _Missed())
    missed.reason = failed
    missed.decisions.append((next(_sequence), False))
    warn_once(f"wavespeed: {type(module).__name__} ran uncompiled and uncached: {failed}", stacklevel=3)
    return result, failed


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
    ids = None if model is None else _parameter_ids(model)
    for program in programs_of(model):
        program.reset(ids)
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
    ids = None if model is None else _parameter_ids(model)
    cached = [p for p in programs if p.reason is None and p.stats(ids)[0]]
    uncached = [p for p in programs if p.reason is not None and p.stats(ids)[0]]
    counted = cached or sorted(uncached, key=lambda p: -p.stats(ids)[0])[:1]
    calls = hits = 0
    decisions: list[tuple[int, bool]] = []
    for program in counted:
        c, h, d = program.stats(ids)
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
