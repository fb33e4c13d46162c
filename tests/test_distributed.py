"""First Block Cache under context parallelism: diffusers' `enable_parallelism` (Ulysses) in two
CPU processes (gloo), against the same models run in this process.

The danger: each process holds a shard of the sequence and would decide on its own shard's
change; one process skipping while the other computes pairs the wrong collectives (a hang, or
data exchanged between the wrong blocks). `wavepass.distributed` sums the decision over the
processes, so every process decides as one process would on the whole sequence.

Two worker processes (`Pair`, spawned once for the module) run scenarios on request. Every
request has a deadline: a hang fails the test instead of blocking CI, and takes the workers
down with it (a later test starts new ones). Results travel as numpy arrays and plain values.
The single-process references run in this process (conftest: no_grad, clean Dynamo).

Most runs use `compiler="eager"` (the cached program without Inductor); one runs Inductor.
"""

from __future__ import annotations

import datetime
import functools
import itertools
import logging
import queue
import time
import traceback
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing

import families
import models
import wavepass
from wavepass import distributed as wdist
from wavepass import notices, runtime

WORLD = 2
STEPS = 10
PIPE_STEPS = 6
FLUX_PIPE_THRESHOLD = 0.3  # some but not all of 6 steps skip (see test_diffusers_integration.MIXED)
# forced disagreement: the first half of the tokens stays, the second moves by these amounts
DISAGREEMENT_THRESHOLD = 0.2
ACCUMULATED_THRESHOLD = 0.5  # policy="accumulated" skips runs of 2 calls of AMPLITUDES here
AMPLITUDES = (0.0, 1.0, 0.15, 0.3, 1.0, 0.2, 0.05, 0.6, 0.1)
FAULT_TIMEOUT_S = 3  # the process group timeout of the failure test, once compiled
FAILING_STEP = 3
STARTUP_S = 180  # spawn + import torch and diffusers, on a busy 2-core machine
SCENARIO_S = 150  # one scenario (Inductor compiles cold in the slowest)


# ---------------------------------------------------------------------------------------------
# The models and generations, run the same way by this process and by each worker
# ---------------------------------------------------------------------------------------------

@contextmanager
def one_accelerator_stand_in():
    """Stand-in, only around `enable_parallelism`: diffusers 0.42 places rank r on device
    `r % torch.accelerator.device_count()`, a division by zero on a machine without an
    accelerator. Here that count reads 1 (device "cpu:0") while the call runs."""
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: max(original(), 1)
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def enable_ulysses(model: torch.nn.Module, cp_plan=None) -> None:
    from diffusers import ContextParallelConfig

    with one_accelerator_stand_in():
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD), cp_plan=cp_plan)


def wan_cp_plan() -> dict:
    """Wan's sequence split at the patch embedding's output, along latent frames: the first
    block then runs on a shard, as every other block does, so the decision measures the first
    block's change of the shard (diffusers' own plan splits inside blocks.0: the signal would
    be the block's output instead of its change, and Dynamo breaks the graph at that hook).
    The rotary embedding and the output gather are diffusers' own."""
    from diffusers import WanTransformer3DModel
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    return {
        "rope": WanTransformer3DModel._cp_plan["rope"],
        "patch_embedding": {0: ContextParallelInput(split_dim=2, expected_dims=5, split_output=True)},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


@contextmanager
def recording_ratios():
    """Test spy on the decision: per decision, (this process's own ratio: its shard alone, the
    ratio decided on). In one process both are the same number."""
    original = runtime.relative_l1
    ratios: list[tuple[float, float]] = []

    def spy(current, previous, reduce=None):
        decided = original(current, previous, reduce)
        ratios.append((original(current, previous), decided))
        return decided

    runtime.relative_l1 = spy
    try:
        yield ratios
    finally:
        runtime.relative_l1 = original


def stats_of(model) -> tuple:
    s = wavepass.stats(model)
    return s.calls, s.hits, "".join("X" if d else "." for d in s.decisions), s.reason


def flux_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=models.flux().model)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    # no VAE: latent factor 8, packed 2x2: 64x64 pixels are 16 image tokens, with 6 text tokens
    kwargs = dict(height=64, width=64, prompt_embeds=torch.randn(1, 6, 16, generator=g),
                  pooled_prompt_embeds=torch.randn(1, 8, generator=g), num_inference_steps=PIPE_STEPS,
                  output_type="latent", return_dict=False)
    return pipe, lambda: pipe(**kwargs, generator=torch.Generator().manual_seed(0))[0]


def run_flux_pipeline(parallel: bool, compile: bool = False) -> dict:
    """apply_wavespeed on a Flux pipeline; in parallel, also the plain parallel pipeline and
    the cached one at threshold 0."""
    from wavepass_diffusers import apply_wavespeed

    pipe, generate = flux_pipeline()
    model = pipe.transformer
    result = {}
    if parallel:
        enable_ulysses(model)
        if not compile:
            result["plain"] = generate()
    handle = apply_wavespeed(pipe, residual_diff_threshold=FLUX_PIPE_THRESHOLD, compile=compile)
    with recording_ratios() as ratios:
        result.update(cached=generate(), stats=stats_of(model), ratios=ratios)
    if parallel and not compile:
        handle.configure(residual_diff_threshold=0.0)
        result.update(zero=generate(), zero_stats=stats_of(model))
    return result


def run_wan(parallel: bool) -> dict:
    """torch.compile(backend="wavespeed") on Wan in a sampling loop; in parallel, also the
    plain parallel model and the cached one at threshold 0."""
    case = families.wan()
    result = {}

    def sample(model):
        return models.sample(case, lambda x, t: model(**case.call_kwargs(x, t))[0], STEPS)[0]

    if parallel:
        enable_ulysses(case.model, cp_plan=wan_cp_plan())
        result["plain"] = sample(case.model)
    compiled = torch.compile(case.model, backend="wavespeed",
                             options={"compiler": "eager", "residual_diff_threshold": case.mixed_threshold})
    with recording_ratios() as ratios:
        result.update(cached=sample(compiled), stats=stats_of(case.model), ratios=ratios)
    if parallel:
        wavepass.reset(case.model)
        with wavepass.cache_settings(residual_diff_threshold=0.0):
            result.update(zero=sample(compiled), zero_stats=stats_of(case.model))
    return result


def break_every_block(model: torch.nn.Module) -> None:
    """A graph break inside each of Flux's double blocks (before its attention): Dynamo runs
    the forward as Python and compiles each block's frames alone, the split path
    (`stack_cache`), which caches the double blocks."""
    for block in model.transformer_blocks:
        block.attn.register_forward_pre_hook(lambda module, args: torch._dynamo.graph_break())


def run_disagreement(parallel: bool, split: bool = False, policy: str = "fbcache",
                     threshold: float = DISAGREEMENT_THRESHOLD) -> dict:
    """Flux called with the first half of its image tokens fixed and the second half moved by
    AMPLITUDES: under Ulysses, rank 0 holds the still half and rank 1 the moving one.
    `split`: with a graph break in every block; `policy`, `threshold`: the cache's."""
    case = models.flux()
    if split:
        break_every_block(case.model)
    if parallel:
        enable_ulysses(case.model)
    compiled = torch.compile(case.model, backend="wavespeed",
                             options={"compiler": "eager", "residual_diff_threshold": threshold, "policy": policy})
    base = case.inputs["hidden_states"]
    half = base.shape[1] // 2
    g = torch.Generator().manual_seed(5)
    outputs = []
    with recording_ratios() as ratios:
        for amplitude in AMPLITUDES:
            x = base.clone()
            x[:, half:] += amplitude * torch.randn(x[:, half:].shape, generator=g)
            outputs.append(compiled(**case.call_kwargs(x, torch.tensor([0.5])))[0])
    programs = sorted(type(p).__name__ for p in runtime.programs_of(case.model))
    return dict(outputs=torch.stack(outputs), stats=stats_of(case.model), ratios=ratios, programs=programs)


# ---------------------------------------------------------------------------------------------
# The worker processes
# ---------------------------------------------------------------------------------------------

def _plain(value):
    """Tensors as numpy arrays (pickled by value), containers walked."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy().copy()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map(_plain, value))
    return value


def scenario_reducer(rank: int) -> dict:
    """decision_reducer on a hand-made graph naming the world group, another group of the same
    two processes, and this process's group of one: one all-reduce, the true sum."""
    pair = dist.new_group([0, 1])
    alone = [dist.new_group([r]) for r in range(WORLD)][rank]  # every rank creates every group
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    for group in (dist.group.WORLD, pair, alone):
        x = graph.call_function(torch.ops._c10d_functional.all_reduce.default, (x, "sum", group.group_name))
        x = graph.call_function(torch.ops._c10d_functional.wait_tensor.default, (x,))
    graph.output(x)
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    names = wdist.collective_groups(gm)
    reduce = wdist.decision_reducer(gm)
    sums = torch.tensor([rank + 1.0, 10.0 * (rank + 1)])
    return dict(names=len(names), kept=len(wdist.reduction_groups({n: wdist._ranks_of(n) for n in names})),
                reduced=reduce(sums))


def scenario_failure(rank: int) -> dict:
    """Rank 1 fails at FAILING_STEP (an exception; its process lives on, as a server's would)
    and rank 0 goes on into the step's collectives. Once both ranks have compiled and run
    step 0, the process group's timeout is lowered to FAULT_TIMEOUT_S (torch's
    `_set_pg_timeout`: the setting `init_process_group(timeout=...)` makes), so that the
    ranks' difference in compile time cannot trip it."""
    case = models.flux()
    enable_ulysses(case.model)
    compiled = torch.compile(case.model, backend="wavespeed",
                             options={"compiler": "eager", "residual_diff_threshold": case.mixed_threshold})
    step = 0
    started = time.monotonic()

    def call(x, t):
        nonlocal step, started
        if step == 1:
            dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=FAULT_TIMEOUT_S))
        if rank == 1 and step == FAILING_STEP:
            raise RuntimeError(f"injected fault: rank 1 fails at step {step}")
        started = time.monotonic()
        out = compiled(**case.call_kwargs(x, t))[0]
        step += 1
        return out

    try:
        models.sample(case, call, STEPS)
    except RuntimeError as exc:
        return dict(step=step, error=str(exc)[:400], blocked_s=time.monotonic() - started)
    return dict(step=step, error=None, blocked_s=None)


SCENARIOS = {
    "flux_pipeline": lambda rank: run_flux_pipeline(parallel=True),
    "flux_pipeline_inductor": lambda rank: run_flux_pipeline(parallel=True, compile=True),
    "wan": lambda rank: run_wan(parallel=True),
    "disagreement": lambda rank: run_disagreement(parallel=True),
    "disagreement_split": lambda rank: run_disagreement(parallel=True, split=True),
    "disagreement_accumulated": lambda rank: run_disagreement(
        parallel=True, policy="accumulated", threshold=ACCUMULATED_THRESHOLD),
    "reducer": scenario_reducer,
    "failure": scenario_failure,
}


def _serve(rank: int, store: str, inbox, outbox) -> None:
    """A worker: init the process group, then run scenarios until told to stop."""
    try:
        torch.set_grad_enabled(False)
        logging.getLogger("diffusers").setLevel(logging.ERROR)  # "enable_parallelism is experimental"
        warnings.filterwarnings("ignore", category=FutureWarning)  # diffusers' all_gather_tensor
        dist.init_process_group("gloo", store=dist.FileStore(store, WORLD), rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=SCENARIO_S))
        outbox.put((rank, True, "ready"))
    except BaseException:
        outbox.put((rank, False, traceback.format_exc()))
        return
    while (request := inbox.get()) is not None:
        name, kwargs = request
        try:
            torch._dynamo.reset()
            wavepass.reset()
            notices._warned.clear()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", wavepass.WavespeedWarning)
                result = SCENARIOS[name](rank, **kwargs)
            if isinstance(result, dict):
                result["warnings"] = [str(w.message) for w in caught if w.category is wavepass.WavespeedWarning]
            outbox.put((rank, True, _plain(result)))
        except BaseException:
            outbox.put((rank, False, traceback.format_exc()))


class Pair:
    """WORLD worker processes and their process group; `run` asks every rank for a scenario."""

    _stores = itertools.count()

    def __init__(self, folder) -> None:
        self.folder = folder
        ctx = torch.multiprocessing.get_context("spawn")
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(WORLD)]
        store = str(folder / f"store-{next(self._stores)}")
        self.processes = [ctx.Process(target=_serve, args=(rank, store, inbox, self.outbox), daemon=True)
                          for rank, inbox in enumerate(self.inboxes)]
        for p in self.processes:
            p.start()
        self._ready = False

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self.processes)

    def _collect(self, what: str, ranks: set[int], timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        answers = {}
        while len(answers) < len(ranks):
            try:
                rank, ok, value = self.outbox.get(timeout=1.0)
            except queue.Empty:
                missing = sorted(ranks - set(answers))
                dead = [r for r in missing if not self.processes[r].is_alive()]
                if dead or time.monotonic() > deadline:
                    self.close()
                    why = (f"rank(s) {dead} exited (codes {[self.processes[r].exitcode for r in dead]})" if dead
                           else f"no answer from rank(s) {missing} within {timeout:.0f} s: a hang")
                    pytest.fail(f"{what}: {why}")
                continue
            if not ok:
                self.close()
                pytest.fail(f"{what}: rank {rank} raised:\n{value}")
            answers[rank] = value
        return answers

    def run(self, name: str, timeout: float = SCENARIO_S, **kwargs) -> list:
        if not self._ready:
            self._collect("starting the workers", set(range(WORLD)), STARTUP_S)
            self._ready = True
        for inbox in self.inboxes:
            inbox.put((name, kwargs))
        answers = self._collect(name, set(range(WORLD)), timeout)
        return [answers[r] for r in range(WORLD)]

    def close(self, wait: float = 5) -> None:
        """Stop the workers: asked to, then killed after `wait` seconds (0: at once, for a
        process group that is broken)."""
        for inbox, p in zip(self.inboxes, self.processes):
            if p.is_alive():
                inbox.put(None)
        for p in self.processes:
            p.join(timeout=wait)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """The running Pair (a new one where a test took the last one down)."""
    folder = tmp_path_factory.mktemp("distributed")
    holder = {"pair": Pair(folder)}

    def get() -> Pair:
        if not holder["pair"].alive:
            holder["pair"].close()
            holder["pair"] = Pair(folder)
        return holder["pair"]

    yield get
    holder["pair"].close()


@functools.cache
def single_process(name: str) -> dict:
    """The single-process run of a generation (computed once per session, tensors as numpy)."""
    with torch.no_grad():
        result = {"flux_pipeline": lambda: run_flux_pipeline(parallel=False),
                  "wan": lambda: run_wan(parallel=False),
                  "disagreement": lambda: run_disagreement(parallel=False),
                  "disagreement_split": lambda: run_disagreement(parallel=False, split=True),
                  "disagreement_accumulated": lambda: run_disagreement(
                      parallel=False, policy="accumulated", threshold=ACCUMULATED_THRESHOLD)}[name]()
    return _plain(result)


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

def assert_one_decision(ranks: list[dict], single: dict, threshold: float) -> None:
    """Every rank decided alike, as the single process did, on the same ratios."""
    # premise: no single-process ratio is so near the threshold that rounding could flip it
    for _, ratio in single["ratios"]:
        assert abs(ratio - threshold) > 1e-3 * threshold, (ratio, threshold)
    decided = [[r for _, r in result["ratios"]] for result in ranks]
    assert all(d == decided[0] for d in decided), "the ranks decided on different ratios"
    np.testing.assert_allclose(decided[0], [r for _, r in single["ratios"]], rtol=1e-4)
    assert all(result["stats"] == ranks[0]["stats"] for result in ranks), [r["stats"] for r in ranks]
    calls, hits, decisions, reason = ranks[0]["stats"]
    assert (calls, hits, decisions, reason) == single["stats"], (ranks[0]["stats"], single["stats"])
    assert reason is None and 0 < hits < calls, decisions


def test_flux_pipeline_ulysses_decides_as_one_process(workers):
    """apply_wavespeed on a Flux pipeline whose transformer runs Ulysses over two processes:
    the ranks decide alike and as one process does, and generate its latents; at threshold 0
    the cached program equals the plain parallel pipeline."""
    pair = workers()  # the workers start while this process runs the reference
    single = single_process("flux_pipeline")
    ranks = pair.run("flux_pipeline")
    assert_one_decision(ranks, single, FLUX_PIPE_THRESHOLD)
    for result in ranks:
        assert not result["warnings"], result["warnings"]
        np.testing.assert_allclose(result["cached"], single["cached"], rtol=1e-4, atol=1e-5)
        assert result["zero_stats"][1] == 0
        np.testing.assert_allclose(result["zero"], result["plain"], rtol=1e-5, atol=1e-6)


def test_wan_ulysses_decides_as_one_process(workers):
    """torch.compile(backend="wavespeed") on Wan (sequence split at the patch embedding): the
    same, in a sampling loop; threshold 0 (a cache_settings override) equals the plain model."""
    pair = workers()
    single = single_process("wan")
    ranks = pair.run("wan")
    assert_one_decision(ranks, single, families.wan().mixed_threshold)
    for result in ranks:
        assert not result["warnings"], result["warnings"]
        np.testing.assert_allclose(result["cached"], single["cached"], rtol=1e-4, atol=1e-5)
        assert result["zero_stats"][1] == 0
        np.testing.assert_allclose(result["zero"], result["plain"], rtol=1e-5, atol=1e-6)


def test_shards_that_would_disagree_make_one_decision(workers):
    """Rank 0's half of the sequence barely moves, rank 1's moves a lot: alone, rank 0 would
    skip where rank 1 computes. Reduced, both make the single process's decision, no hang."""
    pair = workers()
    single = single_process("disagreement")
    ranks = pair.run("disagreement")
    own = [[mine for mine, _ in result["ratios"]] for result in ranks]
    would_differ = [i for i, (a, b) in enumerate(zip(*own))
                    if (a < DISAGREEMENT_THRESHOLD) != (b < DISAGREEMENT_THRESHOLD)]
    assert would_differ, own  # premise: the shards alone decide differently at some call
    assert_one_decision(ranks, single, DISAGREEMENT_THRESHOLD)
    for result in ranks:
        assert not result["warnings"], result["warnings"]
        np.testing.assert_allclose(result["outputs"], single["outputs"], rtol=1e-4, atol=1e-5)


def test_split_stack_shards_that_would_disagree_make_one_decision(workers):
    """The same with a graph break in every block: the split path reduces its decision over
    the process groups its fragments communicate over, as the one-graph path does."""
    pair = workers()
    single = single_process("disagreement_split")
    assert single["programs"] == ["StackCache"], single["programs"]
    ranks = pair.run("disagreement_split")
    own = [[mine for mine, _ in result["ratios"]] for result in ranks]
    would_differ = [i for i, (a, b) in enumerate(zip(*own))
                    if (a < DISAGREEMENT_THRESHOLD) != (b < DISAGREEMENT_THRESHOLD)]
    assert would_differ, own
    assert_one_decision(ranks, single, DISAGREEMENT_THRESHOLD)
    for result in ranks:
        assert result["programs"] == ["StackCache"], result["programs"]
        # (diffusers' context-parallel hook around the forward is a frame of its own here: its
        # graph holds no blocks, and says nothing, the stack cache running between its calls)
        assert result["warnings"] == [], result["warnings"]
        np.testing.assert_allclose(result["outputs"], single["outputs"], rtol=1e-4, atol=1e-5)


def test_accumulated_sums_the_changes_every_rank_reduced(workers):
    """policy="accumulated" adds no decision input: it sums the changes the ranks reduced, so
    shards that would disagree alone still decide alike, call by call, as one process does."""
    pair = workers()
    single = single_process("disagreement_accumulated")
    ranks = pair.run("disagreement_accumulated")
    calls, hits, decisions, reason = single["stats"]
    assert reason is None and 0 < hits < calls and "XX" in decisions, single["stats"]  # a run the sum bounds
    for result in ranks:
        assert result["stats"] == single["stats"], (result["stats"], single["stats"])
        assert not result["warnings"], result["warnings"]
        np.testing.assert_allclose(result["outputs"], single["outputs"], rtol=1e-4, atol=1e-5)


def test_reducer_counts_each_process_once(workers):
    """The world group and another group of the same two processes are one set: reduced once;
    a group of one process is left out; the sum is the true one, the same bits on each rank."""
    ranks = workers().run("reducer")
    for result in ranks:
        assert (result["names"], result["kept"]) == (3, 1)
        np.testing.assert_array_equal(result["reduced"], [3.0, 30.0])


def test_inductor_under_ulysses_decides_as_one_process(workers):
    """The Flux pipeline again with Inductor (apply_wavespeed's default): no fallback, the
    eager single-process decisions, its latents within Inductor's rounding."""
    pair = workers()
    single = single_process("flux_pipeline")
    ranks = pair.run("flux_pipeline_inductor")
    for result in ranks:
        assert not result["warnings"], result["warnings"]
        assert result["stats"] == single["stats"], (result["stats"], single["stats"])
        np.testing.assert_allclose(result["cached"], single["cached"], rtol=1e-3, atol=1e-4)


def test_a_failing_rank_makes_the_other_raise_at_the_timeout(workers):
    """Rank 1 fails mid-generation and its process lives on: rank 0 blocks in its next
    collective until the process group's timeout (init_process_group(timeout=...)), then
    raises. The process group is broken afterwards: the workers are shut down."""
    pair = workers()
    try:
        ranks = pair.run("failure")
    finally:
        pair.close(wait=0)
    survivor, failed = ranks
    assert failed["step"] == FAILING_STEP and "injected fault" in failed["error"], failed
    assert survivor["step"] == FAILING_STEP and "timed out" in survivor["error"].lower(), survivor
    assert FAULT_TIMEOUT_S * 0.8 <= survivor["blocked_s"] < FAULT_TIMEOUT_S + 30, survivor


# ---------------------------------------------------------------------------------------------
# One process: reading the graph's collectives, choosing the groups
# ---------------------------------------------------------------------------------------------

def test_collective_groups_reads_the_group_argument_of_each_op():
    """Dynamo records op packets (all_to_all_single takes the group 4th, all_reduce 3rd,
    all_gather_into_tensor 3rd after the group size); overloads and keywords count too."""
    ops = torch.ops._c10d_functional
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    a = graph.call_function(ops.all_to_all_single, (x, [1, 1], [1, 1], "ulysses"))
    a = graph.call_function(ops.wait_tensor, (a,))
    b = graph.call_function(ops.all_reduce.default, (a, "sum", "ring"))
    c = graph.call_function(ops.all_gather_into_tensor, (b, 2), {"group_name": "flat"})
    d = graph.call_function(ops.all_to_all_single, (c, [1, 1], [1, 1], "ulysses"))
    graph.output(graph.call_function(torch.add, (d, 1)))
    assert wdist.collective_groups(torch.fx.GraphModule(torch.nn.Module(), graph)) == ("ulysses", "ring", "flat")


def test_no_collectives_no_reducer():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    assert wdist.collective_groups(gm) == () and wdist.decision_reducer(gm) is None


@pytest.mark.parametrize("groups, kept", [
    ({"world": (0, 1), "pair": (1, 0)}, ("world",)),  # the same set twice: once
    ({"ulysses": (0, 1), "ring": (0, 2), "flat": (0, 1, 2, 3)}, ("flat",)),  # dims inside the flattened mesh
    ({"ulysses": (0, 1), "ring": (0, 2)}, ("ulysses", "ring")),  # orthogonal: both
    ({"alone": (3,), "ulysses": (2, 3)}, ("ulysses",)),  # a group of one: nothing to share
    ({"unknown": None, "ulysses": (0, 1)}, ("unknown", "ulysses")),  # not resolvable here: kept
])
def test_reduction_groups(groups, kept):
    assert wdist.reduction_groups(groups) == kept
