"""The independent First Block Cache (`fbcache_reference.py`) over ComfyUI's own Flux and
SDXL UNet, for session tests that sample through ComfyUI's nodes.

`installed(tiny, cache)` swaps the diffusion model's inner forward (Flux's `forward_orig`,
the UNet's `_forward`) for the three eager stages below, run by `cache`; ComfyUI's own code
around it (patchify, conditioning, samplers) stays. The stages are written here from
ComfyUI's source (comfy/ldm/flux/model.py, comfy/ldm/modules/diffusionmodules/openaimodel.py),
independently of wavepass, for models without ControlNet or block patches. ComfyUI's Flux
blocks add to their inputs in place, so every stage works on copies of what it is given.
"""

from __future__ import annotations

import contextlib

import torch

from comfy.ldm.flux.layers import timestep_embedding as flux_timestep_embedding
from comfy.ldm.modules.diffusionmodules.openaimodel import forward_timestep_embed
from comfy.ldm.modules.diffusionmodules.util import timestep_embedding as unet_timestep_embedding

from fbcache_reference import ReferenceFBCache


def flux_cache(threshold: float, policy: str = "fbcache") -> ReferenceFBCache:
    """Flux's dual blocks carry `img` and `txt`; its single blocks continue cat(txt, img)."""
    return ReferenceFBCache(threshold, main="img", bases={"h": lambda f: torch.cat((f["txt"], f["img"]), 1)},
                            policy=policy)


def unet_cache(threshold: float) -> ReferenceFBCache:
    """The UNet's cached residual runs from the first input block's output to the last
    output block's (paired by shape, docs/design.md#the-unet-rule)."""
    return ReferenceFBCache(threshold, main="h")


def _flux_stages(m):
    def head(kw):
        img, txt, y, timesteps = kw["img"], kw["txt"], kw["y"], kw["timesteps"]
        img = m.img_in(img)
        vec = m.time_in(flux_timestep_embedding(timesteps, 256).to(img.dtype))
        if m.params.guidance_embed and kw["guidance"] is not None:
            vec = vec + m.guidance_in(flux_timestep_embedding(kw["guidance"], 256).to(img.dtype))
        if m.vector_in is not None:
            vec = vec + m.vector_in(y[:, :m.params.vec_in_dim])
        if m.txt_norm is not None:
            txt = m.txt_norm(txt)
        txt = m.txt_in(txt)
        pe = m.pe_embedder(torch.cat((kw["txt_ids"], kw["img_ids"]), dim=1))
        options = dict(kw["transformer_options"])
        block_input = img.clone()
        img0, txt0 = m.double_blocks[0](img=img, txt=txt, vec=vec, pe=pe, attn_mask=None,
                                        transformer_options=options)
        return block_input, {"img": img0.clone(), "txt": txt0.clone()}, (vec, pe, options, txt.shape[1])

    def rest(first, aux):
        vec, pe, options, _ = aux
        img, txt = first["img"].clone(), first["txt"].clone()
        for block in m.double_blocks[1:]:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe, attn_mask=None, transformer_options=options)
        h = torch.cat((txt, img), 1)
        for block in m.single_blocks:
            h = block(h, vec=vec, pe=pe, attn_mask=None, transformer_options=options)
        return {"h": h}

    def tail(final, aux):
        vec, _, _, txt_tokens = aux
        return m.final_layer(final["h"][:, txt_tokens:, ...], vec)

    def forward_orig(img, img_ids, txt, txt_ids, timesteps, y, guidance=None, control=None,
                     timestep_zero_index=None, transformer_options={}, attn_mask=None, *, cache):
        assert control is None and timestep_zero_index is None and attn_mask is None
        assert not m.params.global_modulation
        return cache(head, rest, tail, dict(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids,
                                            timesteps=timesteps, y=y, guidance=guidance,
                                            transformer_options=transformer_options))

    return "forward_orig", forward_orig


def _unet_stages(m):
    def embed(module, h, kw, output_shape=None):
        return forward_timestep_embed(module, h, kw["emb"], kw["context"], kw["transformer_options"], output_shape)

    def head(kw):
        x = kw["x"]
        emb = m.time_embed(unet_timestep_embedding(kw["timesteps"], m.model_channels).to(x.dtype))
        if m.num_classes is not None:
            emb = emb + m.label_emb(kw["y"])
        kw = {**kw, "emb": emb}
        h0 = embed(m.input_blocks[0], x, kw)
        h1 = embed(m.input_blocks[1], h0.clone(), kw)
        return h0, {"h": h1}, (kw, [h0, h1])

    def rest(first, aux):
        kw, hs = aux
        hs = list(hs)
        h = first["h"].clone()
        for module in m.input_blocks[2:]:
            h = embed(module, h, kw)
            hs.append(h)
        h = embed(m.middle_block, h, kw)
        for module in m.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = embed(module, h, kw, hs[-1].shape if hs else None)
        return {"h": h}

    def tail(final, aux):
        kw, _ = aux
        return m.out(final["h"].type(kw["x"].dtype))

    def _forward(x, timesteps=None, context=None, y=None, control=None, transformer_options={}, *, cache, **kwargs):
        assert control is None and not transformer_options.get("patches")
        options = dict(transformer_options)
        options["original_shape"] = list(x.shape)
        options["transformer_index"] = 0
        return cache(head, rest, tail, dict(x=x, timesteps=timesteps, context=context, y=y,
                                            transformer_options=options))

    return "_forward", _forward


STAGES = {"flux": _flux_stages, "sdxl": _unet_stages}
CACHES = {"flux": flux_cache, "sdxl": unet_cache}


@contextlib.contextmanager
def installed(name: str, diffusion_model: torch.nn.Module, cache: ReferenceFBCache):
    """Inside, `diffusion_model` runs through `cache` (reset at the start)."""
    attribute, function = STAGES[name](diffusion_model)
    cache.reset()
    diffusion_model.__dict__[attribute] = lambda *a, **k: function(*a, cache=cache, **k)
    try:
        yield cache
    finally:
        del diffusion_model.__dict__[attribute]
