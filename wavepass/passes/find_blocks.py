"""Find the stacks of repeated blocks in a Dynamo graph, from `nn_module_stack` alone.

Every node Dynamo records carries the stack of module calls it ran in. A node that ran inside
`self.transformer_blocks[3]` has that call on its stack; the outermost such indexed call
(an item of a `ModuleList` or `Sequential`) is the node's *block*. Blocks with the same
container path form a *stack*.

    graph (FLUX, 2 + 2 blocks)                    regions, in order of preference
    -------------------------------------------   ---------------------------------------
    x_embedder, time_text_embed, pos_embed ...    (prologue)
    transformer_blocks.0  (FluxTransformerBlock)  1. transformer_blocks[0..1]
    transformer_blocks.1                             + single_transformer_blocks[0..1]
    (top-level code: ControlNet adds)             2., 3. transformer_blocks[0..1] and
    single_transformer_blocks.0 (FluxSingle...)      single_transformer_blocks[0..1], each
    single_transformer_blocks.1                      alone, by the work it caches
    norm_out, proj_out                            (epilogue)

    graph (SDXL-style UNet)
    -------------------------------------------
    conv_in, time_embedding                       (prologue)
    down_blocks.0 .. down_blocks.2                1. down_blocks[0..2] + up_blocks[0..2]
    mid_block (its resnets form a nested stack)      (mid_block runs inside the region)
    up_blocks.0 .. up_blocks.2                    2., 3. up_blocks[0..2], down_blocks[0..2]
    conv_norm_out, conv_act, conv_out             4. mid_block.resnets[0..1]
                                                  (epilogue: the output head always runs)

Rules (no table of model classes):
- a stack holds two or more composite blocks (modules that call submodules, so a
  `Sequential` of plain layers is no stack), run in index order and never interleaved (a
  block called twice, or out of order, disqualifies its stack); classes may differ (a
  UNet's down blocks do); leading plain items run in the prologue (ComfyUI's UNet keeps its
  input conv as `input_blocks[0]`);
- blocks are read at two levels: the outermost indexed module that ran (`stacks.0.1` for
  `self.stacks[0][1](x)`), and the outermost indexed item on its path, whether or not it
  ran (`input_blocks.4` for the layers `input_blocks.4.0`, `input_blocks.4.1` that ComfyUI's
  UNet runs one by one without calling `input_blocks[4]` itself); the two agree for most
  models;
- a region is a contiguous run, in graph order, of sibling stacks (stacks held by the same
  parent module: FLUX's dual and single stacks, a UNet's down and up blocks), with whatever
  runs between them; a single stack is a run of one, so every stack is a region of its own
  (a stack nested elsewhere, like a text refiner inside a prologue module, is never a
  sibling of the main ones). Every region at either level is offered: the partition pass
  takes the first it can cut correctly, so a second, smaller stack that the cut cannot take
  (a decoder head over patches after the main stacks) costs only itself;
- regions are preferred by the work they cache: the most nodes after the first block, up
  to the end of the last (ties keep the first level, then graph order); at most
  `MAX_REGIONS` are offered, which bounds the partition attempts.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from torch.fx import GraphModule, Node

from .errors import NoRepeatedBlocks
from .fx_facts import BlockTag, block_tag, in_submodule_of_block


@dataclass(frozen=True)
class Block:
    """One call of a repeated block: its nodes, in graph order."""

    tag: BlockTag
    nodes: tuple[Node, ...]

    @property
    def path(self) -> str:
        return f"{self.tag.stack}.{self.tag.index}" if self.tag.stack else str(self.tag.index)


@dataclass(frozen=True)
class BlockRegion:
    """The cached region: stacks of blocks, in graph order."""

    stacks: tuple[tuple[Block, ...], ...]

    @property
    def blocks(self) -> tuple[Block, ...]:
        return tuple(block for stack in self.stacks for block in stack)

    @property
    def first_block(self) -> Block:
        return self.stacks[0][0]

    @property
    def last_block(self) -> Block:
        return self.stacks[-1][-1]

    def describe(self) -> str:
        return ", ".join(f"{stack[0].tag.stack or '<root>'}[{len(stack)} x {_classes(stack)}]"
                         for stack in self.stacks)


# At most this many regions are offered: each costs the partition pass one attempt.
MAX_REGIONS = 16


def find_blocks(gm: GraphModule) -> list[BlockRegion]:
    """The regions worth caching, best first (at most `MAX_REGIONS`); raise
    `NoRepeatedBlocks` if there is none."""
    nodes = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    position = {node: i for i, node in enumerate(nodes)}
    regions: dict[BlockRegion, None] = {}
    for outermost in (False, True):
        stacks = _stacks(nodes, position, outermost)
        if stacks:
            regions.update(dict.fromkeys(_regions(stacks)))
    if not regions:
        raise NoRepeatedBlocks(
            "no stack of repeated blocks found in the graph (wavespeed caches models that run "
            "two or more blocks from an nn.ModuleList); if the blocks sit behind a graph "
            "break, remove it (compile with fullgraph=True to see where it is)"
        )
    return sorted(regions, key=lambda region: -_cached_work(region, position))[:MAX_REGIONS]


def _regions(stacks: list[tuple[Block, ...]]) -> list[BlockRegion]:
    """Every contiguous run of sibling stacks (in graph order), single stacks included."""
    siblings: dict[str, list[tuple[Block, ...]]] = defaultdict(list)
    for stack in stacks:
        siblings[_parent(stack)].append(stack)
    return [
        BlockRegion(tuple(group[start:stop]))
        for group in siblings.values()
        for start in range(len(group))
        for stop in range(start + 1, len(group) + 1)
    ]


def _cached_work(region: BlockRegion, position: dict[Node, int]) -> int:
    """Nodes a skipped step saves: from after the first block to the end of the last."""
    return position[region.last_block.nodes[-1]] - position[region.first_block.nodes[-1]]


def _stacks(nodes: list[Node], position: dict[Node, int], outermost: bool) -> list[tuple[Block, ...]]:
    """All valid stacks (blocks read at the given level), ordered by where they start."""
    by_block: dict[BlockTag, list[Node]] = defaultdict(list)
    for node in nodes:
        tag = block_tag(node, outermost)
        if tag is not None:
            by_block[tag].append(node)
    by_stack: dict[str, list[Block]] = defaultdict(list)
    for tag, members in by_block.items():
        by_stack[tag.stack].append(Block(tag, tuple(members)))
    valid = []
    for blocks in by_stack.values():
        blocks.sort(key=lambda b: b.tag.index)
        while blocks and not _composite(blocks[:1], outermost):
            blocks.pop(0)  # a leading plain layer (an input conv) runs in the prologue
        indices = [b.tag.index for b in blocks]
        if (
            len(blocks) >= 2
            and len(set(indices)) == len(indices)  # one path under two classes is no plain stack
            and _composite(blocks, outermost)
            and _runs_in_order(blocks, position)
        ):
            valid.append(tuple(blocks))
    valid.sort(key=lambda stack: position[stack[0].nodes[0]])
    return valid


def _composite(blocks: list[Block], outermost: bool) -> bool:
    return all(any(in_submodule_of_block(n, outermost) for n in b.nodes) for b in blocks)


def _runs_in_order(blocks: list[Block], position: dict[Node, int]) -> bool:
    """Each block's nodes come after the previous block's and before the next one's."""
    return all(
        position[before.nodes[-1]] < position[after.nodes[0]]
        for before, after in zip(blocks, blocks[1:])
    )


def _parent(stack: tuple[Block, ...]) -> str:
    return stack[0].tag.stack.rpartition(".")[0]


def _classes(stack: tuple[Block, ...]) -> str:
    names = dict.fromkeys(b.tag.cls_name.rsplit(".", 1)[-1] for b in stack)
    return "/".join(names)
