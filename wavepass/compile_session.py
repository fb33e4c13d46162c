"""Compile accounting: what was compiled for one Dynamo graph, for the log and the counters.

Counts land in `torch._dynamo.utils.counters["wavepass"]` (`torch_api.counters()`): pieces,
whole graphs, pieces run as Python, block calls and block graphs. A `CompileSession` per
Dynamo graph (per fake mode: its pieces share it) sums them for the log line
"wavespeed: this graph so far: ...".
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from torch.fx import GraphModule

from . import process_state, torch_api
from .block_op import BLOCKS
from .passes.call_compiled_blocks import blocks_called


@dataclass
class CompileSession:
    """What was compiled for one Dynamo graph: pieces, outlined blocks, block graphs, time."""

    structures: set[Hashable] = field(default_factory=set)
    pieces: int = 0
    blocks: int = 0
    block_graphs: int = 0
    seconds: float = 0.0

    def add_blocks(self, piece: GraphModule, keys: tuple[Hashable, ...], compiled: int) -> str:
        """Count the block calls of one outlined piece and its block graphs: those it lowers
        itself (its subgraphs) and the `compiled` new ones of the structures `keys` it calls
        by name; describe them."""
        calls = (len(piece.graph.find_nodes(op="call_function", target=torch_api.invoke_subgraph()))
                 + sum(map(blocks_called, piece.graph.find_nodes(op="call_function", target=BLOCKS))))
        kinds = [m for m in piece.children() if "structure" in getattr(m, "meta", {})]
        self.blocks += calls
        self.block_graphs += len(kinds) + compiled
        self.structures.update(m.meta["structure"] for m in kinds)
        self.structures.update(keys)
        counts = torch_api.counters()["wavepass"]
        counts["blocks"] += calls
        counts["block_graphs"] += len(kinds) + compiled
        return f"{calls} block(s) as calls of {len(kinds) + len(keys)} block graph(s)"

    def add_piece(self, seconds: float) -> None:
        self.pieces += 1
        self.seconds += seconds
        torch_api.counters()["wavepass"]["pieces"] += 1

    def summary(self) -> str:
        return (f"{self.pieces} piece(s), {self.blocks} block(s) as calls of {self.block_graphs} "
                f"compiled block graph(s) ({len(self.structures)} distinct structure(s)), "
                f"{self.seconds:.1f} s compiling")


_sessions: weakref.WeakKeyDictionary[Any, CompileSession] = weakref.WeakKeyDictionary()
process_state.owns("compile sessions", _sessions)


def session_of(fake_mode: Any) -> CompileSession:
    """The session of the Dynamo graph whose values live in `fake_mode` (a new one if None)."""
    if fake_mode is None:
        return CompileSession()
    return _sessions.setdefault(fake_mode, CompileSession())


def count(name: str) -> None:
    """One more of `name` ("whole_graphs", "python_pieces") in wavepass's counters."""
    torch_api.counters()["wavepass"][name] += 1
