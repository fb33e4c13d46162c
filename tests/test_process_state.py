"""One owner of wavepass's process-wide state (`wavepass/process_state.py`), cleared in one call.

Every store the package keeps for the life of the process is registered with
`process_state`; `wavepass.reset_process_state()` empties them all (and drops what Dynamo
compiled), after which a model compiles and caches as in a new process.
"""

from __future__ import annotations

import warnings

import torch

import wavepass
from test_compiled_blocks import Stack
from test_split_stacks import BreakingStack, _steps
from wavepass import notices, process_state


def test_every_store_is_registered_and_empty_after_a_reset(no_fallback):
    torch.manual_seed(0)
    model = Stack(1, [False] * 3).eval()
    inputs = (torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 4))
    options = {"residual_diff_threshold": 0.0}
    compiled = torch.compile(model, backend="wavespeed", options=options)
    torch.testing.assert_close(compiled(*inputs), model(*inputs))
    split = BreakingStack([(1,), (1,), (1,)])  # Dynamo splits its stack: a stack cache goes on it
    compiled_split = torch.compile(split, backend="wavespeed", options={**options, "compiler": "eager"})
    for x, t in _steps(2):
        torch.testing.assert_close(compiled_split(x, t), split(x, t))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        notices.warn_once("wavespeed: a reason (test)")

    filled = process_state.sizes()
    for store in ("compiled block structures", "warnings given", "torch features", "programs", "stack caches",
                  "C++ bundle builds", "C++ bundle failures", "compile sessions", "missed calls", "own counters"):
        assert store in filled, store
    for store in ("compiled block structures", "warnings given", "torch features", "programs", "stack caches"):
        assert filled[store] > 0, (store, filled)
    assert any("forward" in vars(block) for block in split.blocks)  # the cache is on the blocks

    wavepass.reset_process_state()
    assert not any(process_state.sizes().values()), process_state.sizes()
    assert not any("forward" in vars(block) for block in split.blocks)  # and off them again

    compiled = torch.compile(model, backend="wavespeed", options=options)
    torch.testing.assert_close(compiled(*inputs), model(*inputs))
    assert wavepass.stats(model).calls == 1
    assert process_state.sizes()["compiled block structures"] > 0
