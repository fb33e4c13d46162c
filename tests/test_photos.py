"""The benchmark's second trained model (`benchmarks/photos`, 256 image tokens): its committed
weights load, and on its trained trajectories the cache policies do what they promise.

One image per class as one batch of 28 FlowMatch Euler steps on one CPU thread; wavespeed runs
with `compiler="eager"` (the same cached program, no Inductor) to stay fast. PSNR is of the final
latents against the uncached ones (`benchmarks/demo.py`'s `accuracy`, the benchmarks' measure).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import wavepass

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
pytest.importorskip("sklearn", reason="the photos data set ships in scikit-learn")
import demo  # noqa: E402
import photos  # noqa: E402
import trained  # noqa: E402

MODEL = photos.MODEL


@pytest.fixture(scope="module")
def model():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # two-thread OpenMP crawls when another process holds a core
    yield MODEL.load()
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def batch(model):
    return MODEL.make_condition(model[1], torch.arange(MODEL.num_classes), seed=1000)


@pytest.fixture(scope="module")
def uncached(model, batch):
    return trained.sample(model[0], batch)


@pytest.fixture(scope="module")
def cached(model, batch):
    """policy, threshold -> (final latent, skipped calls), on one compiled model."""
    compiled = torch.compile(model[0], backend="wavespeed", options={"compiler": "eager"})

    def run(policy: str, threshold: float):
        wavepass.reset(compiled)
        with wavepass.cache_settings(residual_diff_threshold=threshold, policy=policy):
            latent = trained.sample(compiled, batch)
        stats = wavepass.stats(compiled)
        assert stats.reason is None and stats.calls == 28, stats
        return latent, stats.decisions

    return run


def psnr(latent, reference) -> float:
    return demo.accuracy(latent, reference)[1]


def test_committed_weights_load():
    assert MODEL.weights.stat().st_size < 5e6
    transformer, labels = MODEL.load()  # load_state_dict is strict: every key matches
    assert transformer.config.in_channels == 12 and not transformer.training
    assert torch.isfinite(torch.cat([p.flatten() for p in transformer.parameters()])).all()
    assert labels.tokens.weight.shape == (2, MODEL.text_tokens * MODEL.text_dim)


def test_training_crops_pack_to_256_tokens():
    crops = photos.training_set()
    assert crops.images.shape == (4940, 3, 32, 32) and crops.labels.bincount().tolist() == [2470, 2470]
    packed = MODEL.pack(crops.images[:3])
    assert packed.shape == (3, 256, 12) and torch.equal(MODEL.unpack(packed), crops.images[:3])


def test_taylor_skips_the_same_steps_closer_to_the_uncached_result(cached, uncached):
    plain, plain_decisions = cached("fbcache", 0.12)
    taylor, taylor_decisions = cached("taylor", 0.12)
    assert taylor_decisions == plain_decisions and sum(plain_decisions) >= 5
    assert psnr(taylor, uncached) > psnr(plain, uncached) + 2


def test_predictive_skips_more_steps_at_higher_quality(cached, uncached):
    """What makes it the better policy on trained weights: at a lower threshold it skips more
    steps than First Block Cache does at 0.16 (14 against 12 when written), and ends closer to
    the uncached result (44.5 against 38.4 dB)."""
    plain, plain_decisions = cached("fbcache", 0.16)
    predictive, predictive_decisions = cached("predictive", 0.1)
    assert sum(predictive_decisions) > sum(plain_decisions)
    assert psnr(predictive, uncached) > psnr(plain, uncached) + 2
