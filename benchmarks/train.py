"""Train one of the benchmark's FLUX models (rectified flow, class-conditional) and write its weights.

    python benchmarks/train.py digits    # regenerates benchmarks/digits/digits-flux.safetensors
    python benchmarks/train.py photos    # regenerates benchmarks/photos/photos-flux.safetensors

The models and their data are described in `benchmarks/trained.py`. Seeds are fixed (model init, batches, noise, timesteps) and training runs on one CPU thread
(`--threads`), so a rerun with the same torch build gives the same weights (two 30-step runs
wrote identical files; the full run was not repeated). One thread also keeps the speed steady
on a shared CPU: 4000 steps take about 11 minutes on an idle core (0.16 s/step), and took
40 minutes for the committed weights, on a CPU shared with other jobs. The saved
weights are an exponential moving average of the trained ones, stored in fp16 (the file stays
small; `digits.load` casts back to fp32).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/
import digits  # noqa: E402
import photos  # noqa: E402

DATASETS = {"digits": digits, "photos": photos}  # each has MODEL and training_set()


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", choices=sorted(DATASETS))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the model's TRAINING)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the model's TRAINING)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=None, help="EMA decay of the saved weights (default: TRAINING)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="default: the model's weights file")
    args = parser.parse_args()
    dataset = DATASETS[args.model]
    for name, default in (*dataset.TRAINING.items(), ("out", dataset.MODEL.weights)):
        if getattr(args, name) is None:  # not given: the model's own (--ema 0 is a value)
            setattr(args, name, default)
    return args, dataset


def flow_loss(model, transformer, labels_module, images, labels, gen):
    """Rectified-flow loss: predict noise - x0 at x_s = (1 - s) x0 + s noise, s ~ U(0, 1)."""
    x0 = model.pack(images)
    noise = torch.randn(x0.shape, generator=gen)
    s = torch.rand(len(x0), generator=gen)
    xs = (1 - s[:, None, None]) * x0 + s[:, None, None] * noise
    v = transformer(hidden_states=xs, timestep=s, **labels_module(labels), **model.position_ids(),
                    return_dict=False)[0]
    return torch.nn.functional.mse_loss(v, noise - x0)


def learning_rate(step, total, peak, warmup=200):
    """Linear warm-up, then cosine decay to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@torch.no_grad()
def update_ema(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def save(path, transformer, labels_module):
    from safetensors.torch import save_file

    state = {f"transformer.{k}": v for k, v in transformer.state_dict().items()}
    state.update({f"labels.{k}": v for k, v in labels_module.state_dict().items()})
    save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()}, str(path))


def main():
    args, dataset = parse_args()
    torch.set_num_threads(args.threads)
    train, model = dataset.training_set(), dataset.MODEL
    transformer, labels_module = model.build(args.seed)
    modules = torch.nn.ModuleList([transformer, labels_module]).train()
    ema = copy.deepcopy(modules).eval()
    optimizer = torch.optim.AdamW(modules.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    n_params = sum(p.numel() for p in modules.parameters())
    print(f"{model.name} FLUX: {n_params / 1e6:.2f}M params, {len(train.labels)} training images, "
          f"{args.steps} steps of {args.batch}", flush=True)
    start = time.perf_counter()
    for step in range(args.steps):
        index = torch.randint(len(train.labels), (args.batch,), generator=gen)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        loss = flow_loss(model, transformer, labels_module, train.images[index], train.labels[index], gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        optimizer.step()
        update_ema(ema, modules, args.ema if step >= 500 else 0.0)
        if step % 250 == 0 or step == args.steps - 1:
            print(f"step {step:5d} loss {loss.item():.4f} {time.perf_counter() - start:7.1f}s", flush=True)
    save(args.out, *ema)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) after "
          f"{time.perf_counter() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
