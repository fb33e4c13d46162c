"""A ComfyUI user's session, replayed in one process: how often it compiles, how long compiling
takes, and whether caching and compiled code survive to its end (issue #19).

Two configurations, each in a fresh subprocess of its own (a fresh Dynamo) with a fresh, empty
TORCHINDUCTOR_CACHE_DIR (`--warm-cache DIR`: one folder kept and reused instead):

* wavepass -- Apply First Block Cache (threshold t) -> Compile Model+ (mode default, dynamic
              auto), the pack loaded by ComfyUI's own loader (`nodes.load_custom_node`);
* comfyui  -- ComfyUI's own nodes: EasyCache (reuse_threshold t) -> TorchCompileModel
              (backend inductor), from comfy_extras/.

Both -> `nodes.KSampler().sample(...)`, 8 steps (euler, simple), on ComfyUI's Flux class,
tiny with random weights (tests/comfy_models.py). The session, the same for both (31 runs):

  1. threshold  20 thresholds in a row, 0.05 .. 1.0, one run each;
  2. uncached   the cache node removed (compile node only) for one run; re-added (t = 0.3);
  3. lora       three random rank-2 LoRAs through LoraLoaderModelOnly (before the cache and
                compile nodes), strengths 1.0 and 0.5 each (t = 0.3 from here on);
  4. model      a second model of the same architecture (`build("flux", seed=1)`);
  5. resolution a larger latent (16x16 instead of 8x8), then back to the first.

Nodes are re-executed as ComfyUI's execution cache does: a node runs again when one of its
inputs (an upstream output or a widget value) differs from its last execution, otherwise its
last output is reused. So each threshold re-executes the cache node and the compile node
after it (a new `torch.compile` object for TorchCompileModel), and a resolution change
re-executes only KSampler. Each node keeps the defaults of its widgets other than the
threshold: EasyCache start_percent 0.15, end_percent 0.95; Apply First Block Cache start 0,
end 1, no limit of consecutive hits.

Per run, measured in the child:
* compiles  -- Dynamo's counters: new `unique_graphs` (graphs handed to the backend),
               frames compiled (entries of Dynamo's `_compile.compile_inner` timer), the
               recompiles Dynamo logs (`torch._logging.set_logs(recompiles=True)`: the
               function and the failed guards) and its "hit config.recompile_limit" warnings
               (after which that function runs uncompiled for any new guard failure);
* compile s -- the run's wall time minus the median wall time of the runs that compiled
               nothing (`excess_s`, the headline: it holds all compile work, also what runs
               outside Dynamo's timer, e.g. kernel builds a first call waits for), and the
               seconds Dynamo's own timer `_compile.compile_inner` adds (tracing plus the
               backend's compile inside it). Inductor's one-time probe of the CPU's vector
               instructions (several seconds on an empty cache folder) is run and timed
               before the session (`vec_isa_probe_s`), outside both;
* skipped   -- steps skipped by the cache: `wavepass.stats(model)` after the run (wavepass);
               EasyCache's own "EasyCache - skipped N/M steps" log line (comfyui);
* eager     -- how much of the model ran uncompiled: the calls of its LayerNorms made by
               Python that ran eagerly (`count_eager_layer_norms`: a forward pre-hook that
               counts only outside Dynamo's tracing, so compiled graphs make none), in model
               calls' worth (an eager 8-step run makes 8).

    python benchmarks/session.py --json benchmarks/results/session-cpu.json \\
        --md benchmarks/results/session-cpu.md          (~6 min here)
    python benchmarks/session.py --report benchmarks/results/session-cpu.json   (the table again)

One intra-op thread per process (a shared 2-core machine); Inductor's compile workers are its
default. The table is printed, and written to --md; --json has every run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("wavepass", "comfyui")
LABELS = {"wavepass": "wavepass: Apply First Block Cache -> Compile Model+",
          "comfyui": "ComfyUI: EasyCache -> TorchCompileModel (inductor)"}
STEPS = 8
THRESHOLDS = [round(0.05 * i, 2) for i in range(1, 21)]  # 0.05 .. 1.0
TUNED = 0.3  # the threshold the user keeps after tuning
LORAS = 3
STRENGTHS = (1.0, 0.5)
PHASES = ("threshold", "uncached", "lora", "model", "resolution")


def session_plan() -> list[dict]:
    """The runs of the session: phase, label, threshold (None: no cache node), LoRA, model
    seed, latent size."""
    runs = [dict(phase="threshold", label=f"t={t}", threshold=t) for t in THRESHOLDS]
    runs.append(dict(phase="uncached", label="cache node removed", threshold=None))
    runs.append(dict(phase="uncached", label=f"cache node re-added, t={TUNED}", threshold=TUNED))
    for index in range(LORAS):
        for strength in STRENGTHS:
            runs.append(dict(phase="lora", label=f"LoRA {index} @ {strength}", threshold=TUNED,
                             lora=(index, strength)))
    runs.append(dict(phase="model", label="second model (seed 1)", threshold=TUNED, model_seed=1))
    runs.append(dict(phase="resolution", label="latent 16x16", threshold=TUNED, size=16))
    runs.append(dict(phase="resolution", label="latent 8x8 again", threshold=TUNED, size=8))
    for run in runs:
        run.setdefault("lora", None)
        run.setdefault("model_seed", 0)
        run.setdefault("size", 8)
    return runs


# --- the child: one configuration's session in this process ------------------------------


class Records(logging.Handler):
    """Keeps the log records the measurement reads, tagged with the run they came in."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.run = -1
        self.items: list[tuple[int, str, str]] = []

    def emit(self, record):
        try:
            message = record.getMessage()
        except Exception:  # a record whose arguments do not format: not one we read
            return
        if ("Recompiling function" in message or "hit config." in message
                or message.startswith(("EasyCache - skipped", "wavespeed: skipped"))):
            self.items.append((self.run, record.name, message))

    def of_run(self, run: int) -> list[str]:
        return [m for r, _, m in self.items if r == run]


def _recompile(message: str) -> dict:
    """'Recompiling function F in FILE:LINE' and its guard failures (without stack traces)."""
    lines = message.splitlines()
    head = re.match(r"Recompiling function (\S+) in (\S+)", lines[0])
    failures = [line.strip()[2:] for line in lines[1:]
                if line.strip().startswith("- ") and not line.strip().startswith(("- User stack", "- File", "-   "))]
    return {"function": head.group(1) if head else lines[0],
            "where": _short_path(head.group(2)) if head else "",
            "failures": [_short_guard(f) for f in failures]}


def _limit_hit(message: str) -> dict:
    function = re.search(r"function: '([^']+)' \(([^)]+)\)", message)
    limit = re.search(r"hit config\.(\w+) \((\d+)\)", message)
    last = re.search(r"last reason: (.*)", message)
    return {"limit": f"{limit.group(1)}={limit.group(2)}" if limit else "",
            "function": function.group(1) if function else "", "where": _short_path(function.group(2)) if function else "",
            "last_reason": _short_guard(last.group(1)) if last else ""}


def _short_path(path: str) -> str:
    for marker in ("ComfyUI/", "site-packages/", str(ROOT) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _short_guard(text: str) -> str:
    """A guard failure without its trailing '# source line' comment."""
    return re.sub(r"\s+#.*$", "", text).strip()


class Node:
    """A node of the workflow with ComfyUI's execution cache: it executes again only when its
    inputs differ from its last execution's (upstream outputs by identity, widget values)."""

    def __init__(self, name: str, function):
        self.name, self.function = name, function
        self.key, self.output, self.executions = None, None, 0

    def __call__(self, *inputs, **widgets):
        key = (tuple(map(id, inputs)), tuple(sorted(widgets.items())))
        if key != self.key:
            self.key, self.output = key, self.function(*inputs, **widgets)
            self.executions += 1
        return self.output


def child(config: str, args) -> dict:
    import torch

    torch.set_num_threads(1)  # 2 OpenMP threads on a shared 2-core machine wait on each other
    from torch._dynamo.utils import compilation_time_metrics, counters

    started = time.perf_counter()
    probe_s = _timed(_probe_vec_isa)

    sys.path.insert(0, str(ROOT / "tests"))
    import comfy_support

    nodes = comfy_support.load_nodes()
    if nodes is None:
        raise SystemExit(f"ComfyUI or its node dependencies are missing: {comfy_support.FETCH_COMMAND}")
    import comfy_models
    import folder_paths

    records = Records()
    torch._logging.set_logs(recompiles=True)  # (re)configures torch's loggers: handlers after it
    logging.getLogger("torch._dynamo").addHandler(records)  # it does not propagate to the root
    logging.getLogger().addHandler(records)
    logging.getLogger().setLevel(logging.INFO)  # EasyCache's and wavepass's run lines are INFO

    if config == "wavepass":
        import wavepass

        assert asyncio.run(nodes.load_custom_node(str(ROOT)))
        fbcache_node = nodes.NODE_CLASS_MAPPINGS["WavepassApplyFirstBlockCache"]
        compile_node = nodes.NODE_CLASS_MAPPINGS["WavepassCompileModelPlus"]
        cache = Node("Apply First Block Cache", lambda m, threshold: fbcache_node.execute(
            model=m, object_to_patch="diffusion_model", residual_diff_threshold=threshold,
            start=0.0, end=1.0, max_consecutive_cache_hits=-1).result[0])
        compile_ = Node("Compile Model+", lambda m: compile_node.execute(
            model=m, object_to_patch="diffusion_model", mode="default", dynamic="auto",
            fullgraph=False, options="").result[0])
    else:
        from comfy_extras.nodes_easycache import EasyCacheNode
        from comfy_extras.nodes_torch_compile import TorchCompileModel

        cache = Node("EasyCache", lambda m, threshold: EasyCacheNode.execute(
            model=m, reuse_threshold=threshold, start_percent=0.15, end_percent=0.95,
            verbose=False).result[0])
        compile_ = Node("TorchCompileModel", lambda m: TorchCompileModel.execute(model=m, backend="inductor").result[0])

    models = {seed: comfy_models.build("flux", seed=seed) for seed in (0, 1)}
    tiny = models[0]
    lora_folder = Path(tempfile.mkdtemp(prefix="wavepass-session-loras-"))
    folder_paths.add_model_folder_path("loras", str(lora_folder))
    lora_names = [comfy_models.write_lora(lora_folder, f"session-{i}.safetensors", tiny.diffusion_model, seed=10 + i)
                  for i in range(LORAS)]
    lora_node = Node("LoraLoaderModelOnly", lambda m, name, strength:
                     nodes.LoraLoaderModelOnly().load_lora_model_only(m, name, strength)[0])

    def latent(size: int) -> dict:
        shape = list(tiny.spec.latent_shape)
        shape[-2:] = [size, size]
        return {"samples": torch.zeros(shape)}

    def ksampler(model, which, size) -> None:
        nodes.KSampler().sample(model, 0, STEPS, which.cfg, "euler", "simple", which.positive,
                                which.negative, latent(size))

    eager_layer_norms = [0]
    count_eager_layer_norms([m.diffusion_model for m in models.values()], eager_layer_norms)

    def counted(fn) -> tuple[float, int]:
        """(wall seconds, eager LayerNorm calls) of fn()."""
        before = eager_layer_norms[0]
        seconds = _timed(fn)
        return seconds, eager_layer_norms[0] - before

    # the eager model (no Dynamo): per-run time, and LayerNorm calls per model call
    ksampler(tiny.patcher, tiny, 8)  # warm-up
    eager_s, eager_ops = counted(lambda: ksampler(tiny.patcher, tiny, 8))
    eager_ops_per_call = eager_ops / STEPS  # cfg 1: one model call per step

    runs = []
    session_started = time.perf_counter()
    for index, plan in enumerate(session_plan()):
        records.run = index
        which = models[plan["model_seed"]]
        model = which.patcher
        if plan["lora"] is not None:
            lora, strength = plan["lora"]
            model = lora_node(model, name=lora_names[lora], strength=strength)
        if plan["threshold"] is not None:
            model = cache(model, threshold=plan["threshold"])
        model = compile_(model)
        graphs, frames = counters["stats"]["unique_graphs"], len(compilation_time_metrics.get("_compile.compile_inner", []))
        compile_before = sum(compilation_time_metrics.get("_compile.compile_inner", []))
        wall, ops = counted(lambda: ksampler(model, which, plan["size"]))
        messages = records.of_run(index)
        row = {**{k: plan[k] for k in ("phase", "label", "threshold", "size")},
               "lora": list(plan["lora"]) if plan["lora"] else None, "model_seed": plan["model_seed"],
               "wall_s": wall,
               "new_graphs": counters["stats"]["unique_graphs"] - graphs,
               "frames_compiled": len(compilation_time_metrics.get("_compile.compile_inner", [])) - frames,
               "compile_s": sum(compilation_time_metrics.get("_compile.compile_inner", [])) - compile_before,
               "recompiles": [_recompile(m) for m in messages if m.startswith("Recompiling function")],
               "limit_hits": [_limit_hit(m) for m in messages if "hit config." in m],
               "eager_layer_norms": ops,
               "eager_calls": ops / eager_ops_per_call}
        if config == "wavepass":
            stats = wavepass.stats(model)
            row.update(skipped=stats.hits, calls=stats.calls, not_cached=stats.reason)
        else:
            line = [m for m in messages if m.startswith("EasyCache - skipped")]
            skipped = re.match(r"EasyCache - skipped (\d+)/(\d+)", line[-1]) if line else None
            row.update(skipped=int(skipped.group(1)) if skipped else 0,
                       calls=int(skipped.group(2)) if skipped else STEPS, not_cached=None if line else "no EasyCache")
        runs.append(row)
        print(f"{config:8s} {index:2d} {row['label']:32s} {wall:7.2f} s  graphs +{row['new_graphs']}"
              f"  frames +{row['frames_compiled']}  compile {row['compile_s']:6.2f} s  skipped {row['skipped']}/{row['calls']}"
              f"  limit hits {len(row['limit_hits'])}  eager calls {row['eager_calls'] if row['eager_calls'] is None else round(row['eager_calls'], 2)}",
              file=sys.stderr, flush=True)
    session_s = time.perf_counter() - session_started
    shutil.rmtree(lora_folder, ignore_errors=True)
    return {"config": config, "label": LABELS[config], "vec_isa_probe_s": probe_s,
            "eager_run_s": eager_s, "eager_layer_norms_per_call": eager_ops_per_call,
            "session_s": session_s, "process_s": time.perf_counter() - started,
            "counters": {k: dict(v) for k, v in counters.items()},
            "compile_times": {k: [round(x, 4) for x in v] for k, v in compilation_time_metrics.items()
                              if k in ("_compile.compile_inner", "bytecode_tracing", "compile_attempt_0")},
            "node_executions": {n.name: n.executions for n in (cache, compile_, lora_node)},
            "runs": runs}


def count_eager_layer_norms(modules, count: list[int]) -> None:
    """Count in `count[0]` the LayerNorms of `modules` that run uncompiled from now on.

    Each LayerNorm gets a forward pre-hook that counts a call only where
    `torch.compiler.is_compiling()` is False. Dynamo inlines the hook and evaluates that to
    True while it traces, so compiled graphs hold no trace of it (no op, no graph break);
    only Python that runs eagerly (a frame Dynamo gave up on, the eager side of a graph
    break) counts. Inductor fuses every LayerNorm into its kernels, so a compiled model
    call makes none; an eager one makes the model's count."""
    import torch

    def hook(module, args):
        if not torch.compiler.is_compiling():
            count[0] += 1

    for module in modules:
        for layer in module.modules():
            if isinstance(layer, torch.nn.LayerNorm):
                layer.register_forward_pre_hook(hook)


def _probe_vec_isa() -> None:
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    pick_vec_isa()


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- the parent: both configurations, summary, table ---------------------------------------


def spawn(config: str, cache_dir: str, args) -> dict:
    command = [sys.executable, __file__, "--child", config]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    log_path = Path(tempfile.gettempdir()) / f"wavepass-session-{config}.log"
    with open(log_path, "w") as log:
        done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, check=False)
        log.write(done.stderr)
    for line in done.stderr.splitlines():  # the per-run lines
        if line.startswith(config):
            print(line, file=sys.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"{config} failed (log: {log_path}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["child_log"] = str(log_path)
    return result


def summarize(result: dict) -> dict:
    runs = result["runs"]
    quiet = [r["wall_s"] for r in runs if r["frames_compiled"] == 0 and not r["recompiles"]]
    baseline = statistics.median(quiet) if quiet else 0.0
    compiling = [r for r in runs if r["frames_compiled"]]
    reasons = Counter()
    for r in runs:
        for rc in r["recompiles"]:
            reasons[(rc["function"], rc["failures"][0] if rc["failures"] else "")] += 1
    last = runs[-1]
    summary = {
        "runs": len(runs),
        "unique_graphs": sum(r["new_graphs"] for r in runs),
        "frames_compiled": sum(r["frames_compiled"] for r in runs),
        "recompiles": sum(len(r["recompiles"]) for r in runs),
        "limit_hits": sum(len(r["limit_hits"]) for r in runs),
        "runs_that_compiled": len(compiling),
        "compile_s": sum(r["compile_s"] for r in runs),
        "excess_s": sum(max(0.0, r["wall_s"] - baseline) for r in compiling),
        "quiet_run_median_s": baseline,
        "session_s": result["session_s"],
        "runs_with_skips": sum(r["skipped"] > 0 for r in runs),
        "runs_with_cache_node": sum(r["threshold"] is not None for r in runs),
        "runs_partly_eager": sum((r["eager_calls"] or 0) > 0 for r in runs),
        "last_run": {"skipped": last["skipped"], "calls": last["calls"], "frames_compiled": last["frames_compiled"],
                     "eager_calls": last["eager_calls"], "wall_s": last["wall_s"]},
        "recompile_reasons": [{"function": f, "first_failed_guard": g, "count": n} for (f, g), n in reasons.most_common()],
        "limit_hit_functions": [h for r in runs for h in r["limit_hits"]],
        "phases": {},
    }
    for phase in PHASES:
        rows = [r for r in runs if r["phase"] == phase]
        summary["phases"][phase] = {
            "runs": len(rows), "unique_graphs": sum(r["new_graphs"] for r in rows),
            "frames_compiled": sum(r["frames_compiled"] for r in rows),
            "compile_s": sum(r["compile_s"] for r in rows),
            "runs_with_skips": sum(r["skipped"] > 0 for r in rows),
            "runs_partly_eager": sum((r["eager_calls"] or 0) > 0 for r in rows),
            "limit_hits": sum(len(r["limit_hits"]) for r in rows),
        }
    return summary


def markdown(results: dict) -> str:
    configs = [c for c in CONFIGS if c in results["configs"]]
    s = {c: results["configs"][c]["summary"] for c in configs}
    r = {c: results["configs"][c] for c in configs}
    head = "| | " + " | ".join(LABELS[c] for c in configs) + " |\n|---|" + "---:|" * len(configs) + "\n"

    def row(name, fn):
        return f"| {name} | " + " | ".join(fn(c) for c in configs) + " |\n"

    def last(c):
        x = s[c]["last_run"]
        eager = "n/a" if x["eager_calls"] is None else f"{x['eager_calls']:.1f} model calls' worth of eager LayerNorms"
        return f"skipped {x['skipped']}/{x['calls']}, {eager}, {x['wall_s']:.2f} s"

    text = (f"# A ComfyUI session: compiles and compile time (issue #19)\n\n"
            f"torch {results['torch']}, {results['machine']}, {results['date']}; "
            f"Inductor cache: {results['inductor_cache']}.\n"
            f"`{results['command']}`\n\n"
            f"Tiny ComfyUI Flux (random weights), KSampler {STEPS} steps euler/simple, "
            f"{s[configs[0]]['runs']} runs: 20 thresholds (0.05..1.0), cache node removed and "
            f"re-added, 3 LoRAs x 2 strengths, a second model, a 16x16 latent and back to 8x8. "
            f"Each configuration in a fresh process; load average before {_load(results['load_before'])}, "
            f"after {_load(results['load_after'])} (a shared 2-core machine: compile seconds move by "
            f"tens of percent between runs; the counts do not).\n\n"
            "Method: graphs and frames from Dynamo's counters (`unique_graphs`, entries of its "
            "`_compile.compile_inner` timer); recompiles and recompile-limit hits from Dynamo's "
            "`recompiles` log and its warning; compile seconds two ways: Dynamo's own timer "
            "(`_compile.compile_inner`, which misses compile work done outside it, e.g. kernel "
            "builds a first call waits for) and each compiling run's wall time minus the median "
            "run that compiled nothing (the headline); skipped steps from `wavepass.stats(model)` "
            "and EasyCache's \"skipped N/M steps\" log line; \"eager\" counts LayerNorm calls "
            "made by Python that ran uncompiled (a forward pre-hook that counts only outside "
            "Dynamo's tracing), in model calls' worth. See the docstring of `benchmarks/session.py`.\n\n")
    text += head
    text += row("Dynamo graphs compiled (`unique_graphs`)", lambda c: str(s[c]["unique_graphs"]))
    text += row("frames compiled (`_compile.compile_inner` entries)", lambda c: str(s[c]["frames_compiled"]))
    text += row("recompiles logged (`TORCH_LOGS=recompiles`)", lambda c: str(s[c]["recompiles"]))
    text += row("`hit config.recompile_limit`", lambda c: str(s[c]["limit_hits"]))
    text += row("runs that compiled", lambda c: f"{s[c]['runs_that_compiled']} of {s[c]['runs']}")
    text += row("**compile s** (wall of compiling runs minus median quiet run)", lambda c: f"**{s[c]['excess_s']:.1f}**")
    text += row("compile s inside Dynamo's timer (`_compile.compile_inner`)", lambda c: f"{s[c]['compile_s']:.1f}")
    text += row("session wall s", lambda c: f"{s[c]['session_s']:.1f}")
    text += row("vec-ISA probe s (before the session, not counted)", lambda c: f"{r[c]['vec_isa_probe_s']:.1f}")
    text += row("runs that skipped >= 1 step", lambda c: f"{s[c]['runs_with_skips']} of {s[c]['runs_with_cache_node']} with a cache node")
    text += row("runs partly uncompiled (eager LayerNorms)", lambda c: f"{s[c]['runs_partly_eager']} of {s[c]['runs']}")
    text += row("last run (8x8 again)", last)
    text += row("median run without compiling / eager run s", lambda c: f"{s[c]['quiet_run_median_s']:.3f} / {r[c]['eager_run_s']:.3f}")
    text += "\nPer phase (graphs / compile s inside Dynamo's timer / runs with skips / runs partly eager):\n\n"
    text += "| phase | runs | " + " | ".join(configs) + " |\n|---|---:|" + "---|" * len(configs) + "\n"
    for phase in PHASES:
        cells = []
        for c in configs:
            p = s[c]["phases"][phase]
            cells.append(f"{p['unique_graphs']} / {p['compile_s']:.1f} / {p['runs_with_skips']} / {p['runs_partly_eager']}")
        text += f"| {phase} | {s[configs[0]]['phases'][phase]['runs']} | " + " | ".join(cells) + " |\n"
    for c in configs:
        text += f"\n{LABELS[c]}: per run (eager: uncompiled LayerNorms, in model calls' worth):\n\n"
        text += "| # | run | graphs | frames | compile s (Dynamo) | wall s | skipped | eager | recompile limit |\n|---:|---|---:|---:|---:|---:|---:|---:|---|\n"
        for i, x in enumerate(r[c]["runs"]):
            eager = "" if x["eager_calls"] is None else f"{x['eager_calls']:.1f}"
            limits = "; ".join(h["function"] for h in x["limit_hits"])
            text += (f"| {i} | {x['label']} | {x['new_graphs']} | {x['frames_compiled']} | {x['compile_s']:.1f} | "
                     f"{x['wall_s']:.2f} | {x['skipped']}/{x['calls']} | {eager} | {limits} |\n")
        if s[c]["recompile_reasons"]:
            text += f"\nRecompiles ({c}): function, the failed guard of its newest compiled entry, count\n\n"
            for reason in s[c]["recompile_reasons"]:
                text += f"- `{reason['function']}`: `{reason['first_failed_guard'][:160]}` x{reason['count']}\n"
        for hit in s[c]["limit_hit_functions"]:
            text += f"- recompile limit ({hit['limit']}) hit by `{hit['function']}` ({hit['where']}), last reason `{hit['last_reason'][:160]}`\n"
    return text


def _load(load) -> str:
    return "/".join(f"{x:.1f}" for x in load)


def measure(args) -> dict:
    import torch

    import wavepass

    results = {"torch": torch.__version__, "wavepass": wavepass.__version__, "python": platform.python_version(),
               "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, {platform.node()}".replace("  ", " "),
               "platform": platform.platform(), "load_before": os.getloadavg(),
               "command": " ".join(["python", shlex.quote(os.path.relpath(__file__, ROOT))] + [shlex.quote(a) for a in sys.argv[1:]]),
               "inductor_cache": f"warm, {args.warm_cache}" if args.warm_cache else "a fresh empty folder per configuration",
               "steps": STEPS, "thresholds": THRESHOLDS, "tuned_threshold": TUNED, "plan": session_plan(), "configs": {}}
    for config in args.configs:
        if args.warm_cache:
            os.makedirs(args.warm_cache, exist_ok=True)
            result = spawn(config, args.warm_cache, args)
        else:
            with tempfile.TemporaryDirectory(prefix=f"wavepass-session-{config}-") as cache_dir:
                result = spawn(config, cache_dir, args)
        result["summary"] = summarize(result)
        results["configs"][config] = result
    results["load_after"] = os.getloadavg()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--warm-cache", metavar="DIR",
                        help="one TORCHINDUCTOR_CACHE_DIR kept and shared by the configurations "
                             "(default: a fresh empty one per configuration)")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--report", metavar="JSON", help="print (and --md) the table of an earlier --json result")
    parser.add_argument("--md", metavar="PATH")
    parser.add_argument("--child", metavar="CONFIG", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    if args.report:
        with open(args.report) as f:
            results = json.load(f)
    else:
        results = measure(args)
    table = markdown(results)
    print(table)
    if args.json and not args.report:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
