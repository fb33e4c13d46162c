"""Tiny real diffusers denoisers (random weights) as `models.Case`s: the video models LTX-Video,
Wan and HunyuanVideo, and the 2025-2026 models Qwen-Image, Chroma, Lumina 2, FLUX.2, Sana,
CogView4 and HunyuanVideo 1.5, each split into the stages `ReferenceFBCache` runs (written from
the diffusers source, independently of wavepass).

The video pipelines pass the timestep in [0, 1000] (`timestep_scale` 1). Each forward is a
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


DUAL_THEN_SINGLE = ("transformer_blocks.0", "transformer_blocks.1",
                    "single_transformer_blocks.0", "single_transformer_blocks.1")


def _joined_stages(model, prologue: Callable, step: Callable, epilogue: Callable) -> tuple:
    """head, rest and tail of a model whose dual blocks end by joining cat(text, image), which
    its single blocks run on: rest hands on the image part of the joined stream, which
    continues the first block's image output (`aux["text"]`: the text length)."""
    head, rest, tail = _stages([*model.transformer_blocks, *model.single_transformer_blocks], prologue, step, epilogue)

    def image_of_rest(first, aux):
        return {"img": rest(first, aux)["img"][:, aux["text"]:]}

    return head, image_of_rest, tail


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


# --- models of 2025-2026 ----------------------------------------------------------------------
# The Qwen-Image, Chroma, FLUX.2 and Lumina 2 pipelines pass the timestep as t / 1000
# (`timestep_scale` 1e-3; Lumina 2's passes 1 - t / 1000, which a random-weight model does not
# care about); Sana, CogView4 and HunyuanVideo 1.5 pass t.


def qwen_image(seed: int = 0, side: int = 4) -> Case:
    """Qwen-Image (and Qwen-Image-Edit's class): dual-stream blocks that return (text, image);
    the epilogue reads the image only. Right-padded prompt (the last two of six tokens masked)."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4),
    ).eval()
    inputs = dict(
        hidden_states=torch.randn(1, side * side, 4), encoder_hidden_states=torch.randn(1, 6, 16),
        encoder_hidden_states_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]), img_shapes=[[(1, side, side)]],
    )

    def prologue(kw):
        hs = model.img_in(kw["hidden_states"])
        ehs = model.txt_in(model.txt_norm(kw["encoder_hidden_states"]))
        mask = kw["encoder_hidden_states_mask"].bool()
        temb = model.time_text_embed(kw["timestep"].to(hs.dtype), hs)
        rope = model.pos_embed(kw["img_shapes"], max_txt_seq_len=ehs.shape[1], device=hs.device)
        return {"img": hs, "txt": ehs}, dict(temb=temb, mask=mask, rope=rope)

    def step(block, streams, aux):
        ehs, hs = block(hidden_states=streams["img"], encoder_hidden_states=streams["txt"],
                        encoder_hidden_states_mask=aux["mask"], temb=aux["temb"], image_rotary_emb=aux["rope"])
        return {"img": hs, "txt": ehs}

    def epilogue(hs, aux):
        return model.proj_out(model.norm_out(hs, aux["temb"]))

    blocks = tuple(f"transformer_blocks.{i}" for i in range(3))
    stages = _stages(list(model.transformer_blocks), prologue, step, epilogue)
    return Case(model, inputs, "hidden_states", stages, blocks, 1e-3, mixed_threshold=0.2)


def chroma(seed: int = 0, side: int = 4) -> Case:
    """Chroma: FLUX's two stacks, modulation sliced per block from one approximator output
    (computed in the prologue); the single blocks run on cat((text, image)), the epilogue slices
    the image back out."""
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(seed)
    model = ChromaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4),
        approximator_num_channels=16, approximator_hidden_dim=16, approximator_layers=1,
    ).eval()
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    inputs = dict(
        hidden_states=torch.randn(1, side * side, 4), encoder_hidden_states=torch.randn(1, 6, 16),
        img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(6, 3),
    )
    doubles, singles = len(model.transformer_blocks), len(model.single_transformer_blocks)

    def prologue(kw):
        hs = model.x_embedder(kw["hidden_states"])
        pooled = model.distilled_guidance_layer(model.time_text_embed(kw["timestep"].to(hs.dtype) * 1000))
        ehs = model.context_embedder(kw["encoder_hidden_states"])
        rope = model.pos_embed(torch.cat((kw["txt_ids"], kw["img_ids"]), dim=0))
        return {"img": hs, "txt": ehs}, dict(pooled=pooled, rope=rope, text=ehs.shape[1])

    def step(block, streams, aux):
        pooled = aux["pooled"]
        if isinstance(block, type(model.transformer_blocks[0])):
            index = list(model.transformer_blocks).index(block)
            img_mod = 3 * singles + 6 * index
            txt_mod = 3 * singles + 6 * doubles + 6 * index
            temb = torch.cat((pooled[:, img_mod:img_mod + 6], pooled[:, txt_mod:txt_mod + 6]), dim=1)
            ehs, hs = block(hidden_states=streams["img"], encoder_hidden_states=streams["txt"], temb=temb,
                            image_rotary_emb=aux["rope"])
            if index < doubles - 1:
                return {"img": hs, "txt": ehs}
            return {"img": torch.cat([ehs, hs], dim=1)}  # the joined stream the single blocks run on
        index = list(model.single_transformer_blocks).index(block)
        return {"img": block(hidden_states=streams["img"], temb=pooled[:, 3 * index:3 * index + 3],
                             image_rotary_emb=aux["rope"])}

    def epilogue(hs, aux):
        return model.proj_out(model.norm_out(hs, aux["pooled"][:, -2:]))

    return Case(model, inputs, "hidden_states", _joined_stages(model, prologue, step, epilogue), DUAL_THEN_SINGLE,
                1e-3, mixed_threshold=0.8)


def lumina2(seed: int = 0) -> Case:
    """Lumina 2: a context refiner (caption only, unmodulated) and a noise refiner (image only)
    run before the main layers, which run on the caption and the image joined into one
    sequence; the epilogue reads the image part. Right-padded prompt: the padding is dropped
    from the join. The rotary embedding reads the caption lengths with `.tolist()`, a graph
    break: the backend caches `layers` at the module level (the split path) and the refiners,
    in the prologue, run every step; the first block's residual is the joined sequence's."""
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(seed)
    model = Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=16, num_layers=3, num_refiner_layers=2,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(2, 2, 4), cap_feat_dim=16,
    ).eval()
    inputs = dict(hidden_states=torch.randn(1, 4, 8, 8), encoder_hidden_states=torch.randn(1, 6, 16),
                  encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]))

    def prologue(kw):
        x, mask = kw["hidden_states"], kw["encoder_attention_mask"]
        temb, ehs = model.time_caption_embed(x, kw["timestep"], kw["encoder_hidden_states"])
        patches, context_rope, noise_rope, rope, (caption,), (length,) = model.rope_embedder(x, mask)
        hs = model.x_embedder(patches)
        for layer in model.context_refiner:
            ehs = layer(ehs, mask, context_rope)
        for layer in model.noise_refiner:
            hs = layer(hs, None, noise_rope, temb)
        joint = torch.cat([ehs[:, :caption], hs], dim=1)  # one prompt: no padding, no mask
        return {"img": joint}, dict(shape=x.shape, temb=temb, rope=rope, caption=caption, length=length)

    def step(block, streams, aux):
        return {"img": block(streams["img"], None, aux["rope"], aux["temb"])}

    def epilogue(hs, aux):
        hs = model.norm_out(hs, aux["temb"])
        _, _, h, w = aux["shape"]
        p = model.config.patch_size
        hs = hs[0][aux["caption"]:aux["length"]].view(h // p, w // p, p, p, model.out_channels)
        return hs.permute(4, 0, 2, 1, 3).flatten(3, 4).flatten(1, 2)[None]

    blocks = tuple(f"layers.{i}" for i in range(3))
    return Case(model, inputs, "hidden_states", _stages(list(model.layers), prologue, step, epilogue), blocks, 1e-3,
                mixed_threshold=0.15)


def flux2(seed: int = 0, side: int = 4) -> Case:
    """FLUX.2: FLUX's two stacks with the modulation computed once, in the prologue, for all
    blocks of a stack; the single blocks run on cat((text, image)), the epilogue slices the
    image back out. Four-axis positions (t, h, w, l)."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=16,
        axes_dims_rope=(2, 2, 2, 2), guidance_embeds=False,
    ).eval()
    img_ids = torch.zeros(side, side, 4)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    txt_ids = torch.zeros(6, 4)
    txt_ids[:, 3] = torch.arange(6)
    inputs = dict(hidden_states=torch.randn(1, side * side, 4), encoder_hidden_states=torch.randn(1, 6, 16),
                  img_ids=img_ids.reshape(-1, 4), txt_ids=txt_ids)

    def prologue(kw):
        x = kw["hidden_states"]
        temb = model.time_guidance_embed(kw["timestep"].to(x.dtype) * 1000, None)
        img_rope, txt_rope = model.pos_embed(kw["img_ids"]), model.pos_embed(kw["txt_ids"])
        aux = dict(
            temb=temb, mod_img=model.double_stream_modulation_img(temb),
            mod_txt=model.double_stream_modulation_txt(temb), mod_single=model.single_stream_modulation(temb),
            rope=tuple(torch.cat([t, i], dim=0) for t, i in zip(txt_rope, img_rope)),
            text=kw["encoder_hidden_states"].shape[1],
        )
        return {"img": model.x_embedder(x), "txt": model.context_embedder(kw["encoder_hidden_states"])}, aux

    def step(block, streams, aux):
        if any(block is double for double in model.transformer_blocks):
            ehs, hs = block(hidden_states=streams["img"], encoder_hidden_states=streams["txt"],
                            temb_mod_img=aux["mod_img"], temb_mod_txt=aux["mod_txt"], image_rotary_emb=aux["rope"])
            if block is not model.transformer_blocks[-1]:
                return {"img": hs, "txt": ehs}
            return {"img": torch.cat([ehs, hs], dim=1)}  # the joined stream the single blocks run on
        return {"img": block(hidden_states=streams["img"], encoder_hidden_states=None,
                             temb_mod=aux["mod_single"], image_rotary_emb=aux["rope"])}

    def epilogue(hs, aux):
        return model.proj_out(model.norm_out(hs, aux["temb"]))

    # the random-weight residual changes by more than its size from step to step: 1.1 skips 4 of 10
    return Case(model, inputs, "hidden_states", _joined_stages(model, prologue, step, epilogue), DUAL_THEN_SINGLE,
                1e-3, mixed_threshold=1.1)


def sana(seed: int = 0, size: int = 8) -> Case:
    """Sana: one stack of single-stream blocks (linear self-attention, cross-attention to the
    caption, a convolutional feed-forward over the 2-D token grid); the pipeline passes the
    timestep in [0, 1000]. Right-padded prompt (the last two of six tokens masked)."""
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(seed)
    model = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=3,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=size, patch_size=2,
    ).eval()
    inputs = dict(hidden_states=torch.randn(1, 4, size, size), encoder_hidden_states=torch.randn(1, 6, 16),
                  encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]))

    def prologue(kw):
        x = kw["hidden_states"]
        batch, _, height, width = x.shape
        mask_bias = ((1 - kw["encoder_attention_mask"].to(x.dtype)) * -10000.0).unsqueeze(1)
        hs = model.patch_embed(x)
        temb, embedded_timestep = model.time_embed(kw["timestep"], batch_size=batch, hidden_dtype=hs.dtype)
        ehs = model.caption_projection(kw["encoder_hidden_states"]).view(batch, -1, hs.shape[-1])
        p = model.config.patch_size
        aux = dict(temb=temb, embedded_timestep=embedded_timestep, ehs=model.caption_norm(ehs), mask_bias=mask_bias,
                   grid=(height // p, width // p), batch=batch)
        return {"img": hs}, aux

    def step(block, streams, aux):
        return {"img": block(streams["img"], None, aux["ehs"], aux["mask_bias"], aux["temb"], *aux["grid"])}

    def epilogue(hs, aux):
        hs = model.proj_out(model.norm_out(hs, aux["embedded_timestep"], model.scale_shift_table))
        p, (h, w) = model.config.patch_size, aux["grid"]
        hs = hs.reshape(aux["batch"], h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4)
        return hs.reshape(aux["batch"], -1, h * p, w * p)

    blocks = tuple(f"transformer_blocks.{i}" for i in range(3))
    stages = _stages(list(model.transformer_blocks), prologue, step, epilogue)
    return Case(model, inputs, "hidden_states", stages, blocks, 1.0, mixed_threshold=0.04)


def cogview4(seed: int = 0, size: int = 8) -> Case:
    """CogView4: dual-stream blocks that return (image, text), the opposite order of Qwen-Image's;
    SDXL-like size conditions; the pipeline passes the timestep in [0, 1000]."""
    from diffusers import CogView4Transformer2DModel

    torch.manual_seed(seed)
    model = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=16, time_embed_dim=16, condition_dim=8, pos_embed_max_size=16, sample_size=size,
        rope_axes_dim=(16, 16),
    ).eval()
    sizes = torch.tensor([[size * 8.0, size * 8.0]])
    inputs = dict(hidden_states=torch.randn(1, 4, size, size), encoder_hidden_states=torch.randn(1, 6, 16),
                  original_size=sizes, target_size=sizes, crop_coords=torch.zeros(1, 2))

    def prologue(kw):
        x = kw["hidden_states"]
        rope = model.rope(x)
        hs, ehs = model.patch_embed(x, kw["encoder_hidden_states"])
        temb = model.time_condition_embed(kw["timestep"], kw["original_size"], kw["target_size"], kw["crop_coords"],
                                          hs.dtype)
        return {"img": hs, "txt": ehs}, dict(shape=x.shape, temb=torch.nn.functional.silu(temb), rope=rope)

    def step(block, streams, aux):
        hs, ehs = block(streams["img"], streams["txt"], aux["temb"], aux["rope"], None, None)
        return {"img": hs, "txt": ehs}

    def epilogue(hs, aux):
        hs = model.proj_out(model.norm_out(hs, aux["temb"]))
        b, _, h, w = aux["shape"]
        p = model.config.patch_size
        hs = hs.reshape(b, h // p, w // p, -1, p, p)
        return hs.permute(0, 3, 1, 4, 2, 5).flatten(4, 5).flatten(2, 3)

    blocks = tuple(f"transformer_blocks.{i}" for i in range(3))
    stages = _stages(list(model.transformer_blocks), prologue, step, epilogue)
    return Case(model, inputs, "hidden_states", stages, blocks, 1.0, mixed_threshold=0.2)


def hunyuan_video15(seed: int = 0) -> Case:
    """HunyuanVideo 1.5: three conditions (the refined prompt, byT5 glyph tokens, image embeddings,
    here zeros: text-to-video) sorted valid-first into one context by boolean masks in the prologue
    (data-dependent), then dual-stream blocks returning (video, context)."""
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(seed)
    model = HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=3,
        num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8,
        rope_axes_dim=(2, 2, 4), task_type="t2v",
    ).eval()
    inputs = dict(
        hidden_states=torch.randn(1, 4, 2, 4, 4), encoder_hidden_states=torch.randn(1, 6, 16),
        encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]), encoder_hidden_states_2=torch.randn(1, 4, 8),
        encoder_attention_mask_2=torch.tensor([[1, 1, 1, 0]]), image_embeds=torch.zeros(1, 3, 8),
    )

    def prologue(kw):
        x, t = kw["hidden_states"], kw["timestep"]
        rope, temb = model.rope(x), model.time_embed(t, timestep_r=None)
        hs = model.x_embedder(x)
        text = model.context_embedder(kw["encoder_hidden_states"], t, kw["encoder_attention_mask"])
        text = text + model.cond_type_embed(torch.zeros_like(text[:, :, 0], dtype=torch.long))
        glyphs = model.context_embedder_2(kw["encoder_hidden_states_2"])
        glyphs = glyphs + model.cond_type_embed(torch.ones_like(glyphs[:, :, 0], dtype=torch.long))
        image = model.image_embedder(kw["image_embeds"]) * 0.0  # text-to-video: image embeddings all zero
        image_mask = torch.zeros(image.shape[:2], dtype=torch.bool)
        image = image + model.cond_type_embed(2 * torch.ones_like(image[:, :, 0], dtype=torch.long))
        text_mask, glyph_mask = kw["encoder_attention_mask"].bool(), kw["encoder_attention_mask_2"].bool()
        context, mask = [], []
        # per sample: the valid image, byT5 and prompt tokens, then the invalid ones (zeroed but the image's)
        for i in range(hs.shape[0]):
            kept = [(image[i], image_mask[i]), (glyphs[i], glyph_mask[i]), (text[i], text_mask[i])]
            dropped = [(image[i], ~image_mask[i]), (glyphs[i], ~glyph_mask[i]), (text[i], ~text_mask[i])]
            context.append(torch.cat([v[m] for v, m in kept] + [v[m] if k == 0 else torch.zeros_like(v[m])
                                                               for k, (v, m) in enumerate(dropped)], dim=0))
            mask.append(torch.cat([m[m] for _, m in kept] + [(~m)[m] for _, m in dropped], dim=0))
        aux = dict(shape=x.shape, temb=temb, mask=torch.stack(mask), rope=rope)
        return {"img": hs, "txt": torch.stack(context)}, aux

    def step(block, streams, aux):
        hs, ehs = block(streams["img"], streams["txt"], aux["temb"], aux["mask"], aux["rope"])
        return {"img": hs, "txt": ehs}

    def epilogue(hs, aux):
        hs = model.proj_out(model.norm_out(hs, aux["temb"]))
        return _unpatchify(hs, aux["shape"], (1, 1, 1), channels_last=True)

    blocks = tuple(f"transformer_blocks.{i}" for i in range(3))
    stages = _stages(list(model.transformer_blocks), prologue, step, epilogue)
    return Case(model, inputs, "hidden_states", stages, blocks, 1.0, mixed_threshold=0.32)
