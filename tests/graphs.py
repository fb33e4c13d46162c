"""Dynamo graphs for the pass tests: trace a function or module, keep its one graph."""

from __future__ import annotations

import torch
import torch._dynamo


def traced(fn, *inputs) -> torch.fx.GraphModule:
    """The one Dynamo graph of `fn(*inputs)` (no compiler runs)."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=keep, fullgraph=True)(*inputs)
    (gm,) = graphs
    return gm
