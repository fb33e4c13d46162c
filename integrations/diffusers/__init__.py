"""wavepass for diffusers pipelines: First Block Cache + Inductor on a pipeline's denoiser.

    from wavepass_diffusers import apply_wavespeed

    handle = apply_wavespeed(pipe, residual_diff_threshold=0.12)
    image = pipe(prompt, num_inference_steps=28).images[0]
    print(wavepass.stats(pipe.transformer))
    handle.configure(residual_diff_threshold=0.2)   # takes effect at the next call, compiles nothing
    handle.remove()                      # or remove_wavespeed(pipe): the plain pipeline again

How it works (each point is a decision; the code below implements it):

- Every denoiser the pipeline holds (`pipe.transformer`, Wan 2.2's second expert
  `pipe.transformer_2`, or `pipe.unet`) is compiled *in place*, the way `nn.Module.compile`
  does it: `torch.compile(denoiser._call_impl, backend="wavespeed", ...)`
  is stored as `denoiser._compiled_call_impl` (which `nn.Module.__call__` runs instead of
  `_call_impl`), behind a small Python wrapper. `pipe.transformer` stays the same object, so
  its `.config`, `.dtype` and `cache_context` keep working and the pipeline is not rebuilt.
  Two experts (Wan 2.2's pipeline switches from `transformer` to `transformer_2` at
  `boundary_ratio`) each keep their own cache state and stats, under one set of settings.
- A new pipeline call starts a new generation (`wavepass.reset` of every denoiser): the wrapper sees
  that `pipe.scheduler.timesteps` is another tensor object than at its last call (every
  pipeline calls `scheduler.set_timesteps`, which makes a new one). The scheduler is read at
  every call, so replacing `pipe.scheduler` works. A schedule too short for any skip to pay
  (under `wavepass.notices.FEW_STEPS` entries, e.g. a 4-step distilled model) is said once
  (`wavepass.warn_if_too_few_steps`).
- The start/end window: a call at step i of N runs under `wavepass.skipping(start <= i/N < end)`,
  i being `scheduler.step_index` (None before the first `scheduler.step` means the scheduler's
  `begin_index`, else 0) and N `len(scheduler.timesteps)`. Both count in scheduler entries, so
  second-order schedulers (Heun, KDPM2: one entry and one `step` per model call) get the same
  fraction of the schedule. For img2img pipelines that start part-way into the schedule, the
  window is a fraction of the whole schedule (as for ComfyUI's start/end percent). Schedulers
  without a `step_index` (e.g. DDIM) fall back to counting the denoiser's calls per cache
  context since the generation began. A denoiser called outside a pipeline call (no
  timesteps set) may skip, with no window.
- CFG branches: pipelines that call the denoiser once per branch wrap each call in
  `denoiser.cache_context("cond")` / `("uncond")` (diffusers' `CacheMixin`, e.g. Flux with
  `true_cfg_scale`, Wan). The instance's `cache_context` is wrapped to also enter
  `wavepass.cache_context(name)`, so each branch keeps its own cache state. Pipelines that
  batch both branches in one call (SDXL, SD3) need nothing: the batch is one state.
- The cache settings (threshold, hit limit, start/end) are run-time values: the handle
  holds them and every call runs inside `wavepass.cache_settings(...)`, so
  `handle.configure(...)` takes effect at the next call and compiles nothing. What is
  compiled depends only on `compile`, `mode` and `dynamic` (mode travels in the backend's
  options, so equal settings compare equal): applying again after `remove()` with any cache
  settings reuses Dynamo's compiled code.
- Every call runs inside `wavepass.watch(denoiser)`: a call Dynamo no longer compiles (its
  recompile limit, say) is counted in `wavepass.stats` with the reason, and said once.
- Never a crash from the compiler: where a call raises a failure of Dynamo, Inductor or
  wavepass (`wavepass.compile_failure`), the plain denoiser runs the call instead (its own
  results), and every later call until `remove()` (apply again to retry): each is counted
  in `wavepass.stats` with the cause and fix (`wavepass.call_or_fall_back`), said once. If the
  plain denoiser raises too, that error is the model's and propagates, as do out of memory
  and KeyboardInterrupt.
- `handle.remove()` / `remove_wavespeed(pipe)` restore each denoiser's previous
  `_compiled_call_impl`, `cache_context` and blocks, and forget the handle.

Limitation: a pipeline made with `from_pipe` shares the compiled denoiser but its scheduler is
not watched (apply to that pipeline instead, after removing from the first).
"""

from __future__ import annotations

import functools
import math
import weakref
from contextlib import contextmanager
from typing import Any, Iterator

import torch

import wavepass
from wavepass import CacheOptions

__all__ = ["WavespeedHandle", "apply_wavespeed", "remove_wavespeed"]

_ATTRIBUTE = "_wavepass_handle"  # on the pipeline: the handle of the applied wavespeed
_RETRY = ("Until wavespeed is applied again, the denoiser runs uncompiled (its own results, no "
          "speed-up); to try compiling again (after the fix), call remove_wavespeed(pipe) and "
          "apply_wavespeed(pipe, ...), or restart the process")
_MISSING = object()


class _Denoiser:
    """One denoiser of the pipeline as `apply_wavespeed` left it: what it replaced, and why
    compiling it failed (then its calls run it uncompiled)."""

    def __init__(self, name: str, module: torch.nn.Module) -> None:
        self.name, self.module = name, module
        self.previous_compiled: Any = module._compiled_call_impl
        self.previous_cache_context: Any = module.__dict__.get("cache_context", _MISSING)
        self.failed: str | None = None

    def restore(self) -> None:
        self.module._compiled_call_impl = self.previous_compiled
        wavepass.stack_cache.uninstall(self.module)  # the blocks' `forward` (the split path)
        if self.previous_cache_context is _MISSING:
            self.module.__dict__.pop("cache_context", None)
        else:
            self.module.__dict__["cache_context"] = self.previous_cache_context


class WavespeedHandle:
    """What `apply_wavespeed` did to a pipeline; `remove()` undoes it."""

    def __init__(self, pipe: Any, denoisers: list[tuple[str, torch.nn.Module]]) -> None:
        self._denoisers = tuple(_Denoiser(name, module) for name, module in denoisers)
        self.start, self.end = 0.0, 1.0
        self.settings: dict[str, Any] = {}  # wavepass.cache_settings of every call
        self._pipe = weakref.ref(pipe)
        self._timesteps: torch.Tensor | None = None  # scheduler.timesteps at the last call
        # calls per (denoiser, cache context) in this generation (for schedulers without step_index)
        self._calls: dict[tuple[str, str], int] = {}
        self._removed = False

    @property
    def denoisers(self) -> dict[str, torch.nn.Module]:
        """The compiled denoisers by attribute name ("transformer", "transformer_2", "unet")."""
        return {d.name: d.module for d in self._denoisers}

    @property
    def denoiser(self) -> torch.nn.Module:
        """The first (or only) compiled denoiser."""
        return self._denoisers[0].module

    @property
    def denoiser_name(self) -> str:
        return self._denoisers[0].name

    def configure(self, residual_diff_threshold: float | None = None, start: float | None = None,
                  end: float | None = None, max_consecutive_cache_hits: int | None = None,
                  policy: str | None = None) -> None:
        """Change the cache settings (None keeps one as it is); the next call uses them and
        nothing is compiled. Invalid values raise ValueError and change nothing."""
        start = self.start if start is None else start
        end = self.end if end is None else end
        if not (isinstance(start, (int, float)) and isinstance(end, (int, float))
                and math.isfinite(start) and math.isfinite(end) and 0 <= start < end <= 1):
            raise ValueError(
                f"apply_wavespeed: start and end are fractions of the sampling steps with "
                f"0 <= start < end <= 1 (e.g. start=0.0, end=1.0), got start={start!r}, end={end!r}"
            )
        given = {"residual_diff_threshold": residual_diff_threshold,
                 "max_consecutive_cache_hits": max_consecutive_cache_hits, "policy": policy}
        settings = {**self.settings, **{k: v for k, v in given.items() if v is not None}}
        with wavepass.cache_settings(**settings):  # validates them
            pass
        self.settings, self.start, self.end = settings, float(start), float(end)

    # The wrapper stored as each denoiser's _compiled_call_impl.
    def _call(self, denoiser: _Denoiser, compiled, *args: Any, **kwargs: Any) -> Any:
        allowed = self._window_allows_skipping(denoiser)
        module = denoiser.module

        def compiled_call():
            with (wavepass.skipping(allowed), wavepass.cache_settings(**self.settings), wavepass.watch(module)):
                return compiled(*args, **kwargs)

        result, denoiser.failed = wavepass.call_or_fall_back(
            module, compiled_call, lambda: module._call_impl(*args, **kwargs), denoiser.failed, _RETRY)
        return result

    def _window_allows_skipping(self, denoiser: _Denoiser) -> bool:
        pipe = self._pipe()
        scheduler = getattr(pipe, "scheduler", None) if pipe is not None else None
        timesteps = getattr(scheduler, "timesteps", None)
        if not isinstance(timesteps, torch.Tensor) or timesteps.numel() == 0:
            return True  # not inside a pipeline call: no schedule to place the call in
        if timesteps is not self._timesteps:  # set_timesteps ran: a new pipeline call
            self._timesteps = timesteps
            self._calls.clear()
            for each in self._denoisers:
                wavepass.reset(each.module)
            if wavepass.CacheSettings(**self.settings).may_skip:
                wavepass.warn_if_too_few_steps(len(timesteps))
        if hasattr(scheduler, "step_index"):
            index = scheduler.step_index
            if index is None:
                index = getattr(scheduler, "begin_index", None) or 0
        else:
            key = (denoiser.name, wavepass.current_context())
            index = self._calls.get(key, 0)
            self._calls[key] = index + 1
        return self.start <= index / len(timesteps) < self.end

    def remove(self) -> None:
        """Undo `apply_wavespeed`: the denoisers run uncompiled and uncached again."""
        if self._removed:
            return
        self._removed = True
        for denoiser in self._denoisers:
            denoiser.restore()
        pipe = self._pipe()
        if pipe is not None and pipe.__dict__.get(_ATTRIBUTE) is self:
            del pipe.__dict__[_ATTRIBUTE]

    def __repr__(self) -> str:
        state = "removed" if self._removed else "applied"
        names = ", ".join(d.name for d in self._denoisers)
        return f"WavespeedHandle({names}, start={self.start}, end={self.end}, {state})"


def apply_wavespeed(pipe: Any, residual_diff_threshold: float = 0.12, start: float = 0.0, end: float = 1.0,
                    max_consecutive_cache_hits: int = -1, compile: bool = True, mode: str | None = None,
                    dynamic: bool | None = None, policy: str = "fbcache") -> WavespeedHandle:
    """Compile `pipe`'s denoisers (`transformer`, and `transformer_2` where the pipeline has
    two experts, or `unet`) with the `wavespeed` backend, in place; returns a handle whose
    `remove()` undoes it (as does `remove_wavespeed(pipe)`).

    residual_diff_threshold, max_consecutive_cache_hits, policy: the cache settings (see
        README), run-time values: `handle.configure(...)` changes them without compiling.
    start, end: caching is allowed for steps i of N with start <= i/N < end (0 <= start < end <= 1);
        the other steps run every block. The defaults (the whole schedule) suit short schedules
        too: the rule never skips a generation's first step, a few-step schedule moves too far
        per step for it to skip at usual thresholds, and a window that is a fraction of the
        schedule would only shrink with it (docs/performance.md#few-step-schedules). A schedule
        under `wavepass.notices.FEW_STEPS` steps is said once to be too short for the cache.
    compile: True compiles every piece with Inductor; False runs the same cached program
        without compiling (`compiler="eager"`: caching only, fast to start).
    mode, dynamic: how Inductor compiles (mode goes to Inductor through the backend's options).

    Each pipeline call starts a new generation; `wavepass.stats(pipe.transformer)` (or
    `pipe.transformer_2`, `pipe.unet`) reports the skipped calls of the last one.
    """
    if pipe.__dict__.get(_ATTRIBUTE) is not None:
        raise RuntimeError(
            "apply_wavespeed: this pipeline already has wavespeed applied; call "
            "remove_wavespeed(pipe) (or handle.remove()) first to apply it with other settings"
        )
    handle = WavespeedHandle(pipe, _denoisers_of(pipe))
    handle.configure(residual_diff_threshold=residual_diff_threshold, start=start, end=end,
                     max_consecutive_cache_hits=max_consecutive_cache_hits, policy=policy)
    options = {"compiler": "inductor" if compile else "eager"}
    if mode is not None:
        options["mode"] = mode
    CacheOptions.from_dict(options)  # a bad mode fails here, not at the first call
    for denoiser in handle._denoisers:
        module = denoiser.module
        compiled = torch.compile(module._call_impl, backend="wavespeed", options=options, dynamic=dynamic)
        module._compiled_call_impl = functools.partial(handle._call, denoiser, compiled)
        if callable(getattr(module, "cache_context", None)):
            module.__dict__["cache_context"] = _branch_context(getattr(module, "cache_context"))
    pipe.__dict__[_ATTRIBUTE] = handle
    return handle


def remove_wavespeed(pipe: Any) -> None:
    """Undo `apply_wavespeed(pipe)`; a pipeline without it is left as it is."""
    handle = pipe.__dict__.get(_ATTRIBUTE)
    if handle is not None:
        handle.remove()


DENOISERS = ("transformer", "transformer_2", "unet")  # the attributes a pipeline holds denoisers in


def _denoisers_of(pipe: Any) -> list[tuple[str, torch.nn.Module]]:
    found = [(name, module) for name in DENOISERS
             if isinstance(module := getattr(pipe, name, None), torch.nn.Module)]
    if found:
        return found
    raise ValueError(
        f"apply_wavespeed: {type(pipe).__name__} has no `transformer` or `unet` module to compile; "
        f"compile the denoiser itself with torch.compile(model, backend=\"wavespeed\", options=...)"
    )


def _branch_context(original):
    """`denoiser.cache_context(name, ...)` that also keeps separate wavepass state per name."""

    @functools.wraps(original)
    @contextmanager
    def cache_context(name: str, *args: Any, **kwargs: Any) -> Iterator[None]:
        with original(name, *args, **kwargs), wavepass.cache_context(name):
            yield

    return cache_context
