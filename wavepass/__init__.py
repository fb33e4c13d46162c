"""wavepass: First Block Cache fused with Inductor, as the `wavespeed` torch.compile backend.

    import torch
    compiled = torch.compile(denoiser, backend="wavespeed",
                             options={"residual_diff_threshold": 0.12})

The backend is also registered through the `torch_dynamo_backends` entry point, so the line
above works without `import wavepass`. This module adds the runtime API:

    wavepass.reset(model)            start a new generation (forget stored residuals)
    wavepass.stats(model)            Stats(calls, hits, decisions, reason) since the last reset
    with wavepass.cache_settings(residual_diff_threshold=0.2, policy="taylor"):
                                     calls inside decide with these settings (no recompile)
    with wavepass.cache_context(n):  separate cache state per name (e.g. CFG branches)
    with wavepass.skipping(False):   calls inside run every block (start/end windows)
    with wavepass.same_step(t):      calls with an equal key decide together (chunked CFG)
    with wavepass.watch(model):      a call Dynamo did not compile is counted and said
    wavepass.compile_failure(error)  the cause and fix of a compiler failure; None for other errors
    wavepass.call_or_fall_back(model, compiled, plain, failed, retry)
                                     an integration's call: the plain model where compiling
                                     failed, counted and said
    wavepass.reset_process_state()   forget everything wavepass keeps for the process
                                     (`process_state.py`), as a new process would start
    wavepass.warn_if_too_few_steps(n)  an integration's run of n steps: said once where no skip pays
"""

from __future__ import annotations

from .backend import wavespeed
from .notices import WavespeedWarning, compile_failure, warn_if_too_few_steps
from .options import POLICIES, CacheOptions, CacheSettings
from .process_state import reset_process_state
from .runtime import (Stats, cache_context, cache_settings, call_or_fall_back, current_context, reset, same_step,
                      skipping, stats, watch)
from .torch_api import register_backend

__all__ = [
    "POLICIES", "CacheOptions", "CacheSettings", "Stats", "WavespeedWarning", "cache_context", "cache_settings",
    "call_or_fall_back", "compile_failure", "current_context", "reset", "reset_process_state", "same_step", "skipping",
    "stats", "warn_if_too_few_steps", "watch", "wavespeed",
]
__version__ = "0.1.0"

register_backend(wavespeed, name="wavespeed")  # unless the entry point did (torch_api)
