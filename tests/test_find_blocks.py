"""`passes/find_blocks.py` on hand-built Dynamo graphs: which regions are offered, in which order.

Models hold sibling stacks (`nn.ModuleList`s of blocks, items of one `nn.ModuleDict`), with
top-level code between them, and optionally a stack nested in a prologue module (never a
sibling). Each is traced by Dynamo with a backend that only keeps the graph; `find_blocks`
must offer every contiguous run of sibling stacks and every single stack, ordered by the
block work they cache (most first), the same on every trace, and at most `MAX_REGIONS`.
"""

from __future__ import annotations

import torch
import torch._dynamo
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import graphs

from wavepass.passes.find_blocks import MAX_REGIONS, find_blocks

DIM = 8


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(DIM, width), nn.Linear(width, DIM)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


class Refiner(nn.Module):
    """A prologue module holding a stack of its own (a text refiner)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(DIM) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class Stacks(nn.Module):
    """Sibling stacks `stacks.s0`, `stacks.s1`, ... of the given sizes and block widths, top-level
    code after each; a refiner in the prologue if asked."""

    def __init__(self, sizes, widths, refiner: bool = False) -> None:
        super().__init__()
        self.refiner = Refiner() if refiner else None
        self.stacks = nn.ModuleDict(
            {f"s{i}": nn.ModuleList(Block(width) for _ in range(size))
             for i, (size, width) in enumerate(zip(sizes, widths))}
        )

    def forward(self, x):
        if self.refiner is not None:
            x = self.refiner(x)
        for stack in self.stacks.values():
            for block in stack:
                x = block(x)
            x = x * 0.5
        return x


def traced(model: nn.Module) -> torch.fx.GraphModule:
    return graphs.traced(model, torch.randn(2, 3, DIM))


def regions(gm) -> list[tuple[str, ...]]:
    """The regions `find_blocks` offers, each as its stacks' paths, in its order."""
    return [tuple(stack[0].tag.stack for stack in region.stacks) for region in find_blocks(gm)]


def cached_work(gm, region) -> int:
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    return position[region.last_block.nodes[-1]] - position[region.first_block.nodes[-1]]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stacks=st.lists(st.tuples(st.integers(2, 4), st.sampled_from((4, 16, 64))), min_size=1, max_size=4),
       refiner=st.booleans())
def test_every_run_of_siblings_is_offered_by_the_work_it_caches(stacks, refiner):
    sizes, widths = zip(*stacks)
    gm = traced(Stacks(sizes, widths, refiner).eval())
    offered = find_blocks(gm)
    names = [f"stacks.s{i}" for i in range(len(sizes))]
    runs = {tuple(names[start:stop]) for start in range(len(names)) for stop in range(start + 1, len(names) + 1)}
    expected = runs | ({("refiner.blocks",)} if refiner else set())
    assert set(regions(gm)) == expected
    work = [cached_work(gm, region) for region in offered]
    assert work == sorted(work, reverse=True)
    assert regions(traced(Stacks(sizes, widths, refiner).eval())) == regions(gm)  # deterministic


def test_the_regions_are_bounded():
    sizes = (2,) * 7  # 28 runs
    gm = traced(Stacks(sizes, (4,) * 7).eval())
    offered = regions(gm)
    assert len(offered) == MAX_REGIONS
    assert offered[0] == tuple(f"stacks.s{i}" for i in range(7))  # all of them cache the most


def test_a_smaller_trailing_stack_comes_after_the_main_runs():
    """A decoder head after two large stacks: the joint region first, then both large stacks
    without the head (they cache more than the large ones alone), and every single stack."""
    gm = traced(Stacks((4, 4, 2), (64, 64, 4)).eval())
    offered = regions(gm)
    assert offered[:2] == [("stacks.s0", "stacks.s1", "stacks.s2"), ("stacks.s0", "stacks.s1")]
    assert {("stacks.s0",), ("stacks.s1",), ("stacks.s2",)} <= set(offered)
