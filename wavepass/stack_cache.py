"""First Block Cache around a block stack that Dynamo splits into several graphs.

Where a graph break inside a block (MoE routing, `nonzero`, `.item()`, a print) or between
blocks keeps the stack out of one graph, the backend cannot cut a graph at the first block.
It then learns the stack from the module tree (`module_stack.py`) and puts this cache around
it at the module level, while every graph Dynamo makes of the blocks is still compiled by the
backend (`backend.py`: fragments). The cycle is `runtime.DecidingProgram`'s, the one
`CachedProgram` runs; what differs is where its steps happen:

    the owner's forward (Python)        each block of the anchor container (its `forward`)
    -----------------------------       ---------------------------------------------------
    x = embed(x)                        blocks[0]:     copy the main argument; run;
    for block in self.blocks:                          signal = main output - that copy; decide
        x = glue(block(x, ...))                        computing: first = copy of the outputs
    return head(x)                                     skipping:  first = outputs + residuals
                                        blocks[1..n-2] computing: run (compiled frames)
                                                       skipping:  return blocks[0]'s outputs
                                        blocks[n-1]:   computing: run; residuals = out - first
                                                       skipping:  return first

Everything from after block 0 returns to the end of the last block is the cached region, as
on the one-graph path: code between blocks (a ControlNet residual added to a stream, in place
or not) runs on skipped calls too, but what it does there is discarded, and the residuals of a
computed call hold its effect. A skipped call therefore gives exactly First Block Cache's
`first block's output + residual`, with `residual = last block's output - first block's
output` (the copy taken when block 0 returned, before a block or the code between blocks can
write into it). Block 0's main argument is copied before it runs: a first block that updates
its input in place (`img += ...`) still has a signal.

Streams are told apart by role, never by shape. The blocks of one container share a
signature, so an output's index and an argument's position are roles: output i of the last
block continues output i of block 0. Which argument output i continues is read from identity,
at the first computed call of a generation: block 1 receives block 0's output i, the same
tensor object, at some argument position, and every later block receives block k's output i
at that position (checked at every computed call). The main stream, whose change decides, is
the owner's by role: the argument of block 0 that is the very tensor held by the first of the
owner's running method's variables, its parameters after `self` then its locals in the order
its code names them (diffusers' `hidden_states = self.x_embedder(hidden_states)`, ComfyUI's
`img = self.img_in(img)`, `img` of `img, txt = self.img_in(latent), self.txt_in(text)`; see
`module_stack.owner_variables`). Where the owner holds none of block 0's arguments, a block
with one output is its own main stream, at the position block 1 receives it. (Which stream
decides changes the decisions, never what a skipped call returns.) A block
that returns one tensor has one stream, whatever the code between blocks builds from it (HiDream
concatenates per-block tokens and slices them off again). Anything else that cannot be proven
(the code between blocks hands the next block a new tensor in place of one of several outputs,
a block that receives another block's outputs at other positions, a non-tensor output, shapes
that do not continue) turns the cache off for the model: `stats(model).reason` says why, once
in a warning, and every block runs.

Under context parallelism the decision is reduced over the process groups the fragments'
graphs communicate over (`distributed.reducer_over`), as on the one-graph path: every process
decides on the whole sequence, alike.

The cache stays on the blocks (their `forward`, an instance attribute) until `uninstall`
(`remove_wavespeed` calls it). A call made outside a wavespeed `torch.compile` (the model run
eagerly, or compiled with another backend) runs every block as written; Dynamo tracing a
caller of a block with another backend stops at it (a graph break per block, in a model that
had them anyway).

State per cache context (`runtime.ContextStates`): the `runtime.State`, the streams learned
for the current signature, and the call in progress; cleared at a new signature (arguments of
the first block, the owner's parameters and their versions), by an exception in a block, and
when a call finds the last one unfinished (an exception in the code between blocks). A call
that fails before its first block changed nothing. The first model call after the stack is
learned runs every block uncached (the stack is learned while it runs).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import process_state, torch_api
from .distributed import reducer_over
from .module_stack import Stack, enclosing_stack, owner_variables
from .notices import warn_once
from .options import CacheOptions, CacheSettings
from .runtime import DecidingProgram, State, Program, module_of, note_call, parameter_versions

_installed: weakref.WeakKeyDictionary[torch.nn.Module, StackCache] = weakref.WeakKeyDictionary()
_depth = threading.local()  # block calls of an installed stack running on this thread
_MISSING = object()


class Unpairable(Exception):
    """The blocks' streams cannot be followed from block to block (the message says why)."""


@dataclass(frozen=True)
class _Streams:
    """How the streams run through the blocks, learned at a generation's first computed call."""

    arguments: int  # the argument leaves every block takes
    main_argument: int  # the position of the main stream among them
    main_output: int  # the output that continues it
    # per output of a block: the argument position the next block receives it at (None: the
    # code between blocks builds the next block's argument from it; a block with one output)
    received_at: tuple[int | None, ...]


@dataclass
class _FirstArguments:
    """What a generation's first call keeps of block 0's arguments, to learn the streams at
    block 1: the positions of those the owner holds (in the order of its variables), and
    copies of the tensors (of the main stream's alone, once the streams are known: the
    signal's base)."""

    held: tuple[int, ...] = ()
    copies: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Call:
    """A model call in progress, from block 0's return to the last block's."""

    skip: bool
    settings: CacheSettings
    signal: torch.Tensor | None  # (a generation's first call: set at block 1)
    outputs: Any  # block 0's outputs as it returned them: what skipped blocks in between return
    rebuild: Callable[[list[Any]], Any]  # block outputs of that structure from their leaves
    first: list[torch.Tensor]  # computing: copies of block 0's outputs; skipping: the results
    previous: list[torch.Tensor]  # (computing) the outputs of the block that ran last
    arguments: _FirstArguments  # block 0's (copies dropped once the streams are learnt)
    next: int = 1


@dataclass
class _Run:
    """A block about to run whose outputs `_after` reads."""

    state: _StackState
    index: int
    settings: CacheSettings
    arguments: _FirstArguments = field(default_factory=_FirstArguments)  # (block 0)


_PASS = object()  # `_before`: run the block, the cache is not involved


@dataclass
class _StackState(State):
    streams: _Streams | None = None
    call: _Call | None = None

    def clear(self) -> None:
        super().clear()
        self.streams, self.call = None, None


class StackCache(DecidingProgram):
    """The cache put around `stack` (one per owner module); `backend` is the function whose
    `torch.compile` must be running a call for the cache to act (otherwise, e.g. the model
    called eagerly, every block runs as written)."""

    def __init__(self, stack: Stack, backend: Callable[..., Any]) -> None:
        super().__init__((), CacheSettings(), state_type=_StackState)
        self._module = weakref.ref(stack.owner)
        self._backend = backend
        self._blocks = stack.blocks
        self.blocks = tuple(f"{stack.container}.{i}" for i in range(len(self._blocks)))
        self.description = (f"{type(stack.owner).__name__}.{stack.container}[0..{len(self._blocks) - 1}] "
                            f"at the module level (the stack does not fit in one graph)")
        self._options: tuple[Any, CacheSettings] | None = None  # (options dict, its settings)
        self._parameter_ids: tuple[int, ...] = ()
        self._groups: tuple[str, ...] = ()  # the process groups the fragments communicate over
        # the cache's own code runs as Python, never traced (disabled here, not where the
        # methods are defined: `import wavepass` imports no private torch module)
        self._before, self._after, self._abort = map(torch.compiler.disable, (self._before, self._after, self._abort))
        self._parameter_slots = [(m._parameters, name) for m in stack.owner.modules() for name in m._parameters]
        self._signature(())  # records the owner's parameters, for `stats(model)`
        self._entries = [self._entry(index, block.forward) for index, block in enumerate(self._blocks)]
        self._replaced = [block.__dict__.get("forward", _MISSING) for block in self._blocks]
        self._removed = False
        for block, entry in zip(self._blocks, self._entries):
            block.forward = entry

    def communicates_over(self, groups: Sequence[str]) -> None:
        """The fragments of the owner's frames communicate over `groups` (context
        parallelism): the decision is reduced over them."""
        new = tuple(g for g in groups if g not in self._groups)
        if new:
            self._groups += new
            self._reduce = reducer_over(self._groups)

    def on_blocks(self) -> bool:
        """Whether every block's `forward` is still this cache's entry."""
        return all(block.__dict__.get("forward") is entry for block, entry in zip(self._blocks, self._entries))

    def uninstall(self) -> None:
        """Each block's `forward` as it was before the cache; a block whose `forward` was
        wrapped again since keeps the entry, which then runs the block as written. Its
        state and counts go."""
        self._removed = True
        self.reset()
        for block, entry, replaced in zip(self._blocks, self._entries, self._replaced):
            if block.__dict__.get("forward") is entry:
                if replaced is _MISSING:
                    del block.forward
                else:
                    block.forward = replaced

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
        if self._removed or not self._wavespeed_runs(callback):
            return _PASS
        if self.reason is not None:  # turned off: counted, uncached
            if index == 0:
                note_call()
                self.finish(False)
            return _PASS
        if index == 0:
            return self._before_first(args, kwargs)
        state = self._states.current_if_any()
        call, last = getattr(state, "call", None), index == len(self._blocks) - 1
        if call is None or call.next != index:  # this model call did not start at block 0
            if state is not None:
                state.call = None
            if last:
                self.finish(False)
            return _PASS
        call.next += 1
        if not call.settings.may_skip:  # nothing to keep: the block runs as written, the last counted
            return _Run(state, index, call.settings) if last else _PASS
        if call.skip:
            if not last:
                return call.outputs
            state.call = None
            self.finish(True)
            return call.rebuild(call.first)
        inputs, _ = _flatten((args, kwargs))
        try:
            if state.streams is None:
                state.streams = self._learn(call, inputs)
            self._follow(state.streams, call, index, inputs)
        except Unpairable as exc:
            self._turn_off(str(exc))
            return _PASS
        return _Run(state, index, call.settings)

    def _before_first(self, args: tuple, kwargs: dict) -> _Run:
        """Block 0 is called: the call begins; its main argument is copied before the block
        can write into it (a generation's first call, where the streams are not known yet:
        every tensor argument)."""
        inputs, _ = _flatten((args, kwargs))
        signature = self._signature(inputs)
        state = self.begin(signature)
        if state.call is not None:  # the last call failed between its first and its last block
            state.clear()
            state.signature = signature
        run = _Run(state, 0, self.settings())
        if run.settings.may_skip:
            if state.streams is not None:
                positions = [state.streams.main_argument]
            else:
                held = (j for value in owner_variables(self._module()) if isinstance(value, torch.Tensor)
                        for j, x in enumerate(inputs) if x is value)
                run.arguments.held = tuple(dict.fromkeys(held))
                positions = range(len(inputs))
            run.arguments.copies = {j: inputs[j].clone() for j in positions if isinstance(inputs[j], torch.Tensor)}
        return run

    def _after(self, run: _Run, outputs: Any) -> Any:
        """After block `run.index` ran: decide (block 0), or keep what the cache needs."""
        state, index, settings = run.state, run.index, run.settings
        try:
            if index == 0:
                self._after_first(run, outputs)
                return outputs
            call = state.call
            if settings.may_skip:
                leaves = _tensors(_flatten(outputs)[0], self.blocks[index])
                if index == len(self._blocks) - 1:
                    state.keep(call.signal, self._residuals(leaves, call.first), settings)
                else:
                    call.previous = leaves
        except Unpairable as exc:
            self._turn_off(str(exc))
            return outputs
        if index == len(self._blocks) - 1:
            state.call = None
            self.finish(False)
        return outputs

    def _after_first(self, run: _Run, outputs: Any) -> None:
        """Block 0 returned: decide, and set up the rest of the call."""
        state, settings = run.state, run.settings
        leaves, rebuild = _flatten(outputs)
        signal = None
        if settings.may_skip:
            _tensors(leaves, self.blocks[0])
            streams = state.streams
            if streams is not None:
                signal = leaves[streams.main_output] - run.arguments.copies[streams.main_argument]
        skip = self.decide(state, signal, settings)
        learning = state.streams is None
        arguments = run.arguments if learning else _FirstArguments(run.arguments.held)
        call = state.call = _Call(skip, settings, signal, outputs, rebuild, [], leaves, arguments)
        if not settings.may_skip:
            return
        if not skip:
            call.first = [leaf.clone() for leaf in leaves]
            return
        residuals = state.residuals_now(settings)
        if len(residuals) != len(leaves) or not all(map(_alike, leaves, residuals)):
            state.call = None
            self._turn_off(f"the outputs of {self.blocks[0]} changed shape within a generation")
            raise RuntimeError(f"wavespeed: {self.reason}; run the model again")
        call.first = [leaf + residual for leaf, residual in zip(leaves, residuals)]

    def _learn(self, call: _Call, inputs: list[Any]) -> _Streams:
        """The streams, from block 0's outputs and block 1's arguments (a generation's first
        computed call, at block 1); sets the call's signal."""
        first, second = self.blocks[0], self.blocks[1]
        outputs = call.previous
        received_at = tuple(_position(inputs, x, f"output {k} of {first}", second) for k, x in enumerate(outputs))
        if len(outputs) > 1 and None in received_at:
            k = received_at.index(None)
            raise Unpairable(f"{second} does not receive output {k} of {first} (the tensor object): the code "
                             f"between the blocks builds new tensors, and of {len(outputs)} streams which "
                             f"continues which cannot be told")
        held = call.arguments.held
        held_streams = [j for j in held if j in received_at]
        if held_streams:  # the owner's first variable that holds a stream
            main, main_output = held_streams[0], received_at.index(held_streams[0])
        elif len(outputs) == 1 and received_at[0] is not None:  # one stream, the owner holds none
            main, main_output = received_at[0], 0
        elif len(outputs) == 1 and held:  # one stream, which the code between blocks rebuilds
            main, main_output = held[0], 0
        else:
            raise Unpairable(f"the owner's running method holds none of the streams {first} passes to {second}, "
                             f"so which of {len(outputs)} is the image stream cannot be told")
        base = call.arguments.copies.get(main)
        if not isinstance(base, torch.Tensor) or not _alike(outputs[main_output], base):
            raise Unpairable(f"output {main_output} of {first} (shape {tuple(outputs[main_output].shape)}) "
                             f"continues argument {main}, which does not have its shape")
        call.signal = call.first[main_output] - base
        call.arguments.copies = {}
        return _Streams(len(inputs), main, main_output, received_at)

    def _follow(self, streams: _Streams, call: _Call, index: int, inputs: list[Any]) -> None:
        """Block `index` receives the outputs of the block before it where block 1 received
        block 0's (a computed call)."""
        block, before = self.blocks[index], self.blocks[index - 1]
        if len(inputs) != streams.arguments or len(call.previous) != len(streams.received_at):
            raise Unpairable(f"{block} is called with {len(inputs)} arguments after {before} returned "
                             f"{len(call.previous)} tensors, unlike {self.blocks[1]} after {self.blocks[0]}")
        for k, (value, j) in enumerate(zip(call.previous, streams.received_at)):
            if j is not None and inputs[j] is not value:
                raise Unpairable(f"{block} does not receive output {k} of {before} as argument {j}, where "
                                 f"{self.blocks[1]} received {self.blocks[0]}'s: the code between the blocks "
                                 f"builds new tensors or swaps streams")

    def _residuals(self, leaves: list[torch.Tensor], first: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """`last block's output - first block's output`, per output (the same role)."""
        if len(leaves) != len(first) or not all(map(_alike, leaves, first)):
            raise Unpairable(f"{self.blocks[-1]} returns {[tuple(x.shape) for x in leaves]}, where {self.blocks[0]} "
                             f"returns {[tuple(x.shape) for x in first]}: its outputs do not continue the streams")
        return tuple(out - base for out, base in zip(leaves, first))

    def _abort(self) -> None:
        """An exception inside a block: what this context kept is stale."""
        state = self._states.current_if_any()
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
            self._ledger.parameters = tuple(map(weakref.ref, parameters))  # one model: one ledger
        shapes = tuple((x.shape, x.dtype, x.device) if isinstance(x, torch.Tensor) else None for x in inputs)
        return shapes, ids, parameter_versions(parameters)

    def _turn_off(self, why: str) -> None:
        """Off for the model, during a call (which runs uncached and is counted so)."""
        module = self._module()
        self.reason = (f"{why}; the blocks of {type(module).__name__} run every call "
                       f"(First Block Cache on a split stack follows each stream from block to block)")
        self._states.clear()
        self.finish(False)
        warn_once(f"wavespeed: {self.reason}")


class FragmentProgram(Program):
    """A graph of a frame inside a split stack (a block, or part of one), compiled without
    the cache: the stack's `StackCache` decides, these only run. Not counted by `stats`.

    `adopts`: the graph is of a block of the anchor container. A call of it outside the
    cache's wrappers means another instance of the owner (a second checkpoint of the same
    class shares Dynamo's compiled code) is running its blocks uncached: the cache is put
    around that owner's stack too, from the call stack, as the backend did for the first.
    `groups`: the process groups the graph communicates over.
    """

    counted = False

    def __init__(self, compiled: Callable[..., Any], adopts: bool, backend: Callable[..., Any],
                 groups: tuple[str, ...] = ()) -> None:
        super().__init__(())
        self._compiled = compiled
        self._adopts = adopts
        self._backend = backend
        self._groups = groups

    def __call__(self, *args: Any) -> Any:
        note_call()
        if self._adopts and not getattr(_depth, "value", 0):
            adopt(enclosing_stack(), self._backend, self._groups)
        return self._compiled(*args)


def adopt(stack: Stack | None, backend: Callable[..., Any], groups: tuple[str, ...] = ()) -> StackCache | None:
    """The cache around `stack`'s owner, put there now if it has none (or its blocks lost
    it); the decision is reduced over `groups` (process groups a graph of the owner's frames
    communicates over)."""
    if stack is None or not torch_api.enabled("split_stacks"):
        return None
    cache = _installed.get(stack.owner)
    if cache is None or not cache.on_blocks():
        if cache is not None:  # something set the blocks' `forward` since: put the cache on anew
            cache.uninstall()
        cache = _installed[stack.owner] = StackCache(stack, backend)
    cache.communicates_over(groups)
    return cache


def uninstall(model: Any) -> None:
    """Take the cache off the blocks of `model` and of every module inside it (their
    `forward`s as they were before); its state and counts go with it."""
    for module in module_of(model).modules():
        cache = _installed.pop(module, None)
        if cache is not None:
            cache.uninstall()


def _uninstall_every_cache() -> None:
    """Take every installed cache off its blocks (`reset_process_state`)."""
    while _installed:
        _, cache = _installed.popitem()
        cache.uninstall()


process_state.owns("stack caches", _installed, _uninstall_every_cache)


def _position(inputs: Sequence[Any], value: torch.Tensor, what: str, block: str) -> int | None:
    """Where among `inputs` `value` is (the same object), if anywhere."""
    found = [j for j, x in enumerate(inputs) if x is value]
    if len(found) > 1:
        raise Unpairable(f"{block} receives {what} as arguments {found}: which one continues it cannot be told")
    return found[0] if found else None


def _tensors(leaves: list[Any], block: str) -> list[torch.Tensor]:
    """`leaves` (a block's outputs), which must all be tensors to be followed as streams."""
    for k, value in enumerate(leaves):
        if not isinstance(value, torch.Tensor):
            raise Unpairable(f"{block} returns a {type(value).__name__} as output {k}")
    return leaves


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
