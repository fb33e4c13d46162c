"""Run a piece that only calls compiled block structures as Python, with no compile of its own.

After `call_compiled_blocks`, FLUX's `rest` is 17 `wavepass.blocks` calls over 543 weights,
the outputs taken apart, and one subtraction (the cached residual). Inductor would emit the
same calls, after tracing, lowering and keying its cache on every weight as an input: 2.3 s
of a 14 s cold compile of a 24-block FLUX, for nothing to fuse. `calls_only_blocks` says
whether a piece is that kind; `call_blocks_directly` makes its calls direct Python calls of
`run_blocks` (through the dispatcher every operand would be converted, ~1.4 us per tensor),
so that the GraphModule's own Python code runs the piece.

    before                                             after
    -------------------------------------------------  -----------------------------------------
    b = wavepass.blocks("wp_3f2a..", carry, [x, ...])  b = run_blocks("wp_3f2a..", carry, [x, ...])
    y = b[0]                                           y = b[0]
    r = torch.sub(y, x)                                r = torch.sub(y, x)

The input graph is not changed.
"""

from __future__ import annotations

import copy

from torch.fx import GraphModule

from ..block_op import BLOCKS, run_blocks
from .fx_facts import is_additive_glue


def calls_only_blocks(gm: GraphModule) -> bool:
    """Whether `gm` computes nothing but `wavepass.blocks` calls and additive glue on their
    results (`fx_facts.is_additive_glue`)."""
    calls = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    return (any(n.target is BLOCKS for n in calls)
            and all(n.op == "call_function" and n.target is BLOCKS or is_additive_glue(n) for n in calls))


def call_blocks_directly(gm: GraphModule) -> GraphModule:
    """A copy of `gm` whose `wavepass.blocks` calls call `run_blocks` itself."""
    direct = GraphModule(gm, copy.deepcopy(gm.graph))  # nodes copied, their metadata shared
    for node in direct.graph.find_nodes(op="call_function", target=BLOCKS):
        node.target = run_blocks
    direct.recompile()
    return direct
