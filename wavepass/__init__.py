"""wavepass: First Block Cache fused with Inductor, as the `wavespeed` torch.compile backend.

    import torch
    compiled = torch.compile(denoiser, backend="wavespeed",
                             options={"residual_diff_threshold": 0.12})

The backend is also registered through the `torch_dynamo_backends` entry point, so the line
above works without `import wavepass`. This module adds the runtime API:

    wavepass.reset(model)            start a new generation (forget stored residuals)
    wavepass.stats(model)            Stats(calls, hits, decisions) since the last reset
    with wavepass.cache_context(n):  separate cache state per name (e.g. CFG branches)
    with wavepass.skipping(False):   calls inside run every block (start/end windows)
    with wavepass.same_step(t):      calls with an equal key decide together (chunked CFG)
"""

from __future__ import annotations

from torch._dynamo import list_backends, register_backend

from .backend import wavespeed
from .options import CacheOptions
from .runtime import Stats, cache_context, current_context, reset, same_step, skipping, stats

__all__ = [
    "CacheOptions", "Stats", "cache_context", "current_context", "reset", "same_step", "skipping",
    "stats",
    "wavespeed",
]
__version__ = "0.1.0"

if "wavespeed" not in list_backends(exclude_tags=()):
    register_backend(wavespeed, name="wavespeed")
