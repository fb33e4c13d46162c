"""A class-conditional FLUX model of 32x32 crops of scikit-learn's two sample photographs.

The data: `sklearn.datasets.load_sample_images` (china.jpg and flower.jpg, 640x427 RGB, shipped
inside scikit-learn), each scaled down 4x by area averaging (160x106) and cut into every 32x32
crop at a stride of 2 pixels: 2470 crops a photograph, labelled 0 (china) and 1 (flower),
scaled to [-1, 1]. A crop is a roof, a leaf, petals: texture and edges at every scale.

The denoiser: `MODEL`, a `trained.TrainedFlux` (see `benchmarks/trained.py`): a 32x32 RGB crop
is 16x16 = 256 tokens of 12 channels, so attention and the MLPs dominate a step (compute-bound,
unlike the 16-token digits). Weights in `photos-flux.safetensors`, written by
`python benchmarks/train.py photos`. No classifier: quality is PSNR against the uncached sample.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from trained import Split, TrainedFlux  # noqa: E402

MODEL = TrainedFlux(
    name="photos", side=32, channels=3, num_classes=2,
    weights=Path(__file__).resolve().parent / "photos-flux.safetensors",
    config=dict(patch_size=1, num_layers=2, num_single_layers=4, attention_head_dim=16,
                num_attention_heads=6, guidance_embeds=False, axes_dims_rope=(4, 6, 6)),
)
SCALE = 4  # downscaling of the photographs before cropping
STRIDE = 2  # between neighbouring crops, in downscaled pixels
TRAINING = dict(steps=1600, batch=32, ema=0.995)  # train.py defaults



def training_set() -> Split:
    """Every crop of both photographs, in [-1, 1], labelled by photograph."""
    from sklearn.datasets import load_sample_images

    images, labels = [], []
    for label, photo in enumerate(load_sample_images().images):
        pixels = torch.tensor(photo, dtype=torch.float32).permute(2, 0, 1).unsqueeze(0) / 127.5 - 1
        small = torch.nn.functional.avg_pool2d(pixels, SCALE)
        crops = small.unfold(2, MODEL.side, STRIDE).unfold(3, MODEL.side, STRIDE)  # 1,C,h,w,S,S
        crops = crops.permute(0, 2, 3, 1, 4, 5).reshape(-1, MODEL.channels, MODEL.side, MODEL.side)
        images.append(crops)
        labels.append(torch.full((len(crops),), label))
    return Split(torch.cat(images).contiguous(), torch.cat(labels))
