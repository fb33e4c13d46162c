"""A new graph from some nodes of another: how the passes that cut a graph build the pieces.

    graph_reading([img, temb, w1])         ->  img = placeholder; temb = placeholder;
                                               w1 = placeholder   (their names and metadata)
    extract([linear, add], [img, w1], [add])  ->  the above, then linear, add copied, output(add)

The nodes keep their metadata (Dynamo's recorded values, module stacks), so the passes and
Inductor read the same facts from a piece as from the graph it was cut from. The source graph
is not changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch.fx import Graph, Node


def graph_reading(inputs: Sequence[Node]) -> tuple[Graph, dict[Node, Node]]:
    """A new graph with one placeholder per node of `inputs`, of its name and metadata, and
    the map from each input to its placeholder (to copy further nodes through)."""
    graph = Graph()
    env: dict[Node, Node] = {}
    for value in inputs:
        env[value] = graph.placeholder(value.name)
        env[value].meta = dict(value.meta)
    return graph, env


def extract(nodes: Iterable[Node], inputs: Sequence[Node], outputs: Sequence[Node]) -> Graph:
    """A graph that reads `inputs`, runs copies of `nodes` (in order) and returns the copies
    of `outputs` as a tuple."""
    graph, env = graph_reading(inputs)
    for node in nodes:
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(tuple(env[n] for n in outputs))
    graph.lint()
    return graph
