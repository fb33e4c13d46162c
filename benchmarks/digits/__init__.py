"""A small class-conditional FLUX model of scikit-learn's digits, and a classifier to score it.

The data: `sklearn.datasets.load_digits` (1797 8x8 grey images, values 0..16), scaled to
[-1, 1] and split once (stratified, seed 0) into 1497 training and 300 held-out images.

The denoiser: a `diffusers.FluxTransformer2DModel` on 2x2-packed images (the FLUX pipeline's
packing: an 8x8 one-channel image is 4x4 = 16 tokens of 4 channels), trained with rectified
flow (x_t = (1 - s) x0 + s noise, target noise - x0, timestep = s as FluxPipeline passes it).
The class label conditions it through the text stream: `LabelEncoder` turns a label into
`TEXT_TOKENS` learned "prompt" tokens and a learned pooled vector. Both live in one
safetensors file (`WEIGHTS`, keys `transformer.*` and `labels.*`), written by `train.py`.

The classifier: an RBF support vector machine fitted on the training split (deterministic,
under a second, so it is refitted instead of stored); it scores the held-out split and the
generated images, so sample quality is a number that no cache can game.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: demo.py's helpers
from demo import image_ids  # noqa: E402

WEIGHTS = Path(__file__).resolve().parent / "digits-flux.safetensors"
SIDE = 8  # image side in pixels
GRID = SIDE // 2  # token grid side after 2x2 packing
TEXT_TOKENS = 4
TEXT_DIM = 32
POOLED_DIM = 32
NUM_CLASSES = 10
MODEL_CONFIG = dict(
    patch_size=1, in_channels=4, num_layers=2, num_single_layers=4, attention_head_dim=16,
    num_attention_heads=4, joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM,
    guidance_embeds=False, axes_dims_rope=(4, 6, 6),
)


@dataclass
class Split:
    images: torch.Tensor  # (n, 1, 8, 8) in [-1, 1]
    labels: torch.Tensor  # (n,) int64


def load_splits() -> tuple[Split, Split]:
    """The digits data set as (train, held-out), fixed by seed 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.images, data.target, test_size=300, stratify=data.target, random_state=0)

    def split(x, y):
        return Split(torch.tensor(x, dtype=torch.float32).unsqueeze(1) / 8 - 1, torch.tensor(y))

    return split(x_train, y_train), split(x_test, y_test)


def pack(images: torch.Tensor) -> torch.Tensor:
    """(n, 1, 8, 8) -> (n, 16, 4): FluxPipeline's 2x2 patch packing."""
    n, c = images.shape[:2]
    x = images.reshape(n, c, GRID, 2, GRID, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, GRID * GRID, c * 4)


def unpack(tokens: torch.Tensor) -> torch.Tensor:
    """(n, 16, 4) -> (n, 1, 8, 8), the inverse of `pack`."""
    n = tokens.shape[0]
    x = tokens.reshape(n, GRID, GRID, 1, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, 1, SIDE, SIDE)


class LabelEncoder(torch.nn.Module):
    """A class label -> the text-stream inputs of FLUX: prompt tokens and a pooled vector."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = torch.nn.Embedding(NUM_CLASSES, TEXT_TOKENS * TEXT_DIM)
        self.pooled = torch.nn.Embedding(NUM_CLASSES, POOLED_DIM)

    def forward(self, labels: torch.Tensor) -> dict:
        return dict(encoder_hidden_states=self.tokens(labels).reshape(-1, TEXT_TOKENS, TEXT_DIM),
                    pooled_projections=self.pooled(labels))


def build(seed: int = 0) -> tuple[FluxTransformer2DModel, LabelEncoder]:
    """A freshly initialised (untrained) transformer and label encoder."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**MODEL_CONFIG), LabelEncoder()


def load(path: Path = WEIGHTS, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The trained transformer and label encoder from `path`, in eval mode."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    transformer, labels = build()
    for prefix, module in (("transformer.", transformer), ("labels.", labels)):
        module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return to_device(transformer, device, dtype).eval(), labels.to(device, dtype).eval()


def to_device(model: torch.nn.Module, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """`model.to(device, dtype)`, casting only when the dtype changes (diffusers warns on every
    dtype cast, even to the dtype the model already has)."""
    model = model.to(device)
    return model if dtype == next(model.parameters()).dtype else model.to(dtype)


def position_ids(device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """img_ids and txt_ids as FluxPipeline makes them for a 4x4 token grid."""
    return dict(img_ids=image_ids(GRID).to(device, dtype), txt_ids=torch.zeros(TEXT_TOKENS, 3, device=device, dtype=dtype))


def make_condition(labels_module: LabelEncoder, labels: torch.Tensor, seed: int) -> dict:
    """Noise (seeded) and text-stream conditioning for a batch of labels."""
    param = next(labels_module.parameters())
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(labels), GRID * GRID, 4, generator=gen).to(param.device, param.dtype)
    with torch.no_grad():
        cond = labels_module(labels.to(param.device))
    return dict(noise=noise, **cond, **position_ids(param.device, param.dtype))


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


def to_pixels(latent: torch.Tensor) -> torch.Tensor:
    """Packed latent -> (n, 8, 8) float images in the data set's 0..16 scale."""
    return ((unpack(latent.float().cpu()).squeeze(1).clamp(-1, 1) + 1) * 8)


def fit_classifier(train: Split):
    """An RBF SVM on the training split's 0..16 pixels (about 99% on held-out digits)."""
    from sklearn.svm import SVC

    pixels = ((train.images.squeeze(1) + 1) * 8).reshape(len(train.labels), -1).numpy()
    return SVC(gamma=0.001, C=10.0).fit(pixels, train.labels.numpy())


def classify(classifier, pixels: torch.Tensor) -> torch.Tensor:
    """Predicted labels for (n, 8, 8) images in 0..16."""
    return torch.tensor(classifier.predict(pixels.reshape(len(pixels), -1).numpy()))
