"""Find the stacks of repeated blocks in a Dynamo graph, from `nn_module_stack` alone.

Every node Dynamo records carries the stack of module calls it ran in. A node that ran inside
`self.transformer_blocks[3]` has that call on its stack; the outermost such indexed call
(an item of a `ModuleList` or `Sequential`) is the node's *block*. Blocks with the same
container path form a *stack*.

    graph (Flux, 2 + 2 blocks)                    BlockLayout
    -------------------------------------------   --------------------------------------
    x_embedder, time_text_embed, pos_embed ...    (prologue: not a block)
    transformer_blocks.0  (FluxTransformerBlock)  stacks[0] = transformer_blocks[0..1]
    transformer_blocks.1
    (glue: controlnet adds, top-level code)
    single_transformer_blocks.0 (FluxSingle...)   stacks[1] = single_transformer_blocks[0..1]
    single_transformer_blocks.1
    norm_out, proj_out                            (epilogue: not a block)

Rules (no table of model classes):
- a stack holds two or more blocks of one class, run in index order, none interleaved with
  another (a block called twice, or out of order, disqualifies its stack);
- the *anchor* is the stack with the most nodes; stacks that follow or precede it with only
  top-level glue code in between (nodes that ran in no submodule) join it. So FLUX's dual and
  single stacks form one cached region, while a small refiner stack inside a prologue module
  stays out of it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from torch.fx import GraphModule, Node

from .errors import NoRepeatedBlocks
from .fx_facts import BlockTag, block_tag, has_module


@dataclass(frozen=True)
class Block:
    """One call of a repeated block: its nodes, in graph order."""

    tag: BlockTag
    nodes: tuple[Node, ...]

    @property
    def path(self) -> str:
        return f"{self.tag.stack}.{self.tag.index}" if self.tag.stack else str(self.tag.index)


@dataclass(frozen=True)
class BlockLayout:
    """The cached region: consecutive stacks of blocks, in graph order."""

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
        return ", ".join(
            f"{stack[0].tag.stack or '<root>'}[{len(stack)} x {stack[0].tag.cls_name.rsplit('.', 1)[-1]}]"
            for stack in self.stacks
        )


def find_blocks(gm: GraphModule) -> BlockLayout:
    """Return the region of repeated blocks to cache; raise `NoRepeatedBlocks` if there is none."""
    nodes = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    position = {node: i for i, node in enumerate(nodes)}
    stacks = _stacks(nodes, position)
    if not stacks:
        raise NoRepeatedBlocks(
            "no stack of repeated blocks found in the graph (wavespeed caches models that call "
            "two or more blocks of one class from an nn.ModuleList); if the blocks sit behind a "
            "graph break, remove it or use fullgraph=True to see where it is"
        )
    anchor = max(range(len(stacks)), key=lambda i: sum(len(b.nodes) for b in stacks[i]))
    first, last = anchor, anchor
    while first > 0 and _only_glue_between(stacks[first - 1], stacks[first], nodes, position):
        first -= 1
    while last + 1 < len(stacks) and _only_glue_between(stacks[last], stacks[last + 1], nodes, position):
        last += 1
    return BlockLayout(tuple(stacks[first : last + 1]))


def _stacks(nodes: list[Node], position: dict[Node, int]) -> list[tuple[Block, ...]]:
    """All valid stacks, ordered by where they start in the graph."""
    by_block: dict[BlockTag, list[Node]] = defaultdict(list)
    for node in nodes:
        tag = block_tag(node)
        if tag is not None:
            by_block[tag].append(node)
    by_stack: dict[str, list[Block]] = defaultdict(list)
    for tag, members in by_block.items():
        by_stack[tag.stack].append(Block(tag, tuple(members)))
    valid = []
    for blocks in by_stack.values():
        blocks.sort(key=lambda b: b.tag.index)
        indices = [b.tag.index for b in blocks]
        if len(set(indices)) != len(indices):
            continue  # one index under two classes: not a plain stack
        if len(blocks) >= 2 and _is_one_class(blocks) and _runs_in_order(blocks, position):
            valid.append(tuple(blocks))
    valid.sort(key=lambda stack: position[stack[0].nodes[0]])
    return valid


def _is_one_class(blocks: list[Block]) -> bool:
    return len({b.tag.cls_name for b in blocks}) == 1


def _runs_in_order(blocks: list[Block], position: dict[Node, int]) -> bool:
    """Each block's nodes are contiguous in the order of the stack and never interleave."""
    for before, after in zip(blocks, blocks[1:]):
        if position[before.nodes[-1]] >= position[after.nodes[0]]:
            return False
    return True


def _only_glue_between(a: tuple[Block, ...], b: tuple[Block, ...], nodes: list[Node], position) -> bool:
    start, end = position[a[-1].nodes[-1]], position[b[0].nodes[0]]
    return start < end and not any(has_module(n) for n in nodes[start + 1 : end])
