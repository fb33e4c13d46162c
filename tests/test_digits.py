"""The benchmark's trained digits model (`benchmarks/digits`): its committed weights load, its
classifier scores real digits, its samples show the conditioned class, and wavespeed keeps that.

The sampling tests run ten images (one per class) as one batch of 28 FlowMatch Euler steps on one
CPU thread; wavespeed runs with `compiler="eager"` (the same cached program, no Inductor) to stay
fast. ACCURACY_MARGIN is the documented loss of classifier accuracy allowed to the cache.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel

import wavepass

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import digits  # noqa: E402
import trained  # noqa: E402

pytest.importorskip("sklearn", reason="the digits data set and classifier need scikit-learn")

THRESHOLD = 0.12
ACCURACY_MARGIN = 0.1  # cached samples may score at most this much below the uncached ones (1 of 10)
MIN_UNCACHED_ACCURACY = 0.8  # chance is 0.1; the committed model scores 1.0 on this batch


@pytest.fixture(scope="module")
def one_thread():
    """One thread: two-thread OpenMP crawls when another process holds a core."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def data():
    return digits.load_splits()


@pytest.fixture(scope="module")
def classifier(data):
    return digits.fit_classifier(data[0])


@pytest.fixture(scope="module")
def model():
    return digits.MODEL.load()


@pytest.fixture(scope="module")
def batch(model):
    """Noise and conditioning for one image of each class."""
    return digits.MODEL.make_condition(model[1], torch.arange(10), seed=123)


@pytest.fixture(scope="module")
def uncached_accuracy(one_thread, model, batch, classifier):
    return accuracy(classifier, trained.sample(model[0], batch))


def accuracy(classifier, latent):
    predicted = digits.classify(classifier, digits.to_pixels(latent))
    return (predicted == torch.arange(10)).float().mean().item()


def test_committed_weights_load():
    assert digits.MODEL.weights.stat().st_size < 5e6
    transformer, labels = digits.MODEL.load()  # load_state_dict is strict: every key matches
    assert isinstance(transformer, FluxTransformer2DModel)
    assert not transformer.training
    assert torch.isfinite(torch.cat([p.flatten() for p in transformer.parameters()])).all()
    assert labels.tokens.weight.shape == (digits.MODEL.num_classes, digits.MODEL.text_tokens * digits.MODEL.text_dim)


def test_classifier_scores_held_out_digits(data, classifier):
    train, held_out = data
    assert len(held_out.labels) == 300 and len(train.labels) == 1497
    predicted = digits.classify(classifier, (held_out.images.squeeze(1) + 1) * 8)
    assert (predicted == held_out.labels).float().mean() >= 0.97


def test_pack_roundtrip(data):
    images = data[1].images[:3]
    assert torch.equal(digits.MODEL.unpack(digits.MODEL.pack(images)), images)


def test_uncached_samples_show_their_class(uncached_accuracy):
    assert uncached_accuracy >= MIN_UNCACHED_ACCURACY


def test_wavespeed_skips_and_keeps_accuracy(one_thread, model, batch, classifier, uncached_accuracy):
    compiled = torch.compile(model[0], backend="wavespeed",
                             options={"residual_diff_threshold": THRESHOLD, "compiler": "eager"})
    wavepass.reset(compiled)
    cached = accuracy(classifier, trained.sample(compiled, batch))
    stats = wavepass.stats(compiled)
    assert stats.calls == 28 and stats.hits >= 5
    assert cached >= uncached_accuracy - ACCURACY_MARGIN
