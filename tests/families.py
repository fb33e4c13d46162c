"""Tiny real diffusers video denoisers (random weights) as `models.Case`s: LTX-Video, Wan and
HunyuanVideo, each split into the stages `ReferenceFBCache` runs (written from the diffusers
source, independently of wavepass).

All three pipelines pass the timestep in [0, 1000] (`timestep_scale` 1). Each forward is a
prologue, one loop over its blocks and an epilogue, so a family is written as those three
pieces and `_stages` makes head, rest and tail of them.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers import HunyuanVideoTransformer3DModel, LTXVideoTransformer3DModel, WanTransformer3DModel

from models import Case


def _stages(blocks: list[torch.nn.Module], prologue: Callable, step: Callable, epilogue: Callable) -> tuple:
    """head, rest and tail of a model that runs `blocks` in order between a prologue and an epilogue.

    prologue(kwargs) -> (streams, aux): the first block's inputs by stream name ("img" the video)
    step(block, streams, aux) -> streams: one block
    epilogue(img, aux) -> the model's output
    """

    def head(kw):
        streams, aux = prologue(kw)
        return streams["img"], step(blocks[0], streams, aux), aux

    def rest(first, aux):
        streams = first
        for block in blocks[1:]:
            streams = step(block, streams, aux)
        return {"img": streams["img"]}

    return head, rest, lambda final, aux: epilogue(final["img"], aux)


def _unpatchify(tokens: torch.Tensor, shape: torch.Size, patch: tuple[int, int, int],
                channels_last: bool) -> torch.Tensor:
    """(B, F/pt * H/ph * W/pw, C * pt * ph * pw) tokens -> a (B, C, F, H, W) video; within a token
    the channels come after the patch (Wan) or before it (HunyuanVideo)."""
    b, _, f, h, w = shape
    pt, ph, pw = patch
    grid = (b, f // pt, h // ph, w // pw)
    if channels_last:
        video = tokens.reshape(*grid, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    else:
        video = tokens.reshape(*grid, -1, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return video.reshape(b, -1, f, h, w)


def ltx_video(seed: int = 0, frames: int = 2, side: int = 4) -> Case:
    torch.manual_seed(seed)
    model = LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=8, cross_attention_dim=16, num_layers=3, caption_channels=16,
    ).eval()
    inputs = dict(
        hidden_states=torch.randn(1, frames * side * side, 4), encoder_hidden_states=torch.randn(1, 6, 16),
        encoder_attention_mask=torch.ones(1, 6), num_frames=frames, height=side, width=side,
    )

    def prologue(kw):
        x = kw["hidden_states"]
        batch = x.shape[0]
        rope = model.rope(x, kw["num_frames"], kw["height"], kw["width"])
        mask_bias = ((1 - kw["encoder_attention_mask"].to(x.dtype)) * -10000.0).unsqueeze(1)
        hs = model.proj_in(x)
        temb, embedded_timestep = model.time_embed(kw["timestep"].flatten(), batch_size=batch, hidden_dtype=hs.dtype)
        aux = dict(
            temb=temb.view(batch, -1, temb.shape[-1]),
            embedded_timestep=embedded_timestep.view(batch, -1, embedded_timestep.shape[-1]),
            ehs=model.caption_projection(kw["encoder_hidden_states"]).view(batch, -1, hs.shape[-1]),
            rope=rope, mask_bias=mask_bias,
        )
        return {"img": hs}, aux

    def step(block, streams, aux):
        return {"img": block(hidden_states=streams["img"], encoder_hidden_states=aux["ehs"], temb=aux["temb"],
                             image_rotary_emb=aux["rope"], encoder_attention_mask=aux["mask_bias"])}

    def epilogue(hs, aux):
        shift, scale = (model.scale_shift_table[None, None] + aux["embedded_timestep"][:, :, None]).unbind(2)
        return model.proj_out(model.norm_out(hs) * (1 + scale) + shift)

    blocks = tuple(f"transformer_blocks.{i}" for i in range(3))
    stages = _stages(list(model.transformer_blocks), prologue, step, epilogue)
    return Case(model, inputs, "hidden_states", stages, blocks, 1.0, mixed_threshold=0.08)


def wan(seed: int = 0) -> Case:
    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3, rope_max_seq_len=32,
    ).eval()
    inputs = dict(hidden_states=torch.randn(1, 4, 2, 8, 8), encoder_hidden_states=torch.randn(1, 6, 16))

    def prologue(kw):
        x = kw["hidden_states"]
        hs = model.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()
        temb, timestep_proj, ehs, _ = model.condition_embedder(kw["timestep"], kw["encoder_hidden_states"])
        aux = dict(shape=x.shape, temb=temb, timestep_proj=timestep_proj.unflatten(1, (6, -1)), ehs=ehs,
                   rope=model.rope(x))
        return {"img": hs}, aux

    def step(block, streams, aux):
        return {"img": block(streams["img"], aux["ehs"], aux["timestep_proj"], aux["rope"])}

    def epilogue(hs, aux):
        shift, scale = (model.scale_shift_table + aux["temb"].unsqueeze(1)).chunk(2, dim=1)
        hs = model.proj_out((model.norm_out(hs.float()) * (1 + scale) + shift).type_as(hs))
        return _unpatchify(hs, aux["shape"], model.config.patch_size, channels_last=True)

    blocks = tuple(f"blocks.{i}" for i in range(3))
    return Case(model, inputs, "hidden_states", _stages(list(model.blocks), prologue, step, epilogue), blocks, 1.0, mixed_threshold=0.1)


def hunyuan_video(seed: int = 0) -> Case:
    """With a right-padded prompt (the last two of six tokens masked out) and 2x2 patches, so that
    the stages' unpatchify is checked against the model's."""
    torch.manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4),
    ).eval()
    inputs = dict(
        hidden_states=torch.randn(1, 4, 2, 8, 8), encoder_hidden_states=torch.randn(1, 6, 16),
        encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]), pooled_projections=torch.randn(1, 8),
        guidance=torch.tensor([6000.0]),  # the pipeline passes guidance_scale * 1000
    )

    def prologue(kw):
        x, mask = kw["hidden_states"], kw["encoder_attention_mask"]
        temb, _ = model.time_text_embed(kw["timestep"], kw["pooled_projections"], kw["guidance"])
        hs = model.x_embedder(x)
        ehs = model.context_embedder(kw["encoder_hidden_states"], kw["timestep"], mask)
        # joint attention over [video tokens, prompt tokens] attends to no padding token
        keys = torch.cat([torch.ones(hs.shape[:2], dtype=torch.bool), mask.bool()], dim=1)
        aux = dict(shape=x.shape, temb=temb, attention_mask=keys[:, None, None, :], rope=model.rope(x))
        return {"img": hs, "txt": ehs}, aux

    def step(block, streams, aux):
        hs, ehs = block(streams["img"], streams["txt"], aux["temb"], aux["attention_mask"], aux["rope"])
        return {"img": hs, "txt": ehs}

    def epilogue(hs, aux):
        hs = model.proj_out(model.norm_out(hs, aux["temb"]))
        patch = (model.config.patch_size_t, model.config.patch_size, model.config.patch_size)
        return _unpatchify(hs, aux["shape"], patch, channels_last=False)

    blocks = ("transformer_blocks.0", "transformer_blocks.1",
              "single_transformer_blocks.0", "single_transformer_blocks.1")
    stages = _stages([*model.transformer_blocks, *model.single_transformer_blocks], prologue, step, epilogue)
    return Case(model, inputs, "hidden_states", stages, blocks, 1.0, mixed_threshold=0.28)
