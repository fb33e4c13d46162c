"""Tiny real diffusers denoisers (random weights) and their stages for the reference cache.

Each `Case` holds a model built from its diffusers class, inputs for one call, how a
sampling step changes them, and the model's forward split into the three stages that
`ReferenceFBCache` runs (written here from the diffusers source, independently of wavepass).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)


@dataclass
class Case:
    model: torch.nn.Module
    inputs: dict  # keyword arguments of one call; `latent_key` is the sampled latent
    latent_key: str
    stages: tuple[Callable, Callable, Callable]  # head, rest, tail
    blocks: tuple[str, ...]  # module paths of the blocks the backend must find
    timestep_scale: float  # diffusers pipelines pass t / 1000 to Flux and t to SD3
    # skips some but not all of 10 steps (random weights), each measured change >= 2.5% away from it
    mixed_threshold: float = 0.25

    def call_kwargs(self, latent: torch.Tensor, t: torch.Tensor) -> dict:
        return {**self.inputs, self.latent_key: latent, "timestep": t, "return_dict": False}

    def reference_call(self, cache, latent: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        kwargs = self.call_kwargs(latent, t)
        kwargs.pop("return_dict")
        return cache(*self.stages, kwargs)


def flux(seed: int = 0, tokens: int = 16) -> Case:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
        guidance_embeds=False, axes_dims_rope=(2, 2, 4),
    ).eval()
    side = int(tokens**0.5)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    inputs = dict(
        hidden_states=torch.randn(1, tokens, 4), encoder_hidden_states=torch.randn(1, 6, 16),
        pooled_projections=torch.randn(1, 8), img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(6, 3),
    )

    def head(kw):
        hs = model.x_embedder(kw["hidden_states"])
        temb = model.time_text_embed(kw["timestep"].to(hs.dtype) * 1000, kw["pooled_projections"])
        ehs = model.context_embedder(kw["encoder_hidden_states"])
        rope = model.pos_embed(torch.cat((kw["txt_ids"], kw["img_ids"]), dim=0))
        ehs1, hs1 = model.transformer_blocks[0](
            hidden_states=hs, encoder_hidden_states=ehs, temb=temb, image_rotary_emb=rope)
        controlnet = (kw.get("controlnet_block_samples"), kw.get("controlnet_single_block_samples"))
        return hs, {"img": hs1, "txt": ehs1}, (temb, rope, controlnet)

    def rest(first, aux):
        """The remaining blocks; ControlNet residuals (added after every block, the first one's
        included) belong here: a skipped step reuses them from the last computed step."""
        temb, rope, controlnet = aux
        hs, ehs = first["img"], first["txt"]
        stacks = (model.transformer_blocks, model.single_transformer_blocks)
        for stack, samples in zip(stacks, controlnet):
            for index, block in enumerate(stack):
                if block is not model.transformer_blocks[0]:
                    ehs, hs = block(hidden_states=hs, encoder_hidden_states=ehs, temb=temb, image_rotary_emb=rope)
                if samples is not None:
                    hs = hs + samples[index // math.ceil(len(stack) / len(samples))]
        return {"img": hs}

    def tail(final, aux):
        return model.proj_out(model.norm_out(final["img"], aux[0]))

    blocks = ("transformer_blocks.0", "transformer_blocks.1",
              "single_transformer_blocks.0", "single_transformer_blocks.1")
    return Case(model, inputs, "hidden_states", (head, rest, tail), blocks, 1e-3)


def sd3(seed: int = 0, size: int = 8) -> Case:
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=size, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16,
    ).eval()
    inputs = dict(
        hidden_states=torch.randn(1, 4, size, size), encoder_hidden_states=torch.randn(1, 6, 16),
        pooled_projections=torch.randn(1, 8),
    )

    def head(kw):
        height, width = kw["hidden_states"].shape[-2:]
        hs = model.pos_embed(kw["hidden_states"]).contiguous()
        temb = model.time_text_embed(kw["timestep"], kw["pooled_projections"])
        ehs = model.context_embedder(kw["encoder_hidden_states"])
        ehs1, hs1 = model.transformer_blocks[0](hidden_states=hs, encoder_hidden_states=ehs, temb=temb)
        return hs, {"img": hs1, "txt": ehs1}, (temb, height, width)

    def rest(first, aux):
        hs, ehs = first["img"], first["txt"]
        for block in model.transformer_blocks[1:]:
            ehs, hs = block(hidden_states=hs, encoder_hidden_states=ehs, temb=aux[0])
        return {"img": hs}

    def tail(final, aux):
        temb, height, width = aux
        hs = model.proj_out(model.norm_out(final["img"], temb))
        p, c = model.config.patch_size, model.out_channels
        hs = hs.reshape(hs.shape[0], height // p, width // p, p, p, c)
        hs = torch.einsum("nhwpqc->nchpwq", hs)
        return hs.reshape(hs.shape[0], c, height, width)

    blocks = tuple(f"transformer_blocks.{i}" for i in range(3))
    return Case(model, inputs, "hidden_states", (head, rest, tail), blocks, 1.0)


def tiny_sdxl_unet(size: int = 8) -> UNet2DConditionModel:
    """SDXL's UNet architecture at toy size: text_time added conditioning (8-dim text embeds, six
    time ids), cross-attention (16-dim context) in the lower down and up blocks."""
    return UNet2DConditionModel(
        sample_size=size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, transformer_layers_per_block=1,
        addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=8 + 6 * 4,
    ).eval()


def sdxl_unet(seed: int = 0, size: int = 8) -> Case:
    """An SDXL-shaped UNet (text_time added conditioning, cross-attention down/up blocks).

    The cache rule for UNets: the first block is down_blocks[0]; the residual spans from its
    last full-resolution output to the output of the up path; conv_norm_out/conv_out always run.
    """
    torch.manual_seed(seed)
    model = tiny_sdxl_unet(size)
    inputs = dict(
        sample=torch.randn(1, 4, size, size), encoder_hidden_states=torch.randn(1, 6, 16),
        added_cond_kwargs={"text_embeds": torch.randn(1, 8), "time_ids": torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)},
    )

    def head(kw):
        sample, ehs = kw["sample"], kw["encoder_hidden_states"]
        emb = model.time_embedding(model.get_time_embed(sample=sample, timestep=kw["timestep"]), None)
        emb = emb + model.get_aug_embed(emb=emb, encoder_hidden_states=ehs, added_cond_kwargs=kw["added_cond_kwargs"])
        h = model.conv_in(sample)
        first = model.down_blocks[0]
        down, res = first(hidden_states=h, temb=emb)
        last_full_resolution = res[len(first.resnets) - 1]
        return h, {"img": last_full_resolution}, (emb, ehs, down, (h, *res))

    def rest(first, aux):
        emb, ehs, sample, skips = aux
        for block in model.down_blocks[1:]:
            sample, res = block(hidden_states=sample, temb=emb, **cross_attention(block, ehs))
            skips += res
        sample = model.mid_block(sample, emb, encoder_hidden_states=ehs)
        for block in model.up_blocks:
            skips, res = skips[: -len(block.resnets)], skips[-len(block.resnets):]
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res,
                           **cross_attention(block, ehs))
        return {"img": sample}

    def tail(final, aux):
        return model.conv_out(model.conv_act(model.conv_norm_out(final["img"])))

    def cross_attention(block, ehs):
        return {"encoder_hidden_states": ehs} if getattr(block, "has_cross_attention", False) else {}

    blocks = ("down_blocks.0", "down_blocks.1", "down_blocks.2", "up_blocks.0", "up_blocks.1", "up_blocks.2")
    return Case(model, inputs, "sample", (head, rest, tail), blocks, 1.0, mixed_threshold=0.09)


def sample(case: Case, call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
           steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Rectified-flow sampling with diffusers' FlowMatch Euler scheduler from the case's latent;
    `call(latent, timestep)` is the denoiser. Returns the final latent and every model output."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(steps)
    latent = case.inputs[case.latent_key]
    outputs = []
    for t in scheduler.timesteps:
        out = call(latent, (t * case.timestep_scale).reshape(1))
        outputs.append(out)
        latent = scheduler.step(out, t, latent, return_dict=False)[0]
    return latent, outputs
