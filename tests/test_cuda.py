"""The `wavespeed` backend on a CUDA GPU: Triton kernels, and CUDA graphs with
mode="reduce-overhead". Skipped where torch sees no GPU (CI has none); run on a GPU machine
with `python -m pytest tests/test_cuda.py`.

Every cached run is compared with `ReferenceFBCache` over the eager model on the same GPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import FluxTransformer2DModel
from torch._inductor import list_mode_options
from torch._inductor.output_code import CompiledFxGraph

import models
import wavepass
from fbcache_reference import ReferenceFBCache
from wavepass.runtime import programs_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICE = "cuda"
STEPS = 10
CASES = ["flux", "sd3", "sdxl_unet"]


def on_cuda(case: models.Case, dtype: torch.dtype = torch.float32) -> models.Case:
    """The case with its model (moved in place) and inputs on the GPU, floats in `dtype`."""
    def moved(value):
        if isinstance(value, dict):
            return {k: moved(v) for k, v in value.items()}
        return value.to(DEVICE, dtype if value.is_floating_point() else value.dtype)

    case.model.to(DEVICE, dtype)
    return dataclasses.replace(case, inputs=moved(case.inputs))


def sample(case: models.Case, call) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`models.sample` with the timestep on the GPU. Each output is copied: under CUDA graphs
    the next replay overwrites it (as for plain Inductor's reduce-overhead)."""
    return models.sample(case, lambda x, t: call(x, t.to(DEVICE)).clone(), STEPS)


def compiled(case: models.Case, threshold: float, mode: str | None = None):
    """The case's model through the backend, with Inductor's `mode` (its config patches)."""
    model = torch.compile(case.model, backend="wavespeed",
                          options={"residual_diff_threshold": threshold, "inductor": list_mode_options(mode) if mode else {}})
    return lambda x, t: model(**case.call_kwargs(x, t))[0]


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("name", CASES)
def test_sampling_matches_reference(name, mode, no_fallback):
    case = on_cuda(getattr(models, name)())
    cache = ReferenceFBCache(case.mixed_threshold)
    latent, outputs = sample(case, compiled(case, case.mixed_threshold, mode))
    ref_latent, ref_outputs = sample(case, lambda x, t: case.reference_call(cache, x, t))
    assert wavepass.stats(case.model).decisions == tuple(cache.decisions)
    assert 0 < sum(cache.decisions) < STEPS, "the test needs both skipped and computed steps"
    for out, ref in zip(outputs, ref_outputs):
        torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(latent, ref_latent, atol=1e-3, rtol=1e-3)


def test_block_graphs_run_bare_and_equal_plain_inductor(no_fallback):
    case = on_cuda(models.flux())
    plain_latent, _ = sample(case, lambda x, t: torch.compile(case.model)(**case.call_kwargs(x, t))[0])
    latent, _ = sample(case, compiled(case, 0.0))
    torch.testing.assert_close(latent, plain_latent, atol=1e-4, rtol=1e-4)
    (program,) = programs_of(case.model)
    runs = [s.run for piece in (program._head, program._rest) for s in piece.structures]
    assert runs and all(isinstance(run, CompiledFxGraph) for run in runs)


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_bfloat16_stays_close_to_eager(mode, no_fallback):
    case = on_cuda(models.flux(), torch.bfloat16)
    eager_latent, _ = sample(case, lambda x, t: case.model(**case.call_kwargs(x, t))[0])
    latent, _ = sample(case, compiled(case, 0.0, mode))
    error = torch.linalg.vector_norm((latent - eager_latent).float()) / torch.linalg.vector_norm(eager_latent.float())
    assert error < 2e-2


def test_cuda_graph_generations_hold_no_more_memory(no_fallback):
    """A generation under CUDA graphs keeps copies of the signal and residuals, which
    replace the last generation's: the memory held after the fifth generation is the
    memory held after the second."""
    case = on_cuda(models.flux())
    call = compiled(case, case.mixed_threshold, "reduce-overhead")
    held = []
    for _ in range(5):
        wavepass.reset(case.model)
        sample(case, call)
        torch.cuda.synchronize()
        held.append(torch.cuda.memory_allocated())
    assert held[-1] == held[1], held


def test_cuda_graphs_read_the_weights_where_they_are(no_fallback):
    """Under CUDA graphs the weights are static inputs of every piece, read where they lie:
    recording takes far less memory than a copy of them (CUDA graph trees copy every input
    not known to be static into the graph's memory, and again at every replay). A FLUX of
    width 2048 (1.7 GB of weights, far more than cuBLAS's workspaces) on the tiny case's
    inputs."""
    case = on_cuda(models.flux())
    torch.manual_seed(0)
    with torch.device(DEVICE):
        wide = FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=64,
            num_attention_heads=32, joint_attention_dim=16, pooled_projection_dim=8,
            guidance_embeds=False, axes_dims_rope=(8, 28, 28),
        ).eval()
    weights = sum(p.numel() * p.element_size() for p in wide.parameters())
    call = compiled(dataclasses.replace(case, model=wide), 0.0, "reduce-overhead")
    before = torch.cuda.memory_allocated()
    for t in (0.9, 0.8, 0.7):  # warm-up, recording, replay
        call(case.inputs["hidden_states"], torch.tensor([t], device=DEVICE))
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - before
    assert grown < weights / 4, (grown, weights)
