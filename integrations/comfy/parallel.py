"""Sequence parallelism for ComfyUI's diffusion models: one sampling run on N devices.

    Parallel Model (wavespeed) -> model_options["wavepass"]["parallel"] = {"devices": [...], ...}

The ComfyUI process is rank 0: it runs ComfyUI's sampler unchanged. N-1 worker processes
(`torch.multiprocessing`, spawn) are started on the first call, kept across runs, and
started again after a failure or a change of devices (`Pool`, owned by this module). Every
call of the diffusion model is mirrored: rank 0 sends the call (inputs, timestep,
conditioning, the plain part of `transformer_options`) to every worker, and every rank runs
the same apply-model wrappers (the wavespeed ones included, from the same settings) on its
own copy of the model. Inside the model, every rank holds a shard of the token sequence:

    Flux's forward (ComfyUI)                    what the patch here does (every rank r)
    ------------------------------------        ---------------------------------------------
    img, txt = img_in(x), txt_in(context)
    pe = pe_embedder(cat(txt_ids, img_ids))
    double_blocks[0](img, txt, pe)              before: img, txt -> chunk r of each
    double_blocks[i](img, txt, pe)              before: pe -> [pe_txt chunk r, pe_img chunk r]
      attention(q, k, v)                          Ulysses: all-to-all tokens <-> heads
    double_blocks[-1]                           after: img, txt made whole (all-gather)
    img = cat(txt, img); img_slice = [T, T+L]
    single_blocks[0](img, pe)                   before: img -> [its text chunk r, image chunk r]
    single_blocks[i](img, pe)                   before: pe -> the same rows
    single_blocks[-1]                           after: img made whole, part by part
    img[:, T:], final_layer, unpatchify         (every rank holds the whole output)

The shards are cut and joined in ComfyUI's own block-replace patch
(`transformer_options["patches_replace"]["dit"][(kind, i)]`), which runs in the model's own
forward around each block and names the blocks' streams by role ("img", "txt", "pe", "vec"),
so the cut lies outside the blocks: the first block sees a shard, as every other block does,
and First Block Cache measures its change on the shard. Attention is Ulysses over torch's own
collectives (`all_to_all_single`), through ComfyUI's attention hook
`transformer_options["optimized_attention_override"]`: Dynamo traces the synchronous
collectives as `_c10d_functional` ops, from which `wavepass.distributed` learns the group
and sums every decision over the ranks, so every rank decides as one process would.

There is no table of model classes: one rule (`stack_streams`) reads what ComfyUI's DiT
forwards publish around every block: the streams by role, which block of how many runs
(`block_index`, `total_blocks`: each stack is cut before its first block and made whole after
its last), where a joined sequence's image begins (`img_slice`), and whether the text is joined
to the image (the rope table lists its tokens) or attended across (it does not). A model whose
forward does not publish these is refused before sampling (`check_model`). An attention mask
over the whole joined sequence (regional prompting) is put in the order Ulysses gathers the
tokens (the block patch tells attention the sequence's parts); token counts that do not divide
by N, masks of another extent, per-token modulation and heads that do not divide by N are
refused with the reason and the fix.
"""

from __future__ import annotations

import datetime
import importlib
import logging
import os
import queue
import socket
import sys
import time
import traceback
import types
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing

log = logging.getLogger("wavepass")

STARTUP_S = 300.0  # a worker's spawn and imports (torch, ComfyUI), on a busy machine
FAILURE_REPORT_S = 5.0  # how long rank 0 waits for a failed worker's own report
WRAPPER_KEY = "wavepass_parallel"
# entries of `transformer_options` that each rank builds for itself: never sent
OWN_OPTIONS = ("wrappers", "callbacks", "patches", "patches_replace", "optimized_attention_override")
# Where the workers import ComfyUI from: None, as in ComfyUI (its modules on sys.path, its
# command-line arguments copied); tests name a "module:function" that prepares the imports.
worker_setup: str | None = None


class ParallelRefusal(ValueError):
    """Settings or a model that cannot run on several devices: the reason and the fix."""


class ParallelWorkerError(RuntimeError):
    """A worker died or raised: names the worker (rank, device) and the cause."""


# ---------------------------------------------------------------------------------------------
# Which streams to cut: read from what ComfyUI's DiT forwards publish around each block
# ---------------------------------------------------------------------------------------------

# The names a DiT forward that follows ComfyUI's block convention holds as constants: it runs
# its blocks through `patches_replace["dit"]` and says which block of how many runs now.
CONVENTION = ("dit", "block_index", "total_blocks")
HEAD_ATTRIBUTES = ("num_heads", "heads", "n_heads", "num_attention_heads")


def _code_constants(cls: type) -> set[str]:
    """The string constants in the code of `cls`'s own methods (not nn.Module's), nested
    functions included."""
    found: set[str] = set()
    pending = [value.__code__ for klass in cls.__mro__ if klass not in (torch.nn.Module, object)
               for value in vars(klass).values() if hasattr(value, "__code__")]
    while pending:
        code = pending.pop()
        for constant in code.co_consts:
            if isinstance(constant, str):
                found.add(constant)
            elif isinstance(constant, types.CodeType):
                pending.append(constant)
    return found


def attention_heads(model: torch.nn.Module) -> set[int]:
    """The head counts the model's modules keep (`num_heads`, `heads`, ...)."""
    return {value for module in model.modules() for name in HEAD_ATTRIBUTES
            if isinstance(value := getattr(module, name, None), int) and not isinstance(value, bool) and value > 0}


def check_model(model: torch.nn.Module, world: int) -> None:
    """Refuse, before sampling, a model whose forward does not follow ComfyUI's block
    convention (the sequence is cut in its block patches) or whose heads do not split."""
    model = getattr(model, "_orig_mod", model)
    name = type(model).__name__
    missing = [constant for constant in CONVENTION if constant not in _code_constants(type(model))]
    if missing:
        raise ParallelRefusal(
            f"Parallel Model: {name} cannot be split over devices: its forward does not run its "
            f"blocks through ComfyUI's block patches saying which block runs "
            f"(transformer_options['block_index'] and ['total_blocks']), where the sequence is "
            f"cut and joined. Fix: sample this model on one device.")
    uneven = sorted(heads for heads in attention_heads(model) if heads % world)
    if uneven:
        raise ParallelRefusal(
            f"Parallel Model: {name} has {uneven[0]} attention heads, which do not divide among "
            f"{world} devices (Ulysses gives each device whole heads). Fix: use a number of "
            f"devices that divides {uneven[0]}.")
    if not any(isinstance(m, torch.nn.ModuleList) and len(m) > 0 for m in model.modules()):
        raise ParallelRefusal(f"Parallel Model: {name} has no blocks to split.")


@dataclass(frozen=True)
class StackStreams:
    """The token streams of the block stack running now, by role, with their whole lengths.

    parts:   role -> the lengths of the parts it joins, each cut into chunks on its own ("img"
             of a stack that runs on the joined sequence: (text, image), as the model's
             `img_slice` says); every rank holds chunk `rank` of each part, in the same order
    context: roles every rank holds whole (cross-attention keys: no rope rows)
    rope:    the lengths of the parts the rope table `pe` lists, in its order; () without one
    """

    parts: dict[str, tuple[int, ...]]
    context: tuple[str, ...]
    rope: tuple[int, ...]


def stack_streams(args: dict, world: int, first: bool) -> StackStreams:
    """Which streams of a block's patch arguments `args` are cut, and how, read from ComfyUI's
    names and the rope table (whole at every block; the streams are whole at the first block,
    chunks after):

    - "img" is the stream the stack runs on: cut. Where the model publishes `img_slice` =
      [text tokens, all tokens] for a stack without "txt", "img" is the joined sequence: its
      text and image parts are cut apart.
    - "txt" beside "img" is joined to it in attention when the rope table lists its tokens too
      (ComfyUI lists the text first: `ids = cat(txt_ids, img_ids)`): cut; when the table lists
      the image tokens alone, it is cross-attention context: kept whole.
    """
    scale = 1 if first else world
    image = args["img"].shape[1] * scale
    table = args.get("pe")
    if "txt" not in args or args["txt"] is None:
        split = args["transformer_options"].get("img_slice")
        parts = (split[0], image - split[0]) if split and split[1] == image and 0 < split[0] < image else (image,)
        if table is not None:
            _token_axis(table, sum(parts))
        return StackStreams({"img": parts}, (), parts if table is not None else ())
    if table is None:
        raise ParallelRefusal(
            "Parallel Model: a block takes a text stream and no rope table; whether the text is "
            "joined to the image in attention or attended across cannot be read. Fix: sample "
            "this model on one device.")
    text = args["txt"].shape[1]
    joint, cross = _axes(table, text * scale + image), _axes(table, image)
    if len(joint) == 1 and not cross:
        return StackStreams({"txt": (text * scale,), "img": (image,)}, (), (text * scale, image))
    if len(cross) == 1 and not joint:
        return StackStreams({"img": (image,)}, ("txt",), (image,))
    raise ParallelRefusal(
        f"Parallel Model: the rope table of shape {tuple(table.shape)} has no single token axis "
        f"of {image} image (+ {text * scale} text) rows; this model cannot be split.")


def _axes(table: torch.Tensor, rows: int) -> list[int]:
    return [axis for axis in range(1, table.ndim) if table.shape[axis] == rows]


def _rows(tensor: torch.Tensor, axis: int, start: int, stop: int) -> torch.Tensor:
    return tensor[(slice(None),) * axis + (slice(start, stop),)]


def _token_axis(table: torch.Tensor, rows: int) -> int:
    axes = _axes(table, rows)
    if len(axes) != 1:
        raise ParallelRefusal(
            f"Parallel Model: the rope table of shape {tuple(table.shape)} has no single token "
            f"axis of {rows} rows; this model cannot be split.")
    return axes[0]


# ---------------------------------------------------------------------------------------------
# Shards, gathers and Ulysses attention (run by every rank, traced by Dynamo)
# ---------------------------------------------------------------------------------------------

MASK_REFUSAL = ("Parallel Model: an attention mask that does not span the whole joined sequence "
                "(its last axis: keys, the one before: queries, or one row) cannot be split over "
                "devices. Fix: sample without the mask (or on one device).")
# transformer_options entry the block patch sets for the block it runs: the whole lengths of the
# parts of the sequence its attention joins, in order (the Ulysses order of a mask's rows)
SEQUENCE = "wavepass_parallel_sequence"


class Sharding:
    """This rank's part of a sequence split over the default process group."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def local_length(self, length: int, role: str) -> int:
        if length % self.world:
            raise ParallelRefusal(
                f"Parallel Model: the `{role}` stream has {length} tokens, which do not divide "
                f"among {self.world} devices (uneven shards are not supported). Fix: choose a "
                f"width/height (or, for text, a prompt padding) whose token count divides by "
                f"{self.world}.")
        return length // self.world

    def shard(self, tensor: torch.Tensor, parts: tuple[int, ...], role: str, axis: int = 1) -> torch.Tensor:
        """This rank's rows of `tensor` along `axis`: chunk `rank` of each part (`parts`, their
        whole lengths, in order), joined. Cut with slices and `cat`, which wavepass's stream
        tracing follows (`find_streams`): a stream cut between two stacks still continues the
        first block's output, and the stacks are cached as one region, as on one device."""
        pieces, start = [], 0
        for length in parts:
            size = self.local_length(length, role)
            pieces.append(_rows(tensor, axis, start + self.rank * size, start + (self.rank + 1) * size))
            start += length
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=axis)

    def gather(self, tensor: torch.Tensor, parts: tuple[int, ...]) -> torch.Tensor:
        """The whole stream (dim 1) from every rank's chunks of its `parts`, each part in rank
        order. This rank's chunks are slices of `tensor` itself, not copies from the all-gather:
        the same values, and the cached program can follow a stream back to the blocks through
        them."""
        local = tensor.contiguous()
        gathered = torch.empty((self.world * local.shape[0], *local.shape[1:]), dtype=local.dtype,
                               device=local.device)
        dist.all_gather_into_tensor(gathered, local)
        ranks = list(gathered.unflatten(0, (self.world, local.shape[0])).unbind(0))
        sizes = [length // self.world for length in parts]
        starts = [sum(sizes[:part]) for part in range(len(parts))]
        pieces = [tensor[:, start:start + size] if rank == self.rank else ranks[rank][:, start:start + size]
                  for start, size in zip(starts, sizes) for rank in range(self.world)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def _tokens_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, S/N, d] on each rank -> [B, H/N, S, d] (heads group `rank`, every rank's tokens)."""
        b, h, s, d = x.shape
        send = x.reshape(b, self.world, h // self.world, s, d).movedim(1, 0).contiguous()
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send)
        return received.permute(1, 2, 0, 3, 4).reshape(b, h // self.world, self.world * s, d)

    def _heads_to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `_tokens_to_heads`."""
        b, h_local, s_all, d = x.shape
        s = s_all // self.world
        send = x.reshape(b, h_local, self.world, s, d).movedim(2, 0).contiguous()
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send)
        return received.movedim(0, 1).reshape(b, self.world * h_local, s, d)

    def attention(self, attention, q, k, v, heads, *args, **kwargs):
        """ComfyUI's `optimized_attention_override`: Ulysses where the keys are this rank's
        tokens (self- and joint attention), plain attention where they are a whole stream that
        every rank holds (cross-attention to the text). A mask over the whole joined sequence
        is put in Ulysses' order, and cut to this rank's heads."""
        skip_reshape = kwargs.get("skip_reshape", False)
        token_axis = 2 if skip_reshape else 1
        if k.shape[token_axis] != q.shape[token_axis]:
            return attention(q, k, v, heads, *args, **kwargs)
        args, kwargs = list(args), dict(kwargs)
        mask = args[0] if args else kwargs.get("mask")
        if mask is not None:
            sequence = (kwargs.get("transformer_options") or {}).get(SEQUENCE)
            mask = self._ulysses_mask(mask, sequence, heads)
            if args:
                args[0] = mask
            else:
                kwargs["mask"] = mask
        if not skip_reshape:  # [B, S, H*d] -> [B, H, S, d]
            q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
        q, k, v = (self._tokens_to_heads(t) for t in (q, k, v))
        inner = {**kwargs, "skip_reshape": True, "skip_output_reshape": True}
        out = self._heads_to_tokens(attention(q, k, v, heads // self.world, *args, **inner))
        if kwargs.get("skip_output_reshape", False):
            return out
        return out.transpose(1, 2).flatten(2)


    def _ulysses_mask(self, mask: torch.Tensor, sequence: tuple[int, ...] | None, heads: int) -> torch.Tensor:
        """`mask` over the whole joined sequence in the model's order (its parts, `sequence`,
        one after another) -> in the order Ulysses gathers it (every rank's chunks of every
        part, rank after rank), on its key axis (the last) and its query axis (the one before,
        unless a single row), cut to this rank's heads where it has an axis of `heads`.
        Layouts as ComfyUI's attention reads them: [k] [q, k] [B, q, k] [B, H or 1, q, k]."""
        total = sum(sequence) if sequence else None
        # (no `in (1, total)`: Dynamo answers it for a symbolic total by identity, not value)
        if total is None or mask.shape[-1] != total or (mask.ndim >= 2 and mask.shape[-2] != 1
                                                         and mask.shape[-2] != total):
            raise ParallelRefusal(MASK_REFUSAL)
        order = self.ulysses_order(sequence, mask.device)
        mask = mask.index_select(-1, order)
        if mask.ndim >= 2 and mask.shape[-2] == total:
            mask = mask.index_select(-2, order)
        if mask.ndim == 4 and mask.shape[1] == heads and heads > 1:
            size = heads // self.world
            mask = mask[:, self.rank * size:(self.rank + 1) * size]
        return mask

    def ulysses_order(self, sequence: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Positions in the model's sequence (its parts one after another) of the tokens as
        Ulysses gathers them: rank 0's chunk of each part, then rank 1's, ..."""
        positions, starts = [], [sum(sequence[:part]) for part in range(len(sequence))]
        for rank in range(self.world):
            for start, length in zip(starts, sequence):
                size = length // self.world
                positions.append(torch.arange(start + rank * size, start + (rank + 1) * size, device=device))
        return torch.cat(positions)


def block_patch(sharding: Sharding):
    """ComfyUI's block-replace patch for every block of every stack: the stack's streams are
    cut before its first block (`block_index` 0), every block gets its rows of the rope table,
    and the streams are made whole after its last (`total_blocks` - 1), so that the model's
    code between and after its stacks sees whole streams, as on one device."""
    def patch(args: dict, extra: dict) -> dict:
        options = args.get("transformer_options") or {}
        if "block_index" not in options or "total_blocks" not in options:
            raise ParallelRefusal("Parallel Model: a block ran without saying which block of how many "
                                  "(transformer_options['block_index'], ['total_blocks']); this model "
                                  "cannot be split. Fix: sample it on one device.")
        first, last = options["block_index"] == 0, options["block_index"] == options["total_blocks"] - 1
        vec = args.get("vec")
        if isinstance(vec, torch.Tensor) and vec.ndim >= 3 and vec.shape[1] != 1:
            raise ParallelRefusal("Parallel Model: per-token modulation (e.g. Wan 2.2 5B) is not "
                                  "split yet. Fix: sample this model on one device.")
        streams = stack_streams(args, sharding.world, first)
        args = dict(args)
        if first:
            for role, parts in streams.parts.items():
                args[role] = sharding.shard(args[role], parts, role)
            local = args["img"].shape[1]
            for role in streams.context:
                if args[role].shape[1] == local:  # self and cross attention would look alike
                    raise ParallelRefusal(
                        f"Parallel Model: the `{role}` stream has as many tokens ({local}) as each "
                        f"device's share of the image; attention cannot tell them apart. Fix: "
                        f"change the resolution or the number of devices.")
        if streams.rope:
            table = args["pe"]
            args["pe"] = sharding.shard(table, streams.rope, "pe", _token_axis(table, sum(streams.rope)))
        args["transformer_options"] = {**options, SEQUENCE: streams.rope or streams.parts["img"]}
        out = extra["original_block"](args)
        if not last:
            return out
        return {role: sharding.gather(value, streams.parts[role]) if role in streams.parts else value
                for role, value in out.items()}

    return patch


def install_sharding(patcher, rank: int, world: int) -> None:
    """Put this rank's block patch (on every block index of both of ComfyUI's block kinds) and
    Ulysses attention on `patcher` (a ModelPatcher)."""
    model = patcher.get_model_object("diffusion_model")
    sharding = Sharding(rank, world)
    patch = block_patch(sharding)
    blocks = max(len(m) for m in model.modules() if isinstance(m, torch.nn.ModuleList))
    for kind in ("double_block", "single_block"):
        for index in range(blocks):
            patcher.set_model_patch_replace(patch, "dit", kind, index)
    patcher.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = sharding.attention


# ---------------------------------------------------------------------------------------------
# The worker processes
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PoolSpec:
    devices: tuple[str, ...]  # rank r runs on devices[r]; rank 0 is this process
    backend: str  # "gloo" or "nccl"
    timeout_s: float  # the process group's timeout: how long a rank waits for the others

    @property
    def world(self) -> int:
        return len(self.devices)


def backend_for(devices: tuple[str, ...], backend: str) -> str:
    if backend != "auto":
        return backend
    return "nccl" if all(torch.device(d).type == "cuda" for d in devices) else "gloo"


def parse_devices(text: str) -> tuple[str, ...]:
    """"cuda:0,cuda:1" -> ("cuda:0", "cuda:1"); refused where a device does not exist."""
    devices = tuple(part.strip() for part in text.split(",") if part.strip())
    if len(devices) < 2:
        raise ParallelRefusal(f"Parallel Model: need at least 2 devices, got {text!r}. Fix: list "
                              f"them separated by commas, e.g. cuda:0,cuda:1.")
    for name in devices:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ParallelRefusal(f"Parallel Model: {name!r} is not a device name (e.g. cuda:1).") from None
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if device.index is None or device.index >= count:
                raise ParallelRefusal(
                    f"Parallel Model: {name} does not exist: this machine has {count} CUDA "
                    f"device(s). Fix: list only cuda:0 .. cuda:{max(count - 1, 0)} (with an index).")
        elif device.type != "cpu":
            raise ParallelRefusal(f"Parallel Model: {name}: only cuda:N and cpu devices are supported.")
    cuda = [d for d in devices if d.startswith("cuda")]
    if len(set(cuda)) != len(cuda):
        raise ParallelRefusal(f"Parallel Model: a CUDA device is listed twice in {text!r}; each "
                              f"device runs one rank.")
    return devices


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _without_main_module():
    """Spawn runs the parent's `__main__` again in each child (as `__mp_main__`); ComfyUI's
    main.py starts a server and runs prestartup scripts at import. The children import what
    they need themselves, so `__main__` is hidden from spawn while they start."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


class Pool:
    """The worker processes of one device set, and rank 0's end of the process group."""

    def __init__(self, spec: PoolSpec):
        self.spec = spec
        self.model_key: object = None  # which model (and weight patches) the workers hold
        self.closed = False
        context = torch.multiprocessing.get_context("spawn")
        self.outbox = context.Queue()  # from the workers: ("ready" | "error" | "stats", rank, ...)
        self.inboxes = [context.Queue() for _ in spec.devices[1:]]
        address = f"tcp://127.0.0.1:{_free_port()}"
        import comfy.cli_args

        comfy_args = vars(comfy.cli_args.args).copy()
        self.processes = []
        with _without_main_module():
            for rank, inbox in enumerate(self.inboxes, start=1):
                process = context.Process(
                    target=_worker_main, daemon=True, name=f"wavespeed-rank{rank}",
                    args=(rank, spec, address, worker_setup, comfy_args, torch.get_num_threads(),
                          inbox, self.outbox))
                process.start()
                self.processes.append(process)
        try:
            self._await("imported", STARTUP_S)
            dist.init_process_group(spec.backend, init_method=address, rank=0, world_size=spec.world,
                                    timeout=datetime.timedelta(seconds=spec.timeout_s))
            self._await("ready", STARTUP_S)
        except BaseException:
            self.close()
            raise

    def worker_name(self, rank: int) -> str:
        return f"worker rank {rank} ({self.spec.devices[rank]})"

    def _await(self, what: str, timeout: float) -> dict[int, Any]:
        """Every worker's `what` message, or ParallelWorkerError when one dies, reports an
        error, or is silent for `timeout` seconds."""
        answers: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(answers) < len(self.processes):
            try:
                kind, rank, payload = self.outbox.get(timeout=0.2)
            except queue.Empty:
                self.check_alive()
                if time.monotonic() > deadline:
                    missing = sorted(set(range(1, self.spec.world)) - set(answers))
                    raise ParallelWorkerError(f"wavespeed parallel: {', '.join(map(self.worker_name, missing))} "
                                              f"did not answer {what!r} within {timeout:.0f} s") from None
                continue
            if kind == "error":
                raise ParallelWorkerError(f"wavespeed parallel: {self.worker_name(rank)} failed: {payload}")
            if kind == what:
                answers[rank] = payload
        return answers

    def check_alive(self) -> None:
        dead = self._dead_worker(0)
        if dead is not None:
            raise dead

    def _dead_worker(self, wait: float) -> ParallelWorkerError | None:
        """The error of the first worker that exited (with its own report, if one arrives
        within `wait` seconds), or None while all live."""
        for rank, process in enumerate(self.processes, start=1):
            if not process.is_alive():
                return ParallelWorkerError(f"wavespeed parallel: {self.worker_name(rank)} exited "
                                           f"({_exit_reason(process.exitcode)}){self._reported(wait)}")
        return None

    def _reported(self, wait: float) -> str:
        """A worker's own report of its failure, if one arrives within `wait` seconds."""
        deadline = time.monotonic() + wait
        while True:
            try:
                kind, rank, payload = self.outbox.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                return ""
            if kind == "error":
                return f": {payload}"

    def send(self, message: tuple) -> None:
        self.check_alive()
        for inbox in self.inboxes:
            inbox.put(message)

    def failure(self) -> ParallelWorkerError | None:
        """After an error on rank 0: the worker failure that caused it, if a worker died or
        reported one within FAILURE_REPORT_S."""
        deadline = time.monotonic() + FAILURE_REPORT_S
        while time.monotonic() < deadline:
            try:
                kind, rank, payload = self.outbox.get(timeout=0.1)
            except queue.Empty:
                dead = self._dead_worker(0.5)
                if dead is not None:
                    return dead
                continue
            if kind == "error":
                return ParallelWorkerError(f"wavespeed parallel: {self.worker_name(rank)} failed: {payload}")
        return None

    def worker_stats(self) -> dict[int, tuple]:
        """{rank: wavepass.stats of its diffusion model, as a tuple} of every worker."""
        self.send(("stats",))
        return self._await("stats", self.spec.timeout_s)

    def worker_graphs(self) -> dict[int, int]:
        """{rank: the graphs Dynamo compiled in that worker so far} of every worker."""
        self.send(("graphs",))
        return self._await("graphs", self.spec.timeout_s)

    def close(self) -> None:
        """Stop the workers (asked, then killed) and leave the process group."""
        if self.closed:
            return
        self.closed = True
        for inbox, process in zip(self.inboxes, self.processes):
            if process.is_alive():
                inbox.put(("stop",))
        deadline = time.monotonic() + 5.0
        for process in self.processes:
            process.join(timeout=max(deadline - time.monotonic(), 0.1))
            if process.is_alive():
                process.kill()
                process.join(timeout=5.0)
        for channel in (*self.inboxes, self.outbox):  # never wait at exit for a dead reader
            channel.cancel_join_thread()
            channel.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


_pool: Pool | None = None


def pool_for(spec: PoolSpec) -> Pool:
    """The running pool for `spec`: the current one, or a new one (after a failure or for
    other devices)."""
    global _pool
    if _pool is not None and (_pool.closed or _pool.spec != spec):
        shutdown()
    if _pool is None:
        if dist.is_initialized():
            raise ParallelRefusal("Parallel Model: this ComfyUI process already belongs to a process "
                                  "group (another extension?); wavespeed needs its own.")
        _pool = Pool(spec)
    return _pool


def current_pool() -> Pool | None:
    return _pool if _pool is not None and not _pool.closed else None


def shutdown() -> None:
    """Stop the workers, if any (the next parallel run starts new ones)."""
    global _pool
    if _pool is not None:
        _pool.close()
        _pool = None


def _worker_main(rank, spec: PoolSpec, address, setup, comfy_args, threads, inbox, outbox) -> None:
    device = spec.devices[rank]
    try:
        torch.set_num_threads(threads)
        if setup:
            module, _, function = setup.partition(":")
            getattr(importlib.import_module(module), function)()
        if "comfy.model_management" not in sys.modules:
            import comfy.cli_args

            vars(comfy.cli_args.args).update(comfy_args)
        if torch.device(device).type == "cuda":
            torch.cuda.set_device(torch.device(device))
        import comfy.model_patcher  # noqa: F401  (imports ComfyUI's model code)

        outbox.put(("imported", rank, None))
        dist.init_process_group(spec.backend, init_method=address, rank=rank, world_size=spec.world,
                                timeout=datetime.timedelta(seconds=spec.timeout_s))
        outbox.put(("ready", rank, None))
        with torch.no_grad():
            _Worker(rank, spec, outbox).serve(inbox)
    except BaseException as error:  # report, then leave: the other ranks' collectives fail at once
        outbox.put(("error", rank, f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
        outbox.close()
        outbox.join_thread()
        os._exit(1)
    dist.destroy_process_group()


class _Worker:
    """A worker's model and its sampling run, driven by rank 0's messages."""

    def __init__(self, rank: int, spec: PoolSpec, outbox):
        self.rank, self.spec, self.outbox = rank, spec, outbox
        self.device = torch.device(spec.devices[rank])
        self.base = None  # ComfyUI's BaseModel, with rank 0's weights
        self.patcher = None  # its ModelPatcher: block patches, and the run's settings and wrappers
        self.run = ExitStack()  # the sampling run in progress (wavespeed's run state)

    def serve(self, inbox) -> None:
        while True:
            message = inbox.get()
            kind, args = message[0], message[1:]
            if kind == "stop":
                self.run.close()
                return
            getattr(self, f"on_{kind}")(*args)

    def on_model(self, config_class, config_state, state_dict) -> None:
        import comfy.model_patcher

        self.run.close()
        # sent as class and attributes: ComfyUI's model configs do not unpickle as objects
        model_config = object.__new__(config_class)
        vars(model_config).update(config_state)
        self.base = model_config.get_model({}, device=self.device)
        self.base.diffusion_model.load_state_dict(state_dict)
        self.base.eval()
        self.patcher = comfy.model_patcher.ModelPatcher(self.base, load_device=self.device,
                                                        offload_device=self.device)
        install_sharding(self.patcher, self.rank, self.spec.world)

    def on_run(self, settings: dict) -> None:
        """A sampling run begins, with the MODEL's wavepass settings (cache, compile, parallel):
        the wavespeed wrappers are installed again from them, the blocks' patches stay."""
        from . import sampling

        self.run.close()
        own = sampling.settings_of(self.patcher)
        own.clear()
        own.update(settings)
        sampling.install(self.patcher)
        if sampling.uses_wavespeed(settings):
            self.run.enter_context(sampling.sampling_run(self.patcher, settings))

    def on_end_run(self) -> None:
        self.run.close()

    def on_call(self, x, t, c_concat, c_crossattn, control, plain_options, kwargs) -> None:
        import comfy.patcher_extension

        options = dict(self.patcher.model_options.get("transformer_options", {}))
        options.update(plain_options)
        # as ComfyUI's sampler does (sampler_helpers.prepare_model_patcher): the patcher's
        # wrappers (the wavespeed ones) reach the model through transformer_options
        options["wrappers"] = comfy.patcher_extension.copy_nested_dicts(self.patcher.wrappers)
        move = _to_device(self.device)
        self.base.apply_model(move(x), move(t), move(c_concat), move(c_crossattn), move(control),
                              options, **move(kwargs))

    def on_stats(self) -> None:
        import wavepass

        module = self.patcher.get_model_object("diffusion_model") if self.patcher else None
        stats = _stats_tuple(wavepass.stats(module)) if module is not None else None
        self.outbox.put(("stats", self.rank, stats))

    def on_graphs(self) -> None:
        self.outbox.put(("graphs", self.rank, torch._dynamo.utils.counters["stats"]["unique_graphs"]))


def _stats_tuple(stats) -> tuple:
    return (stats.calls, stats.hits, tuple(stats.decisions), stats.reason)


def _map_tensors(function: Callable[[torch.Tensor], torch.Tensor], value):
    """`value` (tensors in nested dicts, lists and tuples) with `function` of every tensor."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, dict):
        return {k: _map_tensors(function, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(function, v) for v in value)
    return value


def _to_device(device: torch.device):
    return lambda value: _map_tensors(lambda tensor: tensor.to(device), value)


# ---------------------------------------------------------------------------------------------
# Rank 0: the wrappers that mirror each model call
# ---------------------------------------------------------------------------------------------

@dataclass
class _ParallelRun:
    """One sampling run on rank 0: its patcher, and whether the workers have begun it."""

    patcher: Any
    begun: bool = False


_parallel_run: ContextVar[_ParallelRun | None] = ContextVar("wavepass_parallel_run", default=None)


def _plain(value) -> bool:
    """Whether `value` can be sent to a worker as it is (tensors and plain data)."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.dtype)):
        return True
    if isinstance(value, (list, tuple)):
        return all(map(_plain, value))
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    return type(value).__module__ == "uuid"


def plain_options(transformer_options: dict) -> dict:
    """The entries of `transformer_options` a worker takes from rank 0: the plain ones, except
    those each rank builds itself (its wrappers and patches). Other patches are refused."""
    foreign = [key for key in ("patches",) if transformer_options.get(key)]
    foreign += [f"patches_replace[{k!r}]" for k in transformer_options.get("patches_replace", {}) if k != "dit"]
    if foreign:
        raise ParallelRefusal(f"Parallel Model: the model carries patches ({', '.join(foreign)}) "
                              f"that the worker processes cannot receive. Fix: sample it on one device.")
    return {key: value for key, value in transformer_options.items()
            if key not in OWN_OPTIONS and _plain(value)}


def _copies(value):
    """`value` with a copy of each CPU tensor, for a worker. The queue's feeder thread moves a
    CPU tensor it sends into shared memory (a new storage under the same tensor), which must not
    happen to a tensor the model is computing with. CUDA tensors travel as CUDA IPC handles,
    unmoved and uncopied: a worker copies them to its device before its first collective, which
    rank 0 waits for."""
    return _map_tensors(lambda tensor: tensor.detach().clone() if tensor.device.type == "cpu" else tensor.detach(),
                        value)


def spec_of(settings: dict) -> PoolSpec:
    parallel = settings["parallel"]
    return PoolSpec(tuple(parallel["devices"]), parallel["backend"], float(parallel["timeout_s"]))


def model_key(patcher) -> tuple:
    """What the workers' copy of the weights must match: the model and its weight patches."""
    return (id(patcher.model), getattr(patcher.model, "current_weight_patches_uuid", None), patcher.patches_uuid)


def install(patcher, settings: dict) -> None:
    """(Re)install the parallel wrappers and rank 0's block patches on `patcher`."""
    from comfy.patcher_extension import WrappersMP

    for kind in (WrappersMP.OUTER_SAMPLE, WrappersMP.APPLY_MODEL):
        patcher.remove_wrappers_with_key(kind, WRAPPER_KEY)
    patcher.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _outer_sample)
    patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, _apply_model_wrapper(settings))
    install_sharding(patcher, 0, len(settings["parallel"]["devices"]))


def _outer_sample(executor, *args, **kwargs):
    run = _ParallelRun(executor.class_obj.model_patcher)
    token = _parallel_run.set(run)
    try:
        return executor(*args, **kwargs)
    finally:
        _parallel_run.reset(token)
        pool = current_pool()
        if run.begun and pool is not None:
            pool.send(("end_run",))


def _apply_model_wrapper(settings: dict):
    from . import sampling

    def apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                    **kwargs):
        run = _parallel_run.get()
        if run is None:
            raise ParallelRefusal("Parallel Model: the model was called outside a sampling run "
                                  "(ComfyUI's sampler); only sampling runs on several devices.")
        if control is not None:
            raise ParallelRefusal("Parallel Model: ControlNet inputs are not split over devices yet. "
                                  "Fix: sample with ControlNet on one device.")
        options = transformer_options or {}
        plain = plain_options(options)
        pool = pool_for(spec_of(settings))
        try:
            if not run.begun:
                key = model_key(run.patcher)
                if pool.model_key != key:
                    base = run.patcher.model
                    module = getattr(base.diffusion_model, "_orig_mod", base.diffusion_model)
                    pool.send(("model", type(base.model_config), vars(base.model_config),
                               _copies(module.state_dict())))
                    pool.model_key = key
                pool.send(("run", sampling.settings_of(run.patcher)))
                run.begun = True
            pool.send(("call", *_copies((x, t, c_concat, c_crossattn, control, plain, kwargs))))
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        except (ParallelWorkerError, ParallelRefusal):  # every rank refuses alike: rank 0's words
            shutdown()
            raise
        except BaseException as error:
            cause = pool.failure() if isinstance(error, Exception) else None
            shutdown()  # the workers may wait in a collective rank 0 never reaches: start clean
            if cause is not None:
                raise cause from error
            raise

    return apply_model
