"""One decision for every process of a context-parallel model.

Under context parallelism (diffusers' `enable_parallelism`, Ulysses or ring attention) each
process holds a shard of the sequence and computes its own first-block residual. Were each
to decide alone, one could skip while another computes, and their collectives would pair
the wrong blocks: a hang, or data exchanged between the wrong layers. The graph Dynamo hands
the backend says which process groups the model communicates over (the group names of its
functional collectives); the decision's two float32 sums are all-reduced over those groups,
so every process decides on the whole sequence, as one process would (`runtime.relative_l1`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.fx import GraphModule

_COLLECTIVES_NAMESPACE = "_c10d_functional"


def collective_groups(gm: GraphModule) -> tuple[str, ...]:
    """The process group names the graph's functional collectives run over, in graph order."""
    groups: dict[str, None] = {}
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function" or getattr(target, "namespace", None) != _COLLECTIVES_NAMESPACE:
            continue
        name = node.kwargs.get("group_name", node.args[-1] if node.args else None)
        if isinstance(name, str):
            groups[name] = None
    return tuple(groups)


def decision_reducer(gm: GraphModule) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Sums a tensor over every process group the graph communicates over (None: the graph
    runs in one process, and the decision needs no communication)."""
    groups = collective_groups(gm)
    if not groups:
        return None

    def reduce(sums: torch.Tensor) -> torch.Tensor:
        for group in groups:
            sums = torch.ops._c10d_functional.wait_tensor(
                torch.ops._c10d_functional.all_reduce(sums, "sum", group))
        return sums

    return reduce
