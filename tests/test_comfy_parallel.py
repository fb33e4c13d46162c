"""Parallel Model (wavespeed): ComfyUI's tiny Flux and Wan sampled by `nodes.KSampler`'s code on
two CPU processes (gloo), against the same workflow in one process.

This process is rank 0 (as the ComfyUI process is); `wavepass_comfy.parallel` starts one
worker process on the first parallel run and keeps it for the module (a failure test starts a
new one). Every test runs under a deadline (SIGALRM): a hang fails it, and the process group's
timeout (TIMEOUT_S) bounds every wait inside a run. Compared with one process: the decisions
(`wavepass.stats`, on rank 0 and on the worker), the skipped steps, and the latents (to float32
rounding: the attention sums in another order).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from contextlib import contextmanager, nullcontext

import pytest
import torch

import comfy_support

nodes = comfy_support.require_nodes()

import comfy.patcher_extension  # noqa: E402
import comfy_models  # noqa: E402
from wavepass_comfy import parallel  # noqa: E402
from wavepass_comfy.nodes import ApplyFirstBlockCache, CompileModelPlus, ParallelModel  # noqa: E402

import wavepass  # noqa: E402
from wavepass import distributed as wdist  # noqa: E402
from wavepass import runtime  # noqa: E402

STEPS = 8
THRESHOLD = 0.3  # skips some but not all of 8 steps of the tiny models
TIMEOUT_S = 30  # the process group's timeout in these tests
DEADLINE_S = 240  # one test, a worker's start (spawn, import torch and ComfyUI) included
DEVICES = "cpu,cpu"


@contextmanager
def deadline(seconds: float):
    """Fail (TimeoutError) instead of hanging; the workers are stopped with the test."""
    def expire(signum, frame):
        raise TimeoutError(f"the test ran past its {seconds:.0f} s deadline")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except BaseException:
        parallel.shutdown()
        raise
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module", autouse=True)
def workers():
    """The workers import ComfyUI as this process does (CPU flags, test stand-ins); one pool
    serves the module and is stopped at its end."""
    parallel.worker_setup = "comfy_support:load"
    try:
        yield
    finally:
        parallel.shutdown()
        parallel.worker_setup = None


@pytest.fixture(autouse=True)
def bounded():
    with deadline(DEADLINE_S):
        yield


@pytest.fixture(scope="module")
def flux():
    return comfy_models.build("flux")


@pytest.fixture(scope="module")
def wan():
    return comfy_models.build("wan")


def fbcache(model, threshold=THRESHOLD):
    return ApplyFirstBlockCache.execute(model=model, object_to_patch="diffusion_model",
                                        residual_diff_threshold=threshold, start=0.0, end=1.0,
                                        max_consecutive_cache_hits=-1).result[0]


def compile_plus(model):
    return CompileModelPlus.execute(model=model, object_to_patch="diffusion_model", mode="default",
                                    dynamic="auto", fullgraph=False, options="").result[0]


def on_two(model, devices=DEVICES):
    return ParallelModel.execute(model=model, devices=devices, backend="gloo", timeout_s=TIMEOUT_S).result[0]


def ksampler(tiny, model, latent=None) -> torch.Tensor:
    """KSampler's own code (`nodes.common_ksampler`), euler / simple, seed 0."""
    return nodes.common_ksampler(model, 0, STEPS, tiny.cfg, "euler", "simple", tiny.positive, tiny.negative,
                                 latent or tiny.latent())[0]["samples"]


def stats_tuple(stats) -> tuple:
    return (stats.calls, stats.hits, tuple(stats.decisions), stats.reason)


def sample(tiny, model) -> tuple[torch.Tensor, tuple]:
    """The latents and this process's stats of one KSampler run."""
    latents = ksampler(tiny, model)
    return latents, stats_tuple(wavepass.stats(tiny.diffusion_model))


def assert_as_one_process(tiny, single_model, parallel_model, spy=nullcontext()) -> tuple:
    one, one_stats = sample(tiny, single_model)
    with spy:
        two, two_stats = sample(tiny, parallel_model)
    worker_stats = parallel.current_pool().worker_stats()
    assert one_stats[3] is None, one_stats  # cached, not fallen back
    assert 0 < one_stats[1] < STEPS, one_stats  # some steps skipped, not all
    assert two_stats == one_stats
    assert worker_stats == {1: one_stats}
    torch.testing.assert_close(two, one, atol=1e-4, rtol=1e-4)
    return one_stats


def compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_flux_on_two_processes_decides_as_one(flux):
    assert_as_one_process(flux, fbcache(flux.patcher), on_two(fbcache(flux.patcher)))
    graphs = compiled_graphs()
    assert graphs > 0
    # the threshold is a run-time value in every rank, and the nodes in the other order make
    # the same programs: nothing is compiled again (on rank 0; the worker runs the same calls)
    assert_as_one_process(flux, fbcache(flux.patcher, 0.2), fbcache(on_two(flux.patcher), 0.2))
    assert compiled_graphs() == graphs


def test_new_resolutions_compile_in_every_process_as_on_one_device(flux):
    """A new size compiles in each process what it compiles on one device (Dynamo makes the
    dimension that changed dynamic), a size seen before nothing, and the worker exactly what
    rank 0 does."""
    sizes = [(8, 8), (8, 12), (8, 8), (8, 12)]

    def new_graphs(model, ranks):
        counts = []
        for height, width in sizes:
            ksampler(flux, model, {"samples": torch.zeros(1, 16, height, width)})
            counts.append([compiled_graphs()] + ([parallel.current_pool().worker_graphs()[1]] if ranks == 2 else []))
        return [[count - first for count, first in zip(row, counts[0])] for row in counts]

    one = [row[0] for row in new_graphs(fbcache(flux.patcher), 1)]
    assert one[1] > 0 and one[3] == one[2] == one[1], one
    torch._dynamo.reset()  # both processes start from nothing compiled: rank 0 here, and a new worker
    torch._dynamo.utils.counters.clear()
    parallel.shutdown()
    assert new_graphs(on_two(fbcache(flux.patcher)), 2) == [[count, count] for count in one]


def test_wan_on_two_processes_decides_as_one(wan):
    assert_as_one_process(wan, compile_plus(fbcache(wan.patcher)), compile_plus(fbcache(on_two(wan.patcher))))


@pytest.mark.parametrize("family", ["hunyuan_video", "qwen_image"])
def test_a_family_no_rule_was_written_for_decides_as_one(family):
    """The cut is read from what ComfyUI's forwards publish (`sequence_shards.stack_streams`), not
    from a table of classes: HunyuanVideo (double and single stacks, text joined) and
    Qwen-Image (one joint stack) follow it as FLUX does."""
    tiny = comfy_models.build(family)
    assert_as_one_process(tiny, fbcache(tiny.patcher), on_two(fbcache(tiny.patcher)))


def test_a_mask_over_the_joined_sequence_is_split_as_one_process_applies_it(flux):
    """Regional prompting masks FLUX's joint attention over text + image ([b, q, k], as
    attention-couple nodes set it in the conditioning): every rank takes the mask's rows and
    columns in the order Ulysses gathers the tokens, and its run equals one process's."""
    latent = flux.latent()["samples"]
    tokens = flux.positive[0][0].shape[1] + (latent.shape[2] // 2) * (latent.shape[3] // 2)
    mask = -4.0 * torch.rand(1, tokens, tokens, generator=torch.Generator().manual_seed(3))
    cond, extra = flux.positive[0]
    masked = dataclasses.replace(flux, positive=[[cond, {**extra, "attention_mask": mask,
                                                         "attention_mask_img_shape": (latent.shape[2] // 2,
                                                                                      latent.shape[3] // 2)}]])
    assert_as_one_process(masked, fbcache(flux.patcher), on_two(fbcache(flux.patcher)))
    unmasked, _ = sample(flux, fbcache(flux.patcher))
    assert (sample(masked, fbcache(flux.patcher))[0] - unmasked).abs().max() > 1e-2  # the mask mattered


def test_without_wavespeed_nodes_the_parallel_model_equals_one_process(flux):
    one = ksampler(flux, flux.patcher)
    two = ksampler(flux, on_two(flux.patcher))
    torch.testing.assert_close(two, one, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def loras(tmp_path_factory, flux):
    import folder_paths

    folder = tmp_path_factory.mktemp("loras")
    folder_paths.add_model_folder_path("loras", str(folder))
    return [comfy_models.write_lora(folder, f"random-{seed}.safetensors", flux.diffusion_model, seed)
            for seed in (1, 2)]


def test_loras_in_the_workflow_reach_the_worker(flux, loras):
    """A LoRA after Parallel Model (or another one later) changes ComfyUI's weight patches:
    the worker gets the patched weights and the run equals one process's with the LoRA."""
    parallel_model = on_two(fbcache(flux.patcher))
    for name in loras:
        lora = nodes.LoraLoaderModelOnly().load_lora_model_only
        one, one_stats = sample(flux, lora(fbcache(flux.patcher), name, 1.0)[0])
        two, two_stats = sample(flux, lora(parallel_model, name, 1.0)[0])
        assert two_stats == one_stats
        torch.testing.assert_close(two, one, atol=1e-4, rtol=1e-4)
    plain, _ = sample(flux, fbcache(flux.patcher))
    assert (two - plain).abs().max() > 1e-2  # the LoRA made a difference


class Recording:
    """Rank 0's spies, inside: per decision (its shard's own ratio, the ratio decided on), and
    the process groups the backend read from each graph's collectives."""

    def __init__(self):
        self.ratios: list[tuple[float, float]] = []
        self.groups: list[tuple[str, ...]] = []

    def __enter__(self) -> Recording:
        relative_l1, collective_groups = self._originals = runtime.relative_l1, wdist.collective_groups

        def ratio_spy(current, previous, reduce=None):
            decided = relative_l1(current, previous, reduce)
            self.ratios.append((float(relative_l1(current, previous)), float(decided)))
            return decided

        def groups_spy(gm):
            found = collective_groups(gm)
            self.groups.append(found)
            return found

        runtime.relative_l1, wdist.collective_groups = ratio_spy, groups_spy
        return self

    def __exit__(self, *exc) -> None:
        runtime.relative_l1, wdist.collective_groups = self._originals


def test_shards_that_would_decide_otherwise_decide_as_one(flux):
    """Rank 0's shard alone would decide otherwise than the whole sequence at the first
    decision; with the threshold between the two, every rank still decides as one process."""
    with Recording() as first:
        sample(flux, on_two(fbcache(flux.patcher, 1e-9)))  # decides every step, never skips
    # Dynamo captured the all-to-alls and gathers as _c10d_functional ops of the world group
    assert first.groups and all(found == (first.groups[0][0],) for found in first.groups if found), first.groups
    alone, whole = first.ratios[0]
    assert abs(alone - whole) > 1e-2 * whole, first.ratios[0]  # far beyond rounding (1e-6)
    threshold = (alone + whole) / 2
    spy = Recording()
    stats = assert_as_one_process(flux, fbcache(flux.patcher, threshold), on_two(fbcache(flux.patcher, threshold)),
                                  spy)
    alone, whole = spy.ratios[0]
    assert (alone < threshold) != (whole < threshold)  # alone, rank 0 would have decided otherwise
    assert stats[2][1] == (whole < threshold)  # the first decision (call 2) is the whole's


def kill_worker_at_call(model, call: int):
    """A clone of `model` whose `call`-th model call first kills worker rank 1 (SIGKILL)."""
    calls = []

    def kill(executor, *args, **kwargs):
        calls.append(None)
        if len(calls) == call:
            os.kill(parallel.current_pool().processes[0].pid, signal.SIGKILL)
        return executor(*args, **kwargs)

    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_kill", kill)
    return clone


def test_a_killed_worker_ends_the_run_naming_it_and_the_next_run_starts_clean(flux):
    model = on_two(fbcache(flux.patcher))
    reference = ksampler(flux, fbcache(flux.patcher))
    ksampler(flux, model)  # the pool runs
    started = time.monotonic()
    with pytest.raises(parallel.ParallelWorkerError, match=r"worker rank 1 \(cpu\).*signal 9"):
        ksampler(flux, kill_worker_at_call(model, 3))
    assert time.monotonic() - started < TIMEOUT_S
    assert parallel.current_pool() is None
    torch.testing.assert_close(ksampler(flux, model), reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("devices, words", [
    ("cpu", "need at least 2 devices"),
    ("cuda:0,cuda:1", "does not exist"),
    ("cpu,cpu,cpu", "2 attention heads, which do not divide among 3 devices"),
])
def test_bad_devices_are_refused_before_sampling(flux, devices, words):
    with pytest.raises(parallel.ParallelRefusal, match=words):
        on_two(flux.patcher, devices)


def test_a_model_that_cannot_be_split_is_refused_with_its_name():
    sd3 = comfy_models.build("sd3")  # its forward does not say which block of how many runs
    with pytest.raises(parallel.ParallelRefusal, match="OpenAISignatureMMDITWrapper cannot be split.*block_index"):
        on_two(sd3.patcher)


def test_a_token_count_that_does_not_divide_is_refused_with_the_fix(flux):
    latent = {"samples": torch.zeros(1, 16, 6, 6)}  # 3 x 3 patches: 9 image tokens
    started = time.monotonic()
    with pytest.raises(parallel.ParallelRefusal, match=r"`img` stream has 9 tokens.*Fix"):
        ksampler(flux, on_two(fbcache(flux.patcher)), latent)
    assert time.monotonic() - started < TIMEOUT_S
    assert parallel.current_pool() is None  # the worker raised too; the next run starts clean


def test_a_worker_that_raises_ends_the_run_naming_it_and_its_cause(flux, monkeypatch):
    parallel.shutdown()
    monkeypatch.setattr(parallel, "worker_setup", "comfy_support:no_such_setup")  # raises in the worker
    started = time.monotonic()
    with pytest.raises(parallel.ParallelWorkerError,
                       match=r"worker rank 1 \(cpu\) failed: AttributeError: .*no_such_setup"):
        ksampler(flux, on_two(flux.patcher))
    assert time.monotonic() - started < TIMEOUT_S
    assert parallel.current_pool() is None


def test_a_compile_that_fails_in_one_process_ends_the_run_naming_it(flux, monkeypatch):
    """One device falls back to the uncompiled model after a compiler failure; a process of a
    parallel run cannot (the others' compiled program shares a decision it would not): the
    run ends, naming the worker and the failure, within the group's timeout."""
    parallel.shutdown()
    monkeypatch.setattr(parallel, "worker_setup", "comfy_support:load_with_a_failing_compiler")
    started = time.monotonic()
    with pytest.raises(parallel.ParallelWorkerError,
                       match=r"worker rank 1 \(cpu\) failed: ParallelCompileError: .*compiling failed in this process"
                             r".*simulated Inductor failure.*Fix: sample on one device"):
        ksampler(flux, on_two(fbcache(flux.patcher)))
    assert time.monotonic() - started < TIMEOUT_S
    assert parallel.current_pool() is None
