"""What the nodes install on a MODEL: wavepass settings, and ComfyUI wrappers that compile the
diffusion model with the `wavespeed` backend and drive its cache through a sampling run.

    model_options["wavepass"] = {"cache": {...}, "compile": {...}}     (set by the nodes)

    OUTER_SAMPLE wrapper (once per sampling run, i.e. per KSampler execution)
        reset the cache (a re-run of a cached MODEL output starts clean), map start/end to
        sigmas through the model's `model_sampling.percent_to_sigma`, say once where the
        schedule is too short for a skip to pay (`wavepass.warn_if_too_few_steps`); at the end log
        "wavespeed: skipped H of N model calls"; on an exception reset again
    APPLY_MODEL wrapper (every model call)
        a rising sigma within a run resets the cache (a new generation); the call runs with
        `object_to_patch` swapped for its compiled module, inside
          wavepass.cache_settings(threshold, max hits)                the cache node's settings
          wavepass.cache_context(<cond/uncond chunk and input shape>)  separate state per chunk
          wavepass.skipping(start <= progress <= end)                  the start/end window
          wavepass.same_step((run, sigma))                             chunks of one step agree
          wavepass.watch(module)                                       uncompiled calls are said
        where the compiled call raises a compiler failure (`wavepass.compile_failure`: Dynamo,
        Inductor, wavepass), the call runs the plain module instead, and so does every later
        call of that module through these wrappers (until a node installs them again, which
        retries): each is counted in `wavepass.stats` with the cause and fix, said once
        (`wavepass.call_or_fall_back`). If the plain module raises too, the error is the model's
        and propagates; out of memory and interrupts always propagate.

One compiled module per module and *compile* settings (Compile Model+'s mode, dynamic,
fullgraph and Inductor options; or none, for the cache node alone): the cache node's
settings travel with the MODEL and reach the cached program at run time, so tuning the
threshold, changing start/end or removing and re-adding the cache node compiles nothing,
and neither does re-running a node or a workflow. LoRA and other weight patches change
parameters in place or replace them with same-shaped tensors; the backend reads parameters
as graph inputs, so either takes effect without a recompile (and starts a new cache
generation, see wavepass.runtime).

Only the public `wavepass` API is used here.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

import comfy.utils
from comfy.patcher_extension import WrappersMP

import wavepass

log = logging.getLogger("wavepass")

SETTINGS_KEY = "wavepass"
WRAPPER_KEY = "wavepass"


@dataclass
class _Run:
    """One sampling run: its start/end window in sigmas, and what it has seen so far."""

    start_sigma: float
    end_sigma: float
    last_sigma: float | None = None
    earlier: tuple[int, int] = (0, 0)  # (calls, hits) before a reset at a rising sigma


_run: ContextVar[_Run | None] = ContextVar("wavepass_comfy_run", default=None)
# Compiled modules live on the module they compile (not registered as a submodule), so they
# go with it: a cache keyed by the module would keep every model ever compiled alive.
_COMPILED_ATTRIBUTE = "_wavepass_compiled"


def settings_of(patcher) -> dict[str, dict[str, Any]]:
    return patcher.model_options.setdefault(SETTINGS_KEY, {})


def install(patcher) -> None:
    """(Re)install the wrappers on `patcher` from its current settings."""
    settings = json.loads(json.dumps(settings_of(patcher)))  # a snapshot, plain values only
    for kind in (WrappersMP.OUTER_SAMPLE, WrappersMP.APPLY_MODEL):
        patcher.remove_wrappers_with_key(kind, WRAPPER_KEY)
    if not uses_wavespeed(settings):  # only Parallel Model's settings: nothing to compile or cache
        return
    patcher.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _outer_sample_wrapper(settings))
    patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, _apply_model_wrapper(settings))


def uses_wavespeed(settings: dict[str, dict[str, Any]]) -> bool:
    """Whether Apply First Block Cache or Compile Model+ is on the MODEL."""
    return "cache" in settings or "compile" in settings


def backend_options(settings: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(options for the wavespeed backend, other torch.compile arguments): what keys compiled
    code, from Compile Model+ alone. Without it the cached program runs uncompiled (compiler
    "eager"), as First Block Cache alone."""
    compile_settings = settings.get("compile")
    if compile_settings is None:
        return {"compiler": "eager"}, {}
    options = {"compiler": "inductor", "inductor": compile_settings["inductor"]}
    if compile_settings["mode"] != "default":
        options["mode"] = compile_settings["mode"]
    return options, {"dynamic": compile_settings["dynamic"], "fullgraph": compile_settings["fullgraph"]}


def cache_settings(settings: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The run-time cache settings (`wavepass.cache_settings`) of the Apply First Block Cache
    node; without it nothing is skipped (threshold 0)."""
    cache = settings.get("cache", {"residual_diff_threshold": 0.0, "max_consecutive_cache_hits": -1})
    names = ("residual_diff_threshold", "max_consecutive_cache_hits", "policy")
    return {name: cache[name] for name in names if name in cache}


def _skip_transformer_options_guards(guard_entries) -> list[bool]:
    """ComfyUI passes per-call bookkeeping (sigmas, chunk layout, wrappers) in
    `transformer_options`; guarding on it would recompile every step (as ComfyUI's own
    TorchCompileModel node, we keep no guards on it, except those of CODE_OPTIONS).

    Given a filter, Dynamo builds the guards twice: once to show them to the filter, then the
    kept ones again. The first build leaves on each guard a weak reference to the object it
    guarded, and the second compares it with the object it finds now (`Guard.set_export_info`).
    For a numpy array live across a graph break (HunyuanDiT's rope grid, built with numpy in
    every forward) that object is a new `torch.from_numpy` tensor at each build, and comparing
    two tensors raises: `InternalTorchDynamoError: RuntimeError: Boolean value of Tensor with
    more than one value is ambiguous` (torch 2.13, any filter, even one keeping every guard).
    So the first build's reference is dropped here, as a compile without a filter never has it.
    """
    for entry in guard_entries:
        guard = getattr(entry, "orig_guard", None)
        if getattr(guard, "obj_weakref", None) is not None:
            try:
                guard.obj_weakref = None
            except (AttributeError, TypeError):  # another torch's Guard: nothing to undo
                pass
    return [_kept_guard(entry) for entry in guard_entries]


# What `transformer_options` holds that changes the model's code, not per call: the block
# patches and attention of Parallel Model (or of another pack). Their guards stay, and so do
# the guards on which keys the dict has, so that a program compiled without them is never
# run with them (or the other way round).
CODE_OPTIONS = ("optimized_attention_override", "patches_replace")


def _kept_guard(entry) -> bool:
    name = entry.name
    if "transformer_options" not in name:
        return True
    if any(f"transformer_options[{key!r}]" in name for key in CODE_OPTIONS):
        return True
    return name == "transformer_options" and getattr(entry, "guard_type", None) in KEY_GUARDS


KEY_GUARDS = ("DICT_KEYS_MATCH", "DICT_CONTAINS", "DICT_NOT_CONTAINS")  # which keys, not their values


def compiled_module(module: torch.nn.Module, settings: dict[str, dict[str, Any]]) -> Callable:
    """`torch.compile(module, backend="wavespeed", ...)`, one per module and compile settings
    (the cache settings reach the program at run time, through `wavepass.cache_settings`)."""
    options, kwargs = backend_options(settings)
    # a sharded program (Parallel Model's settings) and a one-device program of the same
    # module are two compiled modules (and CODE_OPTIONS' guards keep their code apart)
    key = json.dumps([options, kwargs, settings.get("parallel")], sort_keys=True)
    per_module = module.__dict__.setdefault(_COMPILED_ATTRIBUTE, {})
    if key not in per_module:
        per_module[key] = torch.compile(
            module, backend="wavespeed",
            options={**options, "guard_filter_fn": _skip_transformer_options_guards}, **kwargs,
        )
    return per_module[key]


def _object_to_patch(settings) -> str:
    return settings.get("compile", settings.get("cache", {})).get("object_to_patch", "diffusion_model")


def _outer_sample_wrapper(settings):
    def outer_sample(executor, *args, **kwargs):
        sigmas = args[3] if len(args) > 3 else kwargs.get("sigmas")
        if sigmas is not None and wavepass.CacheSettings(**cache_settings(settings)).may_skip:
            wavepass.warn_if_too_few_steps(len(sigmas) - 1)  # the last sigma ends the run
        with sampling_run(executor.class_obj.model_patcher, settings):
            return executor(*args, **kwargs)

    return outer_sample


@contextmanager
def sampling_run(patcher, settings: dict[str, dict[str, Any]]):
    """One sampling run of `patcher`'s model: the cache starts clean, start/end are mapped to
    sigmas, and the run's stats are logged at its end (an exception resets the cache again).
    The OUTER_SAMPLE wrapper runs it around ComfyUI's sampler; a Parallel Model worker around
    the calls rank 0 sends it."""
    cache = settings.get("cache", {})
    module = patcher.get_model_object(_object_to_patch(settings))
    sampling = patcher.get_model_object("model_sampling")
    run = _Run(start_sigma=float(sampling.percent_to_sigma(cache.get("start", 0.0))),
               end_sigma=float(sampling.percent_to_sigma(cache.get("end", 1.0))))
    wavepass.reset(module)
    token = _run.set(run)
    try:
        yield run
    except BaseException:
        wavepass.reset(module)
        raise
    finally:
        _run.reset(token)
    log.info("%s", run_stats(module, run))


def run_stats(module: torch.nn.Module, run: _Run) -> wavepass.Stats:
    """The stats of this run so far, across resets at rising sigmas."""
    now = wavepass.stats(module)
    calls, hits = run.earlier
    return wavepass.Stats(calls + now.calls, hits + now.hits, now.decisions, now.reason)


RETRY = ("Until a wavepass node of this MODEL runs again, the model runs uncompiled (its own "
         "results, no speed-up); to try compiling again (after the fix), change an input of "
         "Apply First Block Cache or Compile Model+, or remove and re-add the node, or restart "
         "ComfyUI")


def _apply_model_wrapper(settings):
    key = _object_to_patch(settings)
    cache = cache_settings(settings)
    # The modules whose compiled version failed with these settings, and why: they run as
    # they are for as long as these wrappers are installed (until the node runs again).
    failed: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()

    def apply_model(executor, x, t, *args, **kwargs):
        base = executor.class_obj
        module = comfy.utils.get_attr(base, key)
        sigma = float(t.max())
        run = _run.get()
        if run is not None:
            _reset_if_rising(run, module, sigma)
        compiled = lambda: _compiled_call(executor, module, settings, cache, run, sigma, x, t, *args, **kwargs)  # noqa: E731
        if settings.get("parallel"):
            return _compiled_on_every_rank(compiled)
        result, reason = wavepass.call_or_fall_back(
            module, compiled, lambda: executor(x, t, *args, **kwargs), failed.get(module), RETRY, _interrupts())
        if reason is not None:
            failed[module] = reason
        return result

    return apply_model


class ParallelCompileError(RuntimeError):
    """Compiling failed in one process of a Parallel Model run."""


def _compiled_on_every_rank(compiled):
    """A model call of a Parallel Model run: compiled, or an error naming the compiler's
    failure. No process falls back to the uncompiled model alone: the others would run the
    compiled program, whose collectives (the shared decision) it would not, and every process
    would wait for the others until the group's timeout."""
    try:
        return compiled()
    except Exception as error:  # noqa: BLE001 - only the compiler's failures are renamed
        cause = wavepass.compile_failure(error, _interrupts())
        if cause is None:
            raise
        raise ParallelCompileError(
            f"wavespeed parallel: compiling failed in this process ({cause}); with several devices a "
            f"process cannot run the model uncompiled alone. Fix: sample on one device (there the "
            f"model runs uncompiled after such a failure), or without Compile Model+") from error


def _interrupts() -> tuple[type[BaseException], ...]:
    """ComfyUI's cancel (raised through the sampler): never a compiler failure."""
    import comfy.model_management

    return (comfy.model_management.InterruptProcessingException,)


def _compiled_call(executor, module, settings, cache, run, sigma, x, t, *args, **kwargs):
    """The model call through its compiled version, in wavepass's settings and contexts."""
    base = executor.class_obj
    key = _object_to_patch(settings)
    with ExitStack() as scope:
        if run is not None:
            scope.enter_context(wavepass.skipping(run.end_sigma <= sigma <= run.start_sigma))
            scope.enter_context(wavepass.same_step((id(run), sigma)))
        transformer_options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
        chunk = tuple(transformer_options.get("cond_or_uncond", ()))
        scope.enter_context(wavepass.cache_context(f"comfy chunk {chunk} x {tuple(x.shape)}"))
        scope.enter_context(wavepass.cache_settings(**cache))
        scope.enter_context(wavepass.watch(module))
        scope.enter_context(_swapped(base, key, compiled_module(module, settings)))
        return executor(x, t, *args, **kwargs)


def _reset_if_rising(run: _Run, module: torch.nn.Module, sigma: float) -> None:
    """A sigma above the last one starts a new generation within the run."""
    if run.last_sigma is not None and sigma > run.last_sigma:
        stats = wavepass.stats(module)
        run.earlier = (run.earlier[0] + stats.calls, run.earlier[1] + stats.hits)
        wavepass.reset(module)
    run.last_sigma = sigma


@contextmanager
def _swapped(obj, key: str, value):
    """`obj.<key>` is `value` inside (ComfyUI's own torch.compile wrapper does the same)."""
    original = comfy.utils.set_attr(obj, key, value)
    try:
        yield
    finally:
        comfy.utils.set_attr(obj, key, original)
