"""The independent First Block Cache (`fbcache_reference.py`) over ComfyUI's own model classes,
for tests that sample through ComfyUI's nodes. Two ways to put it on a model:

- `installed_on_blocks(name, diffusion_model, cache)`, for every transformer in
  `tests/comfy_models.py`: the blocks of the cached region are wrapped one by one. The
  roles of their arguments and results are declared below per model (`ROLES`), written from
  ComfyUI's source: which argument carries the image stream, how a block passes its streams
  on, which streams the last block hands the epilogue and what each continues. The backend
  must find all of this in the graph by itself; the reference is told.

- `installed(name, diffusion_model, cache)` swaps the diffusion model's inner forward (Flux's `forward_orig`,
the UNet's `_forward`) for the three eager stages below, run by `cache`; ComfyUI's own code
around it (patchify, conditioning, samplers) stays. The stages are written here from
ComfyUI's source (comfy/ldm/flux/model.py, comfy/ldm/modules/diffusionmodules/openaimodel.py),
  independently of wavepass, for models without ControlNet or block patches.

ComfyUI's Flux blocks add to their inputs in place, so both work on copies of what they keep.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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


@dataclass(frozen=True)
class Roles:
    """What the reference is told about one model's cached region (`args`, `kwargs`: a
    block call's arguments).

    image:   the first block's argument that carries the image stream
    first:   the first block's result -> its streams by name ("img": the image stream)
    last:    the last block's result -> the streams it hands the epilogue, by name
    rebuild: those streams -> the last block's result
    passes:  per block class, a skipped block's arguments -> its result (its streams unchanged)
    bases:   the first-block streams a final stream continues, where not the one of its name
    before:  streams computed before the first block that a base reads: name -> the module
             whose output (at the current call) it is
    """

    image: Callable[[tuple, dict], torch.Tensor]
    first: Callable[[Any], dict]
    last: Callable[[Any], dict]
    rebuild: Callable[[dict], Any]
    passes: dict[str, Callable[[tuple, dict], Any]]
    bases: dict[str, Callable[[dict], torch.Tensor]] = field(default_factory=dict)
    before: dict[str, str] = field(default_factory=dict)


def _argument(position: int, name: str) -> Callable[[tuple, dict], Any]:
    return lambda args, kwargs: args[position] if len(args) > position else kwargs[name]


def _txt_img_joined(first: dict) -> torch.Tensor:
    return torch.cat((first["txt"], first["img"]), 1)


_FLUX_LIKE = Roles(  # Flux and HunyuanVideo: dual blocks (img, txt), single blocks on cat((txt, img), 1)
    image=_argument(0, "img"),
    first=lambda result: {"img": result[0], "txt": result[1]},
    last=lambda result: {"h": result},
    rebuild=lambda streams: streams["h"],
    passes={"DoubleStreamBlock": lambda a, k: (_argument(0, "img")(a, k), _argument(1, "txt")(a, k)),
            "SingleStreamBlock": lambda a, k: _argument(0, "x")(a, k)},
    bases={"h": _txt_img_joined},
)
_ONE_STREAM = dict(first=lambda result: {"img": result}, last=lambda result: {"img": result},
                   rebuild=lambda streams: streams["img"])

ROLES: dict[str, Roles] = {
    "flux": _FLUX_LIKE,
    "hunyuan_video": _FLUX_LIKE,
    "chroma": _FLUX_LIKE,
    "chroma_radiance": _FLUX_LIKE,  # its NeRF decoder blocks over patches run after, every call
    # Lumina 2's noise refiner runs on the image; its layers on cat((caption, image), 1), the
    # caption from the context refiner, which runs before (in the prologue)
    "lumina2": Roles(image=_argument(0, "x"), first=lambda result: {"img": result},
                     last=lambda result: {"h": result}, rebuild=lambda streams: streams["h"],
                     passes={"JointTransformerBlock": _argument(0, "x")},
                     bases={"h": lambda first: torch.cat((first["cap"], first["img"]), 1)},
                     before={"cap": "context_refiner.1"}),
    # Qwen-Image's blocks return (encoder_hidden_states, hidden_states): text first
    "qwen_image": Roles(image=_argument(0, "hidden_states"),
                        first=lambda result: {"txt": result[0], "img": result[1]},
                        last=lambda result: {"img": result[1], "txt": result[0]},
                        rebuild=lambda streams: (streams["txt"], streams["img"]),
                        passes={"QwenImageTransformerBlock": lambda a, k: (_argument(1, "encoder_hidden_states")(a, k),
                                                                           _argument(0, "hidden_states")(a, k))}),
    # MMDiT joint blocks take and return (context, x); the last one returns no context
    "sd3": Roles(image=_argument(1, "x"), first=lambda result: {"txt": result[0], "img": result[1]},
                 last=lambda result: {"img": result[1]}, rebuild=lambda streams: (None, streams["img"]),
                 passes={"JointBlock": lambda a, k: (_argument(0, "context")(a, k), _argument(1, "x")(a, k))}),
    "ltxv": Roles(image=_argument(0, "x"), passes={"BasicTransformerBlock": _argument(0, "x")}, **_ONE_STREAM),
    # Wan's blocks update x with torch.addcmul(x, y, gate)
    "wan": Roles(image=_argument(0, "x"), passes={"WanAttentionBlock": _argument(0, "x")}, **_ONE_STREAM),
    # HiDream's single-stream blocks run on the image tokens joined with text tokens (the
    # model appends this block's llama tokens before it and cuts them off after it)
    "hidream": Roles(image=_argument(0, "image_tokens"),
                     passes={"HiDreamImageBlock": _argument(0, "image_tokens")}, **_ONE_STREAM),
}


@contextlib.contextmanager
def installed_on_blocks(name: str, diffusion_model: torch.nn.Module, blocks: tuple[str, ...],
                        cache: ReferenceFBCache):
    """Inside, the `blocks` of `diffusion_model` (the cached region, in call order) run
    through `cache` (reset at the start): the first block runs and decides; on a skipped call
    the blocks after it pass their streams on and the last one returns the first block's
    streams plus the stored residuals; on a computed call the residuals are kept."""
    roles = ROLES[name]
    modules = [diffusion_model.get_submodule(path) for path in blocks]
    call: dict[str, Any] = {}
    earlier: dict[str, torch.Tensor] = {}

    def keeping(stream: str):
        def hook(_module, _args, output):
            earlier[stream] = output.clone()
        return hook

    def wrapped(index: int, module: torch.nn.Module) -> Callable[..., Any]:
        forward, last = module.forward, index == len(modules) - 1

        def run(*args, **kwargs):
            if index == 0:
                image = roles.image(args, kwargs).clone()
                result = forward(*args, **kwargs)
                first = {stream: value.clone() for stream, value in roles.first(result).items()}
                first.update(earlier)
                signal = first["img"] - image
                call.update(first=first, signal=signal, skip=cache.decide(signal))
                return result
            if call["skip"]:
                if last:
                    return roles.rebuild(cache.skipped(call["first"]))
                return roles.passes[type(module).__name__](args, kwargs)
            result = forward(*args, **kwargs)
            if last:
                cache.computed(call["first"], roles.last(result), call["signal"])
            return result

        return run

    cache.bases.update(roles.bases)
    cache.reset()
    hooks = [diffusion_model.get_submodule(path).register_forward_hook(keeping(stream))
             for stream, path in roles.before.items()]
    for index, module in enumerate(modules):
        module.forward = wrapped(index, module)
    try:
        yield cache
    finally:
        for module in modules:
            del module.forward
        for hook in hooks:
            hook.remove()
