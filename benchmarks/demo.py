"""wavepass demo: eager vs Inductor vs the ``wavespeed`` backend on a Flux-style denoiser.

A randomly initialised ``diffusers.FluxTransformer2DModel`` (no downloads, CPU, fp32; its
timestep embedding restricted to slow frequencies, see ``smooth_time_embedding``) samples a
16x16-token latent with a 28-step rectified-flow Euler loop. The same loop runs
under three configurations:

* eager      -- the plain module;
* inductor   -- ``torch.compile(model, backend="inductor")``;
* wavespeed  -- ``torch.compile(model, backend="wavespeed")``: First Block Cache (skip the
  remaining transformer blocks when the first block's residual barely changed since the
  previous step) plus Inductor.

For each configuration it reports the wall time of the first sampling run (which includes
compilation for the compiled ones), the median time per denoising step over repeated runs,
the speed-up over eager, how many steps the cache skipped, and how far the final latent
drifts from the eager one (max abs difference and a PSNR-like figure).

How it measures, so that its figures can be trusted on a shared machine: every configuration
runs with the same number of intra-op threads (`--threads`), and the measured runs take turns
(eager, inductor, wavespeed, eager, ...), so a burst of load elsewhere hits every
configuration alike instead of one. Where one configuration's repeats still spread by more
than `NOISE_BOUND` (their interquartile range over their median: one stray run, a page fault
or a timer tick in a 0.3 s run, does not count; a busy machine, which slows half the runs,
does), the machine was too busy for its figures: the
demo says so, prints no speed-up it cannot stand behind, and marks the JSON
(`"trustworthy": false`).

Run from the repository root:  python benchmarks/demo.py [--size tiny] [--json results.json]
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import diffusers
import torch

try:
    import wavepass
except ImportError as exc:
    sys.exit(f"demo: cannot import wavepass ({exc}); run `pip install -e .` from the repo root.")

MODEL_CONFIGS = {
    "tiny": dict(
        num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        axes_dims_rope=(2, 2, 4),
    ),
    "medium": dict(
        num_layers=4, num_single_layers=8, attention_head_dim=32, num_attention_heads=4,
        axes_dims_rope=(4, 14, 14),
    ),
}
IMAGE_SIDE = 16  # latent grid is IMAGE_SIDE x IMAGE_SIDE tokens
TEXT_TOKENS = 16
CHANNELS = 16
TEXT_DIM = 64
POOLED_DIM = 32
NOISE_BOUND = 0.25  # the most (q3 - q1) / median a configuration's repeats may spread


@dataclass
class Result:
    name: str
    first_run_s: float
    ms_per_step: float
    latent: torch.Tensor
    runs_s: list[float]  # the measured runs, in the order they ran
    spread: float  # interquartile range / median of the measured runs
    hits: str = "-"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=28, help="Euler sampling steps")
    parser.add_argument("--size", choices=sorted(MODEL_CONFIGS), default="medium")
    parser.add_argument("--threshold", type=float, default=0.12,
                        help="wavespeed residual_diff_threshold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="measured runs per configuration")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="intra-op threads of every configuration (default: torch's, "
                             f"{torch.get_num_threads()} here)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args()
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be at least 1")
    return args


def build_model(size, seed):
    torch.manual_seed(seed)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=CHANNELS, joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM, guidance_embeds=False, **MODEL_CONFIGS[size],
    )
    smooth_time_embedding(model)
    return model.eval()


@torch.no_grad()
def smooth_time_embedding(model, max_radians=10.0):
    """Let the random timestep MLP see only the slow sinusoids of the timestep.

    FLUX embeds t * 1000 in 256 sinusoids; random weights mix the fast ones in as strongly as
    the slow ones, so the modulation of every block jumps between neighbouring steps and the
    first block's residual changes by ~40% per step whatever the step size. A trained model
    varies smoothly with t. Zeroing the input weights of sinusoids that turn more than
    `max_radians` radians over the whole schedule gives a random model whose step-to-step
    change (~4% per step at 28 steps) is like a trained one's, so the cache behaves as it would.
    """
    linear = model.time_text_embed.timestep_embedder.linear_1
    half = linear.in_features // 2
    frequencies = torch.exp(-math.log(10000) * torch.arange(half) / half) * 1000
    slow = (frequencies <= max_radians).to(linear.weight.dtype)
    linear.weight.mul_(torch.cat([slow, slow]))


def image_ids(side):
    """(side*side, 3) position ids: column 1 is the row, column 2 the column."""
    prepare = getattr(diffusers.FluxPipeline, "_prepare_latent_image_ids", None)
    if prepare is not None:
        return prepare(1, side, side, torch.device("cpu"), torch.float32)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    ids = torch.zeros(side * side, 3)
    ids[:, 1], ids[:, 2] = rows.flatten(), cols.flatten()
    return ids


def make_inputs(seed):
    """Initial noise and conditioning, shared by every configuration."""
    gen = torch.Generator().manual_seed(seed)
    return dict(
        noise=torch.randn(1, IMAGE_SIDE * IMAGE_SIDE, CHANNELS, generator=gen),
        encoder_hidden_states=torch.randn(1, TEXT_TOKENS, TEXT_DIM, generator=gen),
        pooled_projections=torch.randn(1, POOLED_DIM, generator=gen),
        img_ids=image_ids(IMAGE_SIDE),
        txt_ids=torch.zeros(TEXT_TOKENS, 3),
    )


@torch.no_grad()
def sample(model, inputs, steps):
    """Rectified-flow Euler from sigma=1 to sigma=0; returns the final latent."""
    sigmas = torch.linspace(1, 0, steps + 1)
    x = inputs["noise"]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        v = model(
            hidden_states=x,
            encoder_hidden_states=inputs["encoder_hidden_states"],
            pooled_projections=inputs["pooled_projections"],
            timestep=sigma.expand(1),
            img_ids=inputs["img_ids"],
            txt_ids=inputs["txt_ids"],
            return_dict=False,
        )[0]
        x = x + (sigma_next - sigma) * v
    return x


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


@dataclass
class Config:
    """One configuration: its model, and what runs before each of its measured runs."""

    name: str
    model: object
    before_run: object = lambda: None
    first_run_s: float = 0.0


def _interquartile(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


def measure(configs, inputs, args):
    """A first run of each configuration (compiles, if compiled), then `args.repeats` rounds
    in which every configuration runs once, in turn."""
    for config in configs:
        config.first_run_s, _ = timed(lambda: sample(config.model, inputs, args.steps))
    times = {config.name: [] for config in configs}
    latents = {}
    for _ in range(args.repeats):
        for config in configs:
            config.before_run()
            seconds, latents[config.name] = timed(lambda: sample(config.model, inputs, args.steps))
            times[config.name].append(seconds)
    results = []
    for config in configs:
        median = statistics.median(times[config.name])
        spread = _interquartile(times[config.name]) / median
        results.append(Result(config.name, config.first_run_s, median / args.steps * 1e3,
                              latents[config.name], times[config.name], spread))
    return results


def wavespeed_config(model, args):
    compiled = torch.compile(
        model, backend="wavespeed", options={"residual_diff_threshold": args.threshold}
    )
    return Config("wavespeed", compiled, lambda: wavepass.reset(compiled))


def accuracy(latent, ref):
    """Max abs difference and 20*log10(max|ref| / rms diff)."""
    diff = latent - ref
    rms = diff.pow(2).mean().sqrt().item()
    psnr = math.inf if rms == 0 else 20 * math.log10(ref.abs().max().item() / rms)
    return diff.abs().max().item(), psnr


def table_rows(results):
    """One dict per configuration, against the eager baseline measured in the same run."""
    eager = results[0]
    rows = []
    for r in results:
        max_diff, psnr = accuracy(r.latent, eager.latent)
        rows.append(dict(config=r.name, compile_and_first_run_s=r.first_run_s,
                         ms_per_step=r.ms_per_step, speedup_vs_eager=eager.ms_per_step / r.ms_per_step,
                         runs_s=r.runs_s, spread=r.spread, cache_hits=r.hits, max_abs_diff=max_diff,
                         psnr_db=psnr))
    return rows


def trustworthy(rows):
    return all(row["spread"] <= NOISE_BOUND for row in rows)


def print_table(rows):
    trusted = trustworthy(rows)
    print(f"{'config':<10} {'compile+1st(s)':>14} {'ms/step':>9} {'spread':>7} {'speed-up':>8} "
          f"{'hits':>6} {'max|diff|':>9} {'PSNR(dB)':>8}")
    for row in rows:
        speedup = f"{row['speedup_vs_eager']:>7.2f}x" if trusted else f"{'-':>8}"
        print(f"{row['config']:<10} {row['compile_and_first_run_s']:>14.2f} {row['ms_per_step']:>9.2f} "
              f"{row['spread']:>6.0%} {speedup} {row['cache_hits']:>6} "
              f"{row['max_abs_diff']:>9.2e} {row['psnr_db']:>8.1f}")
    if not trusted:
        noisy = ", ".join(f"{row['config']} {row['spread']:.0%}" for row in rows if row["spread"] > NOISE_BOUND)
        print(f"WARNING: the measured runs spread by more than {NOISE_BOUND:.0%} ({noisy}): this machine "
              f"was too busy for per-step times to mean anything, so no speed-up is printed. Rerun on "
              f"a quiet machine, or with fewer threads (--threads 1), or more repeats (--repeats 9).")


def write_json(path, args, rows, decisions):
    finite_rows = [{k: None if isinstance(v, float) and math.isinf(v) else v for k, v in row.items()}
                   for row in rows]  # strict JSON has no Infinity: an exact match has PSNR null
    record = dict(torch=torch.__version__, diffusers=diffusers.__version__, device="cpu",
                  threads=torch.get_num_threads(), cores=os.cpu_count(), load_average=os.getloadavg(),
                  settings=vars(args), noise_bound=NOISE_BOUND, trustworthy=trustworthy(rows),
                  rows=finite_rows, wavespeed_decisions=decisions)
    with open(path, "w") as f:
        json.dump(record, f, indent=2, default=str)
        f.write("\n")


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)  # every configuration, eager and compiled, alike
    print(f"torch {torch.__version__} | diffusers {diffusers.__version__} | device cpu "
          f"({torch.get_num_threads()} threads of {os.cpu_count()} cores; load average "
          f"{os.getloadavg()[0]:.1f})")
    model = build_model(args.size, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Flux {args.size}: {n_params / 1e6:.2f}M params, {args.steps} steps, "
          f"{IMAGE_SIDE * IMAGE_SIDE} image + {TEXT_TOKENS} text tokens, "
          f"threshold {args.threshold}, {args.repeats} measured runs each, in turns")
    inputs = make_inputs(args.seed)

    wavespeed = wavespeed_config(model, args)
    results = measure([Config("eager", model), Config("inductor", torch.compile(model, backend="inductor")),
                       wavespeed], inputs, args)
    stats = wavepass.stats(wavespeed.model)
    results[-1].hits = f"{stats.hits}/{stats.calls}"
    decisions = "".join("X" if skipped else "." for skipped in stats.decisions)

    rows = table_rows(results)
    print_table(rows)
    print(f"wavespeed decisions (last run, X = skipped): {decisions or '(none recorded)'}")
    if args.json:
        write_json(args.json, args, rows, decisions)


if __name__ == "__main__":
    main()
