"""One decision for every process of a context-parallel model.

Under context parallelism (diffusers' `enable_parallelism`, Ulysses or ring attention) each
process holds a shard of the sequence and computes its own first-block residual. Were each
to decide alone, one could skip while another computes, and their collectives would pair
the wrong blocks: a hang, or data exchanged between the wrong layers. The graph Dynamo hands
the backend says which process groups the model communicates over (the `group_name`
argument of its collective ops); at decision time every process shares its decision's two
float32 sums over those groups, so every process decides on the whole sequence, as one
process would (`runtime.relative_l1`).

How the sums are shared: each process writes its two sums (of absolute values: >= 0) into
its own row of a [world size, 2] table of zeros, the table is all-reduced with MAX over each
group in turn (a row holds its owner's sums or zeros, so MAX copies rows and never adds),
and the rows are summed locally in rank order. Each process's sums therefore count once
however its groups overlap: under Ulysses on one mesh dimension, the Ulysses group and the
flattened mesh diffusers gathers the output over are the same processes; on a 2-D ring x
Ulysses mesh, two orthogonal groups reach the whole product in turn. Every process ends with
the same table and adds it up in the same order, so all compute the same bits and make the
same decision, even on a ratio right at the threshold. The cost is one all-reduce of
8 x world-size bytes per distinct group, before the one host sync the decision has anyway.

Groups are taken as a DeviceMesh makes them: each group name in the graph stands for one
dimension (or flattened dimensions) of the mesh, which every process has in the same
position, so all processes reduce over their groups in the same order. A group whose
processes another group of the graph already includes is left out (the same set twice,
or one mesh dimension beside the flattened mesh); a group of one process is left out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.fx import GraphModule

from . import torch_api

GROUP_ARGUMENT = "group_name"


def collective_groups(gm: GraphModule) -> tuple[str, ...]:
    """The process group names the graph's collective ops run over, distinct, in graph order.

    Any op whose schema has a `group_name` argument counts (`_c10d_functional`,
    `_c10d_functional_autograd`, `_dtensor`...), whether the graph holds the op's overload
    or its packet (Dynamo records `torch.ops._c10d_functional.all_to_all_single`, a packet);
    the argument is read by its name in the schema, since its position differs per op
    (all_reduce: 3rd, all_to_all_single: 4th).
    """
    groups: dict[str, None] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        index = _group_argument_index(node.target)
        if index is None:
            continue
        name = node.kwargs.get(GROUP_ARGUMENT, node.args[index] if index < len(node.args) else None)
        name = _group_name(name)
        if name is not None:
            groups[name] = None
    return tuple(groups)


def decision_reducer(gm: GraphModule) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """`reduce(sums)`: the sum of each process's `sums` (a float32 tensor of shape [2]) over
    every process the graph communicates with, the same bits in each. None when the graph
    runs in one process (no collectives, or only groups of one process): the decision then
    needs no communication."""
    return reducer_over(collective_groups(gm))


def reducer_over(names: tuple[str, ...]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """`decision_reducer` for the process groups named `names` (in the order every process
    met them): on the split path, the groups of every fragment of the model's frames."""
    if not names:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():  # a graph traced for another process's groups: nothing to share here
        return None
    groups = reduction_groups({name: _ranks_of(name) for name in names})
    if not groups:
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    functional = torch.ops._c10d_functional

    def reduce(sums: torch.Tensor) -> torch.Tensor:
        # NaN would be lost by MAX (max(0, nan) is 0 in some backends): as inf it still never skips
        sums = torch.nan_to_num(sums.to(torch.float32), nan=torch.inf)
        table = torch.zeros(world, sums.numel(), dtype=torch.float32, device=sums.device)
        table[rank] = sums
        for name in groups:
            table = functional.wait_tensor(functional.all_reduce(table, "max", name))
        return table.sum(dim=0)

    return reduce


def reduction_groups(ranks: dict[str, tuple[int, ...] | None]) -> tuple[str, ...]:
    """Of the groups (name -> global ranks, in graph order; None: not resolvable here), those
    to reduce over: without groups of one process, and without a group whose ranks another
    group of the graph holds (the same set twice keeps its first name). A group this process
    cannot resolve is kept as it is."""
    sets = [(name, None if r is None else frozenset(r)) for name, r in ranks.items()]
    kept = []
    for position, (name, members) in enumerate(sets):
        if members is not None and (len(members) < 2 or any(
                other is not None and (members < other or (members == other and j < position))
                for j, (_, other) in enumerate(sets) if j != position)):
            continue
        kept.append(name)
    return tuple(kept)


def _group_argument_index(target: Any) -> int | None:
    """Where `target`'s schema takes the process group's name (None: not a collective)."""
    try:
        packet, overload_type = torch_api.api("OpOverloadPacket"), torch_api.api("OpOverload")
    except torch_api.Missing:
        return None
    if isinstance(target, packet):
        schemas = [getattr(target, overload)._schema for overload in target.overloads()]
    elif isinstance(target, overload_type):
        schemas = [target._schema]
    else:
        return None
    for schema in schemas:
        for index, argument in enumerate(schema.arguments):
            if argument.name == GROUP_ARGUMENT:
                return index
    return None


def _group_name(value: Any) -> str | None:
    """A group name from the value a graph passes for it: the name, or the group itself."""
    if isinstance(value, str):
        return value
    name = getattr(value, "group_name", None)
    return name if isinstance(name, str) else None


def _ranks_of(name: str) -> tuple[int, ...] | None:
    """The global ranks of the group named `name` (None where this process cannot resolve it)."""
    import torch.distributed as dist

    try:
        return tuple(dist.get_process_group_ranks(torch_api.api("resolve_process_group")(name)))
    except (torch_api.Missing, LookupError, RuntimeError, ValueError):
        return None
