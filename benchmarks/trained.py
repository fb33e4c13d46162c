"""Small class-conditional FLUX models that the project trains itself on data shipped in a package.

Two are defined, each in its own package beside this file, with its data and its weights:

* `digits` -- scikit-learn's 8x8 digits: 16 image tokens, 10 classes (a classifier scores it);
* `photos` -- 32x32 crops of scikit-learn's two sample photographs: 256 image tokens, 2 classes,
  so it is compute-bound and its images have detail that a cache can lose.

Both are a `diffusers.FluxTransformer2DModel` on 2x2-packed images (the FLUX pipeline's packing:
an SxS image with C channels is (S/2)^2 tokens of 4C channels), trained by `train.py` with
rectified flow (x_s = (1 - s) x0 + s noise, target noise - x0, timestep = s as FluxPipeline
passes it). The class label conditions the model through the text stream: `LabelEncoder` turns
a label into `text_tokens` learned "prompt" tokens and a learned pooled vector. Both live in one
safetensors file (keys `transformer.*` and `labels.*`), stored in fp16 and cast back on load.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: demo.py's helpers
from demo import image_ids  # noqa: E402


@dataclass
class Split:
    images: torch.Tensor  # (n, C, S, S) in [-1, 1]
    labels: torch.Tensor  # (n,) int64


class LabelEncoder(torch.nn.Module):
    """A class label -> the text-stream inputs of FLUX: prompt tokens and a pooled vector."""

    def __init__(self, num_classes: int, text_tokens: int, text_dim: int, pooled_dim: int) -> None:
        super().__init__()
        self.text_tokens, self.text_dim = text_tokens, text_dim
        self.tokens = torch.nn.Embedding(num_classes, text_tokens * text_dim)
        self.pooled = torch.nn.Embedding(num_classes, pooled_dim)

    def forward(self, labels: torch.Tensor) -> dict:
        return dict(encoder_hidden_states=self.tokens(labels).reshape(-1, self.text_tokens, self.text_dim),
                    pooled_projections=self.pooled(labels))


@dataclass(frozen=True)
class TrainedFlux:
    """One trained model: image geometry, classes, transformer config and weights file."""

    name: str
    side: int  # image side in pixels
    channels: int  # image channels
    num_classes: int
    weights: Path
    config: dict  # FluxTransformer2DModel arguments besides in_channels and the text dims
    text_tokens: int = 4
    text_dim: int = 32
    pooled_dim: int = 32

    @property
    def grid(self) -> int:
        """Token grid side after 2x2 packing."""
        return self.side // 2

    def pack(self, images: torch.Tensor) -> torch.Tensor:
        """(n, C, S, S) -> (n, (S/2)^2, 4C): FluxPipeline's 2x2 patch packing."""
        n, c, g = images.shape[0], self.channels, self.grid
        x = images.reshape(n, c, g, 2, g, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, g * g, c * 4)

    def unpack(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n, (S/2)^2, 4C) -> (n, C, S, S), the inverse of `pack`."""
        n, c, g = tokens.shape[0], self.channels, self.grid
        x = tokens.reshape(n, g, g, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(n, c, self.side, self.side)

    def build(self, seed: int = 0) -> tuple[FluxTransformer2DModel, LabelEncoder]:
        """A freshly initialised (untrained) transformer and label encoder."""
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(in_channels=self.channels * 4, joint_attention_dim=self.text_dim,
                                             pooled_projection_dim=self.pooled_dim, **self.config)
        return transformer, LabelEncoder(self.num_classes, self.text_tokens, self.text_dim, self.pooled_dim)

    def load(self, path: Path | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        """The trained transformer and label encoder (from `self.weights`), in eval mode."""
        from safetensors.torch import load_file

        state = load_file(str(path or self.weights))
        transformer, labels = self.build()
        for prefix, module in (("transformer.", transformer), ("labels.", labels)):
            module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        return to_device(transformer, device, dtype).eval(), labels.to(device, dtype).eval()

    def position_ids(self, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
        """img_ids and txt_ids as FluxPipeline makes them for this token grid."""
        return dict(img_ids=image_ids(self.grid).to(device, dtype),
                    txt_ids=torch.zeros(self.text_tokens, 3, device=device, dtype=dtype))

    def make_condition(self, labels_module: LabelEncoder, labels: torch.Tensor, seed: int) -> dict:
        """Noise (seeded) and text-stream conditioning for a batch of labels."""
        param = next(labels_module.parameters())
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(len(labels), self.grid * self.grid, self.channels * 4, generator=gen)
        with torch.no_grad():
            cond = labels_module(labels.to(param.device))
        return dict(noise=noise.to(param.device, param.dtype), **cond,
                    **self.position_ids(param.device, param.dtype))

    def to_unit(self, latent: torch.Tensor) -> torch.Tensor:
        """Packed latent -> (n, C, S, S) float images in [0, 1]."""
        return (self.unpack(latent.float().cpu()).clamp(-1, 1) + 1) / 2


def to_device(model: torch.nn.Module, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """`model.to(device, dtype)`, casting only when the dtype changes (diffusers warns on every
    dtype cast, even to the dtype the model already has)."""
    model = model.to(device)
    return model if dtype == next(model.parameters()).dtype else model.to(dtype)


@torch.no_grad()
def sample(model, cond: dict, steps: int = 28) -> torch.Tensor:
    """FlowMatch Euler (diffusers' scheduler, shift 1) from `cond["noise"]`; returns the packed
    final latent. `model` is called as FluxPipeline calls its transformer."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(steps)
    x = cond["noise"]
    for t in scheduler.timesteps:
        v = model(hidden_states=x, encoder_hidden_states=cond["encoder_hidden_states"],
                  pooled_projections=cond["pooled_projections"],
                  timestep=(t / 1000).expand(x.shape[0]).to(x.dtype), img_ids=cond["img_ids"],
                  txt_ids=cond["txt_ids"], return_dict=False)[0]
        x = scheduler.step(v, t, x, return_dict=False)[0]
    return x
