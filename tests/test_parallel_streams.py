"""`sequence_shards.stack_streams`, `Sharding.shard` and `Sharding.gather` on hand-built block
arguments: which streams a block patch cuts, how, and that every rank's chunks make the whole
stream again. No processes: the all-gather is a stand-in that returns every rank's chunks (the
real one runs in tests/test_comfy_parallel.py).

The cases are the ones a rule read from shapes would get wrong: text as long as the image,
text joined (rope rows for it) or attended across (none), the joined sequence of a single-stream
stack, the streams after the first block (chunks, the rope table still whole).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import comfy_support

comfy_support.require()

from wavepass_comfy import sequence_shards  # noqa: E402
from wavepass_comfy.sequence_shards import ParallelRefusal, Sharding, StackStreams, stack_streams  # noqa: E402


def flux_table(rows: int) -> torch.Tensor:
    """Flux's rope table layout: [batch, 1, tokens, dim/2, 2, 2]."""
    return torch.randn(1, 1, rows, 4, 2, 2)


def wan_table(rows: int) -> torch.Tensor:
    """Wan's: [batch, tokens, 1, dim/2, 2, 2]."""
    return torch.randn(1, rows, 1, 4, 2, 2)


def args(img: int, txt: int | None = None, table=None, img_slice=None) -> dict:
    options = {"block_index": 0, "total_blocks": 2}
    if img_slice is not None:
        options["img_slice"] = img_slice
    found = {"img": torch.randn(1, img, 8), "pe": table, "vec": torch.randn(1, 8), "transformer_options": options}
    if txt is not None:
        found["txt"] = torch.randn(1, txt, 8)
    return found


@pytest.mark.parametrize("text, image", [(6, 10), (8, 8), (10, 6)])
def test_text_the_rope_table_lists_is_joined_and_cut_text_first(text, image):
    streams = stack_streams(args(image, text, flux_table(text + image)), world=2, first=True)
    assert streams == StackStreams({"txt": (text,), "img": (image,)}, (), (text, image))


@pytest.mark.parametrize("text, image", [(6, 10), (8, 8), (10, 6)])
def test_text_the_rope_table_leaves_out_is_context_kept_whole(text, image):
    streams = stack_streams(args(image, text, wan_table(image)), world=2, first=True)
    assert streams == StackStreams({"img": (image,)}, ("txt",), (image,))


def test_after_the_first_block_the_streams_are_chunks_and_the_table_whole():
    later = args(5, 3, flux_table(16))  # chunks of 10 image and 6 text tokens on 2 ranks
    assert stack_streams(later, world=2, first=False) == StackStreams({"txt": (6,), "img": (10,)}, (), (6, 10))
    context = args(5, 7, wan_table(10))  # the text is whole: not scaled
    assert stack_streams(context, world=2, first=False) == StackStreams({"img": (10,)}, ("txt",), (10,))


def test_a_joined_sequence_is_cut_part_by_part_where_the_model_says_where_the_image_begins():
    joined = args(16, table=flux_table(16), img_slice=[6, 16])
    assert stack_streams(joined, world=2, first=True) == StackStreams({"img": (6, 10)}, (), (6, 10))
    later = args(8, table=flux_table(16), img_slice=[6, 16])
    assert stack_streams(later, world=2, first=False) == StackStreams({"img": (6, 10)}, (), (6, 10))
    # an img_slice left from another stack (it does not span this stream) is not read
    assert stack_streams(args(10, table=flux_table(10), img_slice=[6, 16]), world=2, first=True) == \
        StackStreams({"img": (10,)}, (), (10,))


def test_text_without_a_rope_table_is_refused():
    with pytest.raises(ParallelRefusal, match="text stream and no rope table"):
        stack_streams(args(8, 4, None), world=2, first=True)


def test_a_rope_table_without_one_token_axis_is_refused():
    with pytest.raises(ParallelRefusal, match="no single token axis"):
        stack_streams(args(8, 4, torch.randn(1, 5, 7)), world=2, first=True)
    with pytest.raises(ParallelRefusal, match="no single token axis"):  # two axes of 12 rows
        stack_streams(args(8, 4, torch.randn(1, 12, 12)), world=2, first=True)


class AllGather:
    """Stand-in for `dist.all_gather_into_tensor` in one process: every rank's chunks, stacked."""

    def __init__(self, chunks: list[torch.Tensor]):
        self.chunks = chunks

    def __call__(self, out: torch.Tensor, local: torch.Tensor) -> None:
        out.copy_(torch.cat(self.chunks, dim=0))


@settings(max_examples=40, deadline=None)
@given(world=st.sampled_from([1, 2, 3, 4]), parts=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       rank=st.data())
def test_every_ranks_chunks_gather_to_the_whole_stream(world, parts, rank):
    lengths = tuple(part * world for part in parts)
    whole = torch.arange(sum(lengths) * 2, dtype=torch.float32).reshape(1, sum(lengths), 2)
    chunks = [Sharding(r, world).shard(whole, lengths, "img") for r in range(world)]
    assert all(chunk.shape[1] == sum(lengths) // world for chunk in chunks)
    me = rank.draw(st.integers(0, world - 1))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sequence_shards.dist, "all_gather_into_tensor", AllGather(chunks))
        assert torch.equal(Sharding(me, world).gather(chunks[me], lengths), whole)


def test_a_part_that_does_not_divide_is_refused_naming_the_stream():
    with pytest.raises(ParallelRefusal, match="`txt` stream has 5 tokens"):
        Sharding(0, 2).shard(torch.randn(1, 5, 3), (5,), "txt")


@settings(max_examples=30, deadline=None)
@given(world=st.sampled_from([1, 2, 4]), parts=st.lists(st.integers(1, 3), min_size=1, max_size=2),
       rank=st.data(), layout=st.sampled_from(["k", "qk", "bqk", "b1qk", "bhqk", "b11k"]))
def test_a_mask_is_put_in_the_order_ulysses_gathers_the_tokens(world, parts, rank, layout):
    """Ulysses hands attention every rank's chunks, rank after rank: the mask's rows and
    columns follow, as the chunks `Sharding.shard` cuts from the positions say."""
    sequence = tuple(part * world for part in parts)
    total, heads = sum(sequence), 2 * world
    positions = torch.arange(total).reshape(1, total)
    gathered = torch.cat([Sharding(r, world).shard(positions, sequence, "img")[0] for r in range(world)])
    shapes = {"k": (total,), "qk": (total, total), "bqk": (1, total, total), "b1qk": (1, 1, total, total),
              "bhqk": (1, heads, total, total), "b11k": (1, 1, 1, total)}
    mask = torch.randn(shapes[layout])
    me = rank.draw(st.integers(0, world - 1))
    expected = mask.index_select(-1, gathered)
    if layout not in ("k", "b11k"):
        expected = expected.index_select(-2, gathered)
    if layout == "bhqk":
        expected = expected[:, me * 2:(me + 1) * 2]
    assert torch.equal(Sharding(me, world).ulysses_mask(mask, sequence, heads), expected)


def test_a_mask_that_does_not_span_the_sequence_is_refused():
    with pytest.raises(ParallelRefusal, match="does not span the whole joined sequence"):
        Sharding(0, 2).ulysses_mask(torch.randn(1, 6, 6), (4, 4), 2)
    with pytest.raises(ParallelRefusal, match="does not span"):
        Sharding(0, 2).ulysses_mask(torch.randn(8), None, 2)  # a block that did not say its sequence


def test_heads_that_do_not_divide_are_refused_in_attention_before_any_collective():
    """For a model whose head count `check_model` could not read: attention refuses before its
    all-to-all (no process group exists here: a collective would raise another error)."""
    q = torch.randn(1, 4, 3 * 8)
    with pytest.raises(ParallelRefusal, match="has 3 attention heads, which do not divide among 2 devices"):
        Sharding(0, 2).attention(lambda *a, **k: None, q, q, q, 3)
