"""Sequence parallelism inside ComfyUI's diffusion models: where every rank cuts the token
streams, and Ulysses attention. Run by every rank (rank 0 and the workers of `parallel.py`)
inside the model's forward, traced by Dynamo.

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

import types
from dataclasses import dataclass

import torch
import torch.distributed as dist


class ParallelRefusal(ValueError):
    """Settings or a model that cannot run on several devices: the reason and the fix."""


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
    for heads in sorted(attention_heads(model)):
        heads_per_device(heads, world, name)
    if not any(isinstance(m, torch.nn.ModuleList) and len(m) > 0 for m in model.modules()):
        raise ParallelRefusal(f"Parallel Model: {name} has no blocks to split.")


def heads_per_device(heads: int, world: int, model: str = "the model") -> int:
    """Ulysses gives each device `heads` / `world` whole heads; refused where they do not divide."""
    if heads % world:
        raise ParallelRefusal(
            f"Parallel Model: {model} has {heads} attention heads, which do not divide among "
            f"{world} devices (Ulysses gives each device whole heads). Fix: use a number of "
            f"devices that divides {heads}.")
    return heads // world


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
        pieces = [_rows(tensor, axis, start, stop) for start, stop in self._chunk_rows(parts, self.rank, role)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=axis)

    def _chunk_rows(self, parts: tuple[int, ...], rank: int, role: str) -> list[tuple[int, int]]:
        """(start, stop) in the whole sequence (`parts`, one after another) of `rank`'s chunk
        of each part."""
        rows, start = [], 0
        for length in parts:
            size = self.local_length(length, role)
            rows.append((start + rank * size, start + (rank + 1) * size))
            start += length
        return rows

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
            mask = self.ulysses_mask(mask, sequence, heads)
            if args:
                args[0] = mask
            else:
                kwargs["mask"] = mask
        local_heads = heads_per_device(heads, self.world)  # a model whose heads check_model did not find
        if not skip_reshape:  # [B, S, H*d] -> [B, H, S, d]
            q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
        q, k, v = (self._tokens_to_heads(t) for t in (q, k, v))
        inner = {**kwargs, "skip_reshape": True, "skip_output_reshape": True}
        out = self._heads_to_tokens(attention(q, k, v, local_heads, *args, **inner))
        if kwargs.get("skip_output_reshape", False):
            return out
        return out.transpose(1, 2).flatten(2)

    def ulysses_mask(self, mask: torch.Tensor, sequence: tuple[int, ...] | None, heads: int) -> torch.Tensor:
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
        order = self._ulysses_order(sequence, mask.device)
        mask = mask.index_select(-1, order)
        if mask.ndim >= 2 and mask.shape[-2] == total:
            mask = mask.index_select(-2, order)
        if mask.ndim == 4 and mask.shape[1] == heads and heads > 1:
            size = heads_per_device(heads, self.world)
            mask = mask[:, self.rank * size:(self.rank + 1) * size]
        return mask

    def _ulysses_order(self, sequence: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Positions in the model's sequence (its parts one after another) of the tokens as
        Ulysses gathers them: rank 0's chunk of each part, then rank 1's, ..."""
        return torch.cat([torch.arange(start, stop, device=device) for rank in range(self.world)
                          for start, stop in self._chunk_rows(sequence, rank, "attention")])


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
