"""Shared test set-up: a persistent Inductor cache and a clean Dynamo per test.

Inductor compiles C++ on the CPU, which is slow; its on-disk cache in a fixed temp folder
lets every test (and every later run) reuse what an earlier one compiled. Dynamo's in-memory
caches are cleared before each test so that one test's compiled frames, recompile counts
and guards never leak into another's.
"""

import os
import tempfile
import warnings

os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "wavepass-test-inductor-cache")
)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch._dynamo  # noqa: E402

import wavepass  # noqa: E402
from wavepass import torch_api  # noqa: E402
from wavepass import notices  # noqa: E402


@pytest.fixture(autouse=True)
def clean_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    notices._warned.clear()
    wavepass.reset()
    with torch.no_grad():
        yield
    torch._dynamo.reset()


@pytest.fixture
def no_fallback():
    """Fail the test if the backend falls back to plain compilation."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="wavespeed:.*")
        yield

@pytest.fixture
def without(monkeypatch):
    """`without(*names)`: the APIs `names` (of `torch_api.APIS`) look missing from now on,
    and every feature is asked again (the answer is kept per process)."""

    def switch_off(*names: str) -> None:
        paths = {path for name in names for path in torch_api.APIS[name]}
        lookup = torch_api._lookup

        def missing(path: str):
            if path in paths:
                raise ImportError(f"cannot import name {path.rpartition('.')[2]!r} (simulated)")
            return lookup(path)

        monkeypatch.setattr(torch_api, "_lookup", missing)
        monkeypatch.setattr(torch_api, "_off_reasons", {})

    return switch_off
