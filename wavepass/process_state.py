"""The owner of wavepass's process-wide state: every store registers here, one call clears all.

Each module that keeps something for the life of the process registers that store at import
(`owns`), with what clearing it means; `reset_process_state()` clears every one, as a new
process would start (for tests, and for a server that wants a clean slate between jobs):

    store                         module          what it holds
    ----------------------------  --------------  --------------------------------------------
    compiled block structures     block_op        the registry of block graphs, by name
    compile sessions              compile_session what was compiled per Dynamo graph
    warnings given                notices         the messages already warned once
    torch features                torch_api       why each optional feature is off (or on)
    own counters                  torch_api       the counts, where torch has no counters
    stack caches                  stack_cache     the caches put on split stacks (uninstalled)
    programs, missed calls        runtime         live programs and watched calls, for `stats`
    C++ bundle failures, builds   cpp_bundle      build failures logged; builds still running

Each model's own cache state (signals, residuals, counts) lives on its program
(`runtime.py`) and is reset per model by `wavepass.reset(model)`. Context variables and
thread-locals (the cache context, `cache_settings`, the depth of a running stack) are
scoped to a call and are not process state.

Programs compiled before a reset call block graphs by name from a registry that no longer
holds them, so `reset_process_state` also drops what Dynamo compiled (`torch.compiler.reset`):
every model compiles again at its next call, as in a new process (Inductor's on-disk cache
still serves it).
"""

from __future__ import annotations

from collections.abc import Callable, Sized
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class _Store:
    contents: Sized
    clear: Callable[[], None]


_stores: dict[str, _Store] = {}


def owns(name: str, store: Sized, clear: Callable[[], None] | None = None) -> None:
    """Register process-wide `store` under `name`; `clear` empties it (default: its
    `clear()` method). Called once per store, where the module defines it."""
    _stores[name] = _Store(store, clear if clear is not None else store.clear)  # type: ignore[attr-defined]


def sizes() -> dict[str, int]:
    """How many entries each registered store holds, by name."""
    return {name: len(store.contents) for name, store in _stores.items()}


def reset_process_state() -> None:
    """Clear every process-wide store of wavepass and what Dynamo compiled: the process
    compiles, warns and checks torch's features again as a new one would."""
    torch.compiler.reset()
    for store in _stores.values():
        store.clear()
