"""A mixture-of-experts denoiser whose block stack Dynamo cannot keep in one graph.

Each block is a dual-stream transformer block (image and text tokens, joint attention,
adaLN modulation from the timestep) whose image feed-forward is a mixture of experts routed
top-k per token, written the way HiDream and most MoE code route: a boolean mask per expert
(`x[mask]`), a data-dependent shape, so every block has a graph break ("Dynamic shape
operator"). Random weights; `steps(...)` gives a flow-matching sampling loop's inputs.

    model = moe.MoEDenoiser(moe.Config())
    for t in moe.timesteps(28): img = model(img, txt, t) ...

Used by `benchmarks/graph_breaks.py` and `tests/test_split_stacks.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Config:
    width: int = 32
    heads: int = 2
    depth: int = 4
    experts: int = 4
    top_k: int = 2
    in_channels: int = 8
    text_width: int = 16


class Experts(nn.Module):
    """Top-k routed SwiGLU experts plus a shared expert."""

    def __init__(self, width: int, experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(width, experts, bias=False)
        self.experts = nn.ModuleList(_mlp(width) for _ in range(experts))
        self.shared = _mlp(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, chosen = torch.topk(self.gate(flat).softmax(-1), self.top_k, dim=-1)
        routed = flat.repeat_interleave(self.top_k, dim=0)
        chosen = chosen.reshape(-1)
        y = torch.zeros_like(routed)
        for i, expert in enumerate(self.experts):
            mask = chosen == i
            y[mask] = expert(routed[mask])  # data-dependent shape: a graph break
        y = (y.view(-1, self.top_k, shape[-1]) * weights.unsqueeze(-1)).sum(1)
        return y.view(shape) + self.shared(x)


class DualBlock(nn.Module):
    """(img, txt, temb) -> (img, txt): joint attention, then a feed-forward per stream."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        w = config.width
        self.heads = config.heads
        self.modulation = nn.Linear(w, 6 * w)
        self.norm_img, self.norm_txt = nn.LayerNorm(w, elementwise_affine=False), nn.LayerNorm(w, elementwise_affine=False)
        self.qkv_img, self.qkv_txt = nn.Linear(w, 3 * w), nn.Linear(w, 3 * w)
        self.out_img, self.out_txt = nn.Linear(w, w), nn.Linear(w, w)
        self.ff_img = Experts(w, config.experts, config.top_k)
        self.ff_txt = _mlp(w)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, scale, gate, ff_shift, ff_scale, ff_gate = self.modulation(temb)[:, None].chunk(6, dim=-1)
        n_txt = txt.shape[1]
        joint = torch.cat([self.qkv_txt(self.norm_txt(txt)), self.qkv_img(self.norm_img(img) * (1 + scale) + shift)], 1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in joint.chunk(3, dim=-1))
        attn = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        txt = txt + self.out_txt(attn[:, :n_txt])
        img = img + gate * self.out_img(attn[:, n_txt:])
        img = img + ff_gate * self.ff_img(self.norm_img(img) * (1 + ff_scale) + ff_shift)
        txt = txt + self.ff_txt(self.norm_txt(txt))
        return img, txt


class MoEDenoiser(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        w = config.width
        self.config = config
        self.img_in = nn.Linear(config.in_channels, w)
        self.txt_in = nn.Linear(config.text_width, w)
        self.time_in = nn.Sequential(nn.Linear(64, w), nn.SiLU(), nn.Linear(w, w))
        self.blocks = nn.ModuleList(DualBlock(config) for _ in range(config.depth))
        self.norm_out = nn.LayerNorm(w)
        self.proj_out = nn.Linear(w, config.in_channels)

    def forward(self, latent: torch.Tensor, text: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        temb = self.time_in(_sinusoids(timestep, 64))
        img, txt = self.img_in(latent), self.txt_in(text)
        for block in self.blocks:
            img, txt = block(img, txt, temb)
        return self.proj_out(self.norm_out(img))


def _mlp(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(approximate="tanh"), nn.Linear(2 * width, width))


def _sinusoids(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoids of t / 1000 at 1 to 10 radians per unit: slow enough that, with random
    weights, the first block's output changes between steps about as a trained model's does."""
    freqs = torch.exp(math.log(10.0) * torch.arange(dim // 2, dtype=torch.float32, device=t.device) / (dim // 2))
    angles = t.float()[:, None] / 1000.0 * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], -1)


def build(config: Config = Config(), seed: int = 0) -> MoEDenoiser:
    torch.manual_seed(seed)
    return MoEDenoiser(config).eval()


def inputs(config: Config, tokens: int = 16, text_tokens: int = 8, batch: int = 1, seed: int = 0):
    """(noise latent, text) of one generation."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, tokens, config.in_channels, generator=generator)
    text = torch.randn(batch, text_tokens, config.text_width, generator=generator)
    return latent, text


def timesteps(steps: int) -> list[float]:
    """Flow-matching timesteps from 1 down to 1/steps."""
    return [1.0 - i / steps for i in range(steps)]


@torch.no_grad()
def sample(model, latent: torch.Tensor, text: torch.Tensor, steps: int) -> torch.Tensor:
    """Euler sampling of the flow `model` predicts, from noise `latent`."""
    x = latent
    for t in timesteps(steps):
        velocity = model(x, text, torch.full((x.shape[0],), t * 1000.0))
        x = x - velocity / steps
    return x
