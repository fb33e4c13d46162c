"""Sequence parallelism for ComfyUI's diffusion models: one sampling run on N devices.

    Parallel Model (wavespeed) -> model_options["wavepass"]["parallel"] = {"devices": [...], ...}

The ComfyUI process is rank 0: it runs ComfyUI's sampler unchanged. N-1 worker processes
(`torch.multiprocessing`, spawn) are started on the first call, kept across runs, and
started again after a failure or a change of devices (`Pool`, owned by this module). Every
call of the diffusion model is mirrored: rank 0 sends the call (inputs, timestep,
conditioning, the plain part of `transformer_options`) to every worker, and every rank runs
the same apply-model wrappers (the wavespeed ones included, from the same settings) on its
own copy of the model. Inside the model every rank holds a shard of the token sequence, cut in ComfyUI's block
patches by one rule read from what ComfyUI's forwards publish around each block, with Ulysses
attention (`sequence_shards.py`). Every rank runs the wavespeed wrappers from the same
settings, so the backend's reduction makes every rank decide as one process would.
"""

from __future__ import annotations

import datetime
import importlib
import os
import queue
import socket
import sys
import time
import traceback
import types
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing

from .sequence_shards import ParallelRefusal, install_sharding

STARTUP_S = 300.0  # a worker's spawn and imports (torch, ComfyUI), on a busy machine
FAILURE_REPORT_S = 5.0  # how long rank 0 waits for a failed worker's own report
WRAPPER_KEY = "wavepass_parallel"
# entries of `transformer_options` that each rank builds for itself: never sent
OWN_OPTIONS = ("wrappers", "callbacks", "patches", "patches_replace", "optimized_attention_override")
# Where the workers import ComfyUI from: None, as in ComfyUI (its modules on sys.path, its
# command-line arguments copied); tests name a "module:function" that prepares the imports.
worker_setup: str | None = None


class ParallelWorkerError(RuntimeError):
    """A worker died or raised: names the worker (rank, device) and the cause."""


# ---------------------------------------------------------------------------------------------
# The worker processes
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PoolSpec:
    devices: tuple[str, ...]  # rank r runs on devices[r]; rank 0 is this process
    backend: str  # "gloo" or "nccl"
    timeout_s: float  # the process group's timeout: how long a rank waits for the others

    @property
    def world(self) -> int:
        return len(self.devices)


def backend_for(devices: tuple[str, ...], backend: str) -> str:
    if backend != "auto":
        return backend
    return "nccl" if all(torch.device(d).type == "cuda" for d in devices) else "gloo"


def parse_devices(text: str) -> tuple[str, ...]:
    """"cuda:0,cuda:1" -> ("cuda:0", "cuda:1"); refused where a device does not exist."""
    devices = tuple(part.strip() for part in text.split(",") if part.strip())
    if len(devices) < 2:
        raise ParallelRefusal(f"Parallel Model: need at least 2 devices, got {text!r}. Fix: list "
                              f"them separated by commas, e.g. cuda:0,cuda:1.")
    for name in devices:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ParallelRefusal(f"Parallel Model: {name!r} is not a device name (e.g. cuda:1).") from None
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if device.index is None or device.index >= count:
                raise ParallelRefusal(
                    f"Parallel Model: {name} does not exist: this machine has {count} CUDA "
                    f"device(s). Fix: list only cuda:0 .. cuda:{max(count - 1, 0)} (with an index).")
        elif device.type != "cpu":
            raise ParallelRefusal(f"Parallel Model: {name}: only cuda:N and cpu devices are supported.")
    cuda = [d for d in devices if d.startswith("cuda")]
    if len(set(cuda)) != len(cuda):
        raise ParallelRefusal(f"Parallel Model: a CUDA device is listed twice in {text!r}; each "
                              f"device runs one rank.")
    return devices


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _without_main_module():
    """Spawn runs the parent's `__main__` again in each child (as `__mp_main__`); ComfyUI's
    main.py starts a server and runs prestartup scripts at import. The children import what
    they need themselves, so `__main__` is hidden from spawn while they start."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


class Pool:
    """The worker processes of one device set, and rank 0's end of the process group."""

    def __init__(self, spec: PoolSpec):
        self.spec = spec
        self.model_key: object = None  # which model (and weight patches) the workers hold
        self.closed = False
        context = torch.multiprocessing.get_context("spawn")
        self.outbox = context.Queue()  # from the workers: ("ready" | "error" | "stats", rank, ...)
        self.inboxes = [context.Queue() for _ in spec.devices[1:]]
        address = f"tcp://127.0.0.1:{_free_port()}"
        import comfy.cli_args

        comfy_args = vars(comfy.cli_args.args).copy()
        self.processes = []
        with _without_main_module():
            for rank, inbox in enumerate(self.inboxes, start=1):
                process = context.Process(
                    target=_worker_main, daemon=True, name=f"wavespeed-rank{rank}",
                    args=(rank, spec, address, worker_setup, comfy_args, torch.get_num_threads(),
                          inbox, self.outbox))
                process.start()
                self.processes.append(process)
        try:
            self._await("imported", STARTUP_S)
            dist.init_process_group(spec.backend, init_method=address, rank=0, world_size=spec.world,
                                    timeout=datetime.timedelta(seconds=spec.timeout_s))
            self._await("ready", STARTUP_S)
        except BaseException:
            self.close()
            raise

    def worker_name(self, rank: int) -> str:
        return f"worker rank {rank} ({self.spec.devices[rank]})"

    def _await(self, what: str, timeout: float) -> dict[int, Any]:
        """Every worker's `what` message, or ParallelWorkerError when one dies, reports an
        error, or is silent for `timeout` seconds."""
        answers: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(answers) < len(self.processes):
            try:
                kind, rank, payload = self.outbox.get(timeout=0.2)
            except queue.Empty:
                self.check_alive()
                if time.monotonic() > deadline:
                    missing = sorted(set(range(1, self.spec.world)) - set(answers))
                    raise ParallelWorkerError(f"wavespeed parallel: {', '.join(map(self.worker_name, missing))} "
                                              f"did not answer {what!r} within {timeout:.0f} s") from None
                continue
            if kind == "error":
                raise ParallelWorkerError(f"wavespeed parallel: {self.worker_name(rank)} failed: {payload}")
            if kind == what:
                answers[rank] = payload
        return answers

    def check_alive(self) -> None:
        dead = self._dead_worker(0)
        if dead is not None:
            raise dead

    def _dead_worker(self, wait: float) -> ParallelWorkerError | None:
        """The error of the first worker that exited (with its own report, if one arrives
        within `wait` seconds), or None while all live."""
        for rank, process in enumerate(self.processes, start=1):
            if not process.is_alive():
                return ParallelWorkerError(f"wavespeed parallel: {self.worker_name(rank)} exited "
                                           f"({_exit_reason(process.exitcode)}){self._reported(wait)}")
        return None

    def _reported(self, wait: float) -> str:
        """A worker's own report of its failure, if one arrives within `wait` seconds."""
        deadline = time.monotonic() + wait
        while True:
            try:
                kind, rank, payload = self.outbox.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                return ""
            if kind == "error":
                return f": {payload}"

    def send(self, message: tuple) -> None:
        self.check_alive()
        for inbox in self.inboxes:
            inbox.put(message)

    def failure(self) -> ParallelWorkerError | None:
        """After an error on rank 0: the worker failure that caused it, if a worker died or
        reported one within FAILURE_REPORT_S."""
        deadline = time.monotonic() + FAILURE_REPORT_S
        while time.monotonic() < deadline:
            try:
                kind, rank, payload = self.outbox.get(timeout=0.1)
            except queue.Empty:
                dead = self._dead_worker(0.5)
                if dead is not None:
                    return dead
                continue
            if kind == "error":
                return ParallelWorkerError(f"wavespeed parallel: {self.worker_name(rank)} failed: {payload}")
        return None

    def worker_stats(self) -> dict[int, tuple]:
        """{rank: wavepass.stats of its diffusion model, as a tuple} of every worker."""
        self.send(("stats",))
        return self._await("stats", self.spec.timeout_s)

    def worker_graphs(self) -> dict[int, int]:
        """{rank: the graphs Dynamo compiled in that worker so far} of every worker."""
        self.send(("graphs",))
        return self._await("graphs", self.spec.timeout_s)

    def close(self) -> None:
        """Stop the workers (asked, then killed) and leave the process group."""
        if self.closed:
            return
        self.closed = True
        for inbox, process in zip(self.inboxes, self.processes):
            if process.is_alive():
                inbox.put(("stop",))
        deadline = time.monotonic() + 5.0
        for process in self.processes:
            process.join(timeout=max(deadline - time.monotonic(), 0.1))
            if process.is_alive():
                process.kill()
                process.join(timeout=5.0)
        for channel in (*self.inboxes, self.outbox):  # never wait at exit for a dead reader
            channel.cancel_join_thread()
            channel.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


_pool: Pool | None = None


def pool_for(spec: PoolSpec) -> Pool:
    """The running pool for `spec`: the current one, or a new one (after a failure or for
    other devices)."""
    global _pool
    if _pool is not None and (_pool.closed or _pool.spec != spec):
        shutdown()
    if _pool is None:
        if dist.is_initialized():
            raise ParallelRefusal("Parallel Model: this ComfyUI process already belongs to a process "
                                  "group (another extension?); wavespeed needs its own.")
        _pool = Pool(spec)
    return _pool


def current_pool() -> Pool | None:
    return _pool if _pool is not None and not _pool.closed else None


def shutdown() -> None:
    """Stop the workers, if any (the next parallel run starts new ones)."""
    global _pool
    if _pool is not None:
        _pool.close()
        _pool = None


def _worker_main(rank, spec: PoolSpec, address, setup, comfy_args, threads, inbox, outbox) -> None:
    device = spec.devices[rank]
    try:
        torch.set_num_threads(threads)
        if setup:
            module, _, function = setup.partition(":")
            getattr(importlib.import_module(module), function)()
        if "comfy.model_management" not in sys.modules:
            import comfy.cli_args

            vars(comfy.cli_args.args).update(comfy_args)
        if torch.device(device).type == "cuda":
            torch.cuda.set_device(torch.device(device))
        import comfy.model_patcher  # noqa: F401  (imports ComfyUI's model code)

        outbox.put(("imported", rank, None))
        dist.init_process_group(spec.backend, init_method=address, rank=rank, world_size=spec.world,
                                timeout=datetime.timedelta(seconds=spec.timeout_s))
        outbox.put(("ready", rank, None))
        with torch.no_grad():
            _Worker(rank, spec, outbox).serve(inbox)
    except BaseException as error:  # report, then leave: the other ranks' collectives fail at once
        outbox.put(("error", rank, f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
        outbox.close()
        outbox.join_thread()
        os._exit(1)
    dist.destroy_process_group()


class _Worker:
    """A worker's model and its sampling run, driven by rank 0's messages."""

    def __init__(self, rank: int, spec: PoolSpec, outbox):
        self.rank, self.spec, self.outbox = rank, spec, outbox
        self.device = torch.device(spec.devices[rank])
        self.base = None  # ComfyUI's BaseModel, with rank 0's weights
        self.patcher = None  # its ModelPatcher: block patches, and the run's settings and wrappers
        self.run = ExitStack()  # the sampling run in progress (wavespeed's run state)

    def serve(self, inbox) -> None:
        while True:
            message = inbox.get()
            kind, args = message[0], message[1:]
            if kind == "stop":
                self.run.close()
                return
            getattr(self, f"on_{kind}")(*args)

    def on_model(self, config_class, config_state, state_dict) -> None:
        import comfy.model_patcher

        self.run.close()
        # sent as class and attributes: ComfyUI's model configs do not unpickle as objects
        model_config = object.__new__(config_class)
        vars(model_config).update(config_state)
        self.base = model_config.get_model({}, device=self.device)
        self.base.diffusion_model.load_state_dict(state_dict)
        self.base.eval()
        self.patcher = comfy.model_patcher.ModelPatcher(self.base, load_device=self.device,
                                                        offload_device=self.device)
        install_sharding(self.patcher, self.rank, self.spec.world)

    def on_run(self, settings: dict) -> None:
        """A sampling run begins, with the MODEL's wavepass settings (cache, compile, parallel):
        the wavespeed wrappers are installed again from them, the blocks' patches stay."""
        from . import sampling

        self.run.close()
        own = sampling.settings_of(self.patcher)
        own.clear()
        own.update(settings)
        sampling.install(self.patcher)
        if sampling.uses_wavespeed(settings):
            self.run.enter_context(sampling.sampling_run(self.patcher, settings))

    def on_end_run(self) -> None:
        self.run.close()

    def on_call(self, x, t, c_concat, c_crossattn, control, plain_options, kwargs) -> None:
        import comfy.patcher_extension

        options = dict(self.patcher.model_options.get("transformer_options", {}))
        options.update(plain_options)
        # as ComfyUI's sampler does (sampler_helpers.prepare_model_patcher): the patcher's
        # wrappers (the wavespeed ones) reach the model through transformer_options
        options["wrappers"] = comfy.patcher_extension.copy_nested_dicts(self.patcher.wrappers)
        move = _to_device(self.device)
        self.base.apply_model(move(x), move(t), move(c_concat), move(c_crossattn), move(control),
                              options, **move(kwargs))

    def on_stats(self) -> None:
        import wavepass

        module = self.patcher.get_model_object("diffusion_model") if self.patcher else None
        stats = _stats_tuple(wavepass.stats(module)) if module is not None else None
        self.outbox.put(("stats", self.rank, stats))

    def on_graphs(self) -> None:
        self.outbox.put(("graphs", self.rank, torch._dynamo.utils.counters["stats"]["unique_graphs"]))


def _stats_tuple(stats) -> tuple:
    return (stats.calls, stats.hits, tuple(stats.decisions), stats.reason)


def _map_tensors(function: Callable[[torch.Tensor], torch.Tensor], value):
    """`value` (tensors in nested dicts, lists and tuples) with `function` of every tensor."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, dict):
        return {k: _map_tensors(function, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(function, v) for v in value)
    return value


def _to_device(device: torch.device):
    return lambda value: _map_tensors(lambda tensor: tensor.to(device), value)


# ---------------------------------------------------------------------------------------------
# Rank 0: the wrappers that mirror each model call
# ---------------------------------------------------------------------------------------------

@dataclass
class _ParallelRun:
    """One sampling run on rank 0: its patcher, and whether the workers have begun it."""

    patcher: Any
    begun: bool = False


_parallel_run: ContextVar[_ParallelRun | None] = ContextVar("wavepass_parallel_run", default=None)


def _plain(value) -> bool:
    """Whether `value` can be sent to a worker as it is (tensors and plain data)."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.dtype)):
        return True
    if isinstance(value, (list, tuple)):
        return all(map(_plain, value))
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in value.items())
    return type(value).__module__ == "uuid"


def plain_options(transformer_options: dict) -> dict:
    """The entries of `transformer_options` a worker takes from rank 0: the plain ones, except
    those each rank builds itself (its wrappers and patches). Other patches are refused."""
    foreign = [key for key in ("patches",) if transformer_options.get(key)]
    foreign += [f"patches_replace[{k!r}]" for k in transformer_options.get("patches_replace", {}) if k != "dit"]
    if foreign:
        raise ParallelRefusal(f"Parallel Model: the model carries patches ({', '.join(foreign)}) "
                              f"that the worker processes cannot receive. Fix: sample it on one device.")
    return {key: value for key, value in transformer_options.items()
            if key not in OWN_OPTIONS and _plain(value)}


def _copies(value):
    """`value` with a copy of each CPU tensor, for a worker. The queue's feeder thread moves a
    CPU tensor it sends into shared memory (a new storage under the same tensor), which must not
    happen to a tensor the model is computing with. CUDA tensors travel as CUDA IPC handles,
    unmoved and uncopied: a worker copies them to its device before its first collective, which
    rank 0 waits for."""
    return _map_tensors(lambda tensor: tensor.detach().clone() if tensor.device.type == "cpu" else tensor.detach(),
                        value)


def spec_of(settings: dict) -> PoolSpec:
    parallel = settings["parallel"]
    return PoolSpec(tuple(parallel["devices"]), parallel["backend"], float(parallel["timeout_s"]))


def model_key(patcher) -> tuple:
    """What the workers' copy of the weights must match: the model and its weight patches."""
    return (id(patcher.model), getattr(patcher.model, "current_weight_patches_uuid", None), patcher.patches_uuid)


def install(patcher, settings: dict) -> None:
    """(Re)install the parallel wrappers and rank 0's block patches on `patcher`."""
    from comfy.patcher_extension import WrappersMP

    for kind in (WrappersMP.OUTER_SAMPLE, WrappersMP.APPLY_MODEL):
        patcher.remove_wrappers_with_key(kind, WRAPPER_KEY)
    patcher.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _outer_sample)
    patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, _apply_model_wrapper(settings))
    install_sharding(patcher, 0, len(settings["parallel"]["devices"]))


def _outer_sample(executor, *args, **kwargs):
    run = _ParallelRun(executor.class_obj.model_patcher)
    token = _parallel_run.set(run)
    try:
        return executor(*args, **kwargs)
    finally:
        _parallel_run.reset(token)
        pool = current_pool()
        if run.begun and pool is not None:
            pool.send(("end_run",))


def _apply_model_wrapper(settings: dict):
    from . import sampling

    def apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                    **kwargs):
        run = _parallel_run.get()
        if run is None:
            raise ParallelRefusal("Parallel Model: the model was called outside a sampling run "
                                  "(ComfyUI's sampler); only sampling runs on several devices.")
        if control is not None:
            raise ParallelRefusal("Parallel Model: ControlNet inputs are not split over devices yet. "
                                  "Fix: sample with ControlNet on one device.")
        options = transformer_options or {}
        plain = plain_options(options)
        pool = pool_for(spec_of(settings))
        try:
            if not run.begun:
                key = model_key(run.patcher)
                if pool.model_key != key:
                    base = run.patcher.model
                    module = getattr(base.diffusion_model, "_orig_mod", base.diffusion_model)
                    pool.send(("model", type(base.model_config), vars(base.model_config),
                               _copies(module.state_dict())))
                    pool.model_key = key
                pool.send(("run", sampling.settings_of(run.patcher)))
                run.begun = True
            pool.send(("call", *_copies((x, t, c_concat, c_crossattn, control, plain, kwargs))))
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        except (ParallelWorkerError, ParallelRefusal):  # every rank refuses alike: rank 0's words
            shutdown()
            raise
        except BaseException as error:
            cause = pool.failure() if isinstance(error, Exception) else None
            shutdown()  # the workers may wait in a collective rank 0 never reaches: start clean
            if cause is not None:
                raise cause from error
            raise

    return apply_model
