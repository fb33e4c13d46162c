"""Smoke test of the `wavespeed` backend on ComfyUI's own FLUX model class (CPU, tiny, random).

The model is built through ComfyUI's machinery (`comfy.supported_models.Flux` ->
`model_base.Flux` -> `comfy.ldm.flux.model.Flux`, wrapped in a `ModelPatcher`) from a tiny
config. ComfyUI's Flux blocks update their streams in place (`img += ...`), which the diffusers
models of the other tests do not. Needs `python scripts/fetch_comfyui.py` (skipped otherwise).
"""

from __future__ import annotations

import pytest
import torch

import comfy_support

comfy_support.require()

import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.supported_models  # noqa: E402

import wavepass  # noqa: E402
from wavepass.runtime import programs_of  # noqa: E402

DEPTH, DEPTH_SINGLE = 2, 2
BLOCKS = tuple(f"double_blocks.{i}" for i in range(DEPTH)) + tuple(
    f"single_blocks.{i}" for i in range(DEPTH_SINGLE)
)

TINY_FLUX = {
    "image_model": "flux",
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": 2,
    "vec_in_dim": 8,
    "context_in_dim": 8,
    "hidden_size": 32,
    "mlp_ratio": 4.0,
    "num_heads": 2,
    "depth": DEPTH,
    "depth_single_blocks": DEPTH_SINGLE,
    "axes_dim": [4, 6, 6],  # sums to the head dim, 32 / 2
    "theta": 10000,
    "qkv_bias": True,
    "guidance_embed": False,
    "txt_ids_dims": [],
}


@pytest.fixture(scope="module")
def patcher():
    config = comfy.supported_models.Flux(TINY_FLUX)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    torch.manual_seed(0)
    with torch.no_grad():
        # ComfyUI's default ops skip weight init (weights come from a checkpoint): fill them.
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    model.eval()
    load_device = comfy.model_management.get_torch_device()
    assert load_device.type == "cpu"
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=torch.device("cpu"))


@pytest.fixture
def diffusion_model(patcher):
    return patcher.model.diffusion_model


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(1, 16, 8, 8, generator=g),
        "timestep": torch.tensor([0.7]),
        "context": torch.randn(1, 5, 8, generator=g),
        "y": torch.randn(1, 8, generator=g),
    }


def call(model, kw):
    # fresh copies: the model must not depend on (or change) the caller's tensors
    return model(**{k: v.clone() for k, v in kw.items()}, transformer_options={})


def test_model_is_comfyui_flux(diffusion_model):
    import comfy.ldm.flux.model

    assert type(diffusion_model) is comfy.ldm.flux.model.Flux
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in diffusion_model.parameters())
    out = call(diffusion_model, inputs())
    assert out.shape == (1, 16, 8, 8) and torch.isfinite(out).all()


def compile_eager(model, threshold):
    return torch.compile(
        model, backend="wavespeed",
        options={"residual_diff_threshold": threshold, "compiler": "eager"},
    )


def test_threshold_zero_equals_eager(diffusion_model, no_fallback):
    kw = inputs()
    ref = call(diffusion_model, kw)
    out = call(compile_eager(diffusion_model, 0.0), kw)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    programs = programs_of(diffusion_model)
    assert len(programs) == 1  # cached (no_fallback: no plain compile)
    assert programs[0].blocks[:DEPTH] == BLOCKS[:DEPTH]
    assert wavepass.stats(diffusion_model).decisions == (False,)


def test_cached_region_spans_double_and_single_blocks(diffusion_model, no_fallback):
    call(compile_eager(diffusion_model, 0.0), inputs())
    programs = programs_of(diffusion_model)
    assert len(programs) == 1
    assert programs[0].blocks == BLOCKS


def test_second_identical_call_is_skipped(diffusion_model, no_fallback):
    kw = inputs()
    ref = call(diffusion_model, kw)
    compiled = compile_eager(diffusion_model, 10.0)
    first = call(compiled, kw)
    second = call(compiled, kw)
    assert wavepass.stats(diffusion_model).decisions == (False, True)
    torch.testing.assert_close(first, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, ref, atol=1e-5, rtol=1e-5)
