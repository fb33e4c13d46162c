"""A small class-conditional FLUX model of scikit-learn's digits, and a classifier to score it.

The data: `sklearn.datasets.load_digits` (1797 8x8 grey images, values 0..16), scaled to
[-1, 1] and split once (stratified, seed 0) into 1497 training and 300 held-out images.

The denoiser: `MODEL`, a `trained.TrainedFlux` (see `benchmarks/trained.py`): an 8x8 one-channel
image is 4x4 = 16 tokens of 4 channels; the class label is the "prompt". Weights in
`digits-flux.safetensors`, written by `python benchmarks/train.py digits`.

The classifier: an RBF support vector machine fitted on the training split (deterministic,
under a second, so it is refitted instead of stored); it scores the held-out split and the
generated images, so sample quality is a number that no cache can game.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from trained import Split, TrainedFlux  # noqa: E402

MODEL = TrainedFlux(
    name="digits", side=8, channels=1, num_classes=10,
    weights=Path(__file__).resolve().parent / "digits-flux.safetensors",
    config=dict(patch_size=1, num_layers=2, num_single_layers=4, attention_head_dim=16,
                num_attention_heads=4, guidance_embeds=False, axes_dims_rope=(4, 6, 6)),
)
TRAINING = dict(steps=4000, batch=128, ema=0.999)  # train.py defaults



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


def training_set() -> Split:
    """What `train.py` trains on."""
    return load_splits()[0]


def to_pixels(latent: torch.Tensor) -> torch.Tensor:
    """Packed latent -> (n, 8, 8) float images in the data set's 0..16 scale."""
    return MODEL.to_unit(latent).squeeze(1) * 16


def fit_classifier(train: Split):
    """An RBF SVM on the training split's 0..16 pixels (about 99% on held-out digits)."""
    from sklearn.svm import SVC

    pixels = ((train.images.squeeze(1) + 1) * 8).reshape(len(train.labels), -1).numpy()
    return SVC(gamma=0.001, C=10.0).fit(pixels, train.labels.numpy())


def classify(classifier, pixels: torch.Tensor) -> torch.Tensor:
    """Predicted labels for (n, 8, 8) images in 0..16."""
    return torch.tensor(classifier.predict(pixels.reshape(len(pixels), -1).numpy()))
