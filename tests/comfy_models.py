"""Tiny ComfyUI denoisers with random weights, built the way ComfyUI builds them, for tests.

Each model is made through ComfyUI's own machinery: a `comfy.supported_models` config class
(`Flux`, `SD3`, `SDXL`, `LTXV`, `HunyuanVideo`, `WAN21_T2V`) -> `get_model` -> its
`model_base` class (which creates the `diffusion_model`), wrapped in a `ModelPatcher` on the
CPU, in float32. ComfyUI's default ops skip weight initialisation (weights normally come from
a checkpoint), so `build()` fills every parameter: matrices and convolutions with
N(0, 1/fan_in), norm scales with 1 + N(0, 0.1^2), other vectors (biases) with N(0, 0.1^2),
which keeps activations finite and of order one through every block. It then lets the
timestep MLPs see only the slow timestep sinusoids (`smooth_time_embedding_`), so that the
first block's output changes from step to step about as a trained model's does.

    import comfy_models
    tiny = comfy_models.build("flux")             # a TinyModel
    nodes.common_ksampler(tiny.patcher, 0, 8, tiny.cfg, "euler", "simple",
                          tiny.positive, tiny.negative, tiny.latent())

Conditioning is in ComfyUI's format, `[[cond, {"pooled_output": pooled, ...}]]`, with the
context (and pooled) widths each tiny config expects; video models get 2 latent frames.
An 8-step KSampler run takes about 0.05-0.3 s per model on one CPU thread.
Call `comfy_support.load()` (or `require()`) before importing this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.supported_models

TOKENS = 6  # text tokens of the conditioning


@dataclass(frozen=True)
class Spec:
    """How to build one tiny model and what it is sampled with."""

    config_class: str  # name in comfy.supported_models
    unet_config: dict
    latent_shape: tuple[int, ...]
    context_dim: int
    pooled_dim: int | None = None  # None: no pooled_output in the conditioning
    extra_cond: dict = field(default_factory=dict)  # more keys of the conditioning dict
    cached_blocks: tuple[str, ...] = ()  # the blocks the backend caches (its region)
    cfg: float = 2.0  # 1.0 for guidance-distilled models (FLUX.1-dev, HunyuanVideo)
    random_buffers: tuple[str, ...] = ()  # buffers ComfyUI leaves uninitialised (torch.empty)
    # Linear layers that read the timestep sinusoids: a path (all its inputs are), or
    # (path, width): its first `width` inputs are
    time_embedders: tuple[str | tuple[str, int], ...] = ()


def _blocks(stack: str, count: int) -> tuple[str, ...]:
    return tuple(f"{stack}.{i}" for i in range(count))


SDXL_POOLED = 16
SDXL_SIZE_EMBEDDINGS = 6 * 256  # model_base.SDXL.encode_adm appends six 256-wide embeddings

CHROMA = {
    "image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 8,
    "hidden_size": 32, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
    "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2, "qkv_bias": True, "txt_ids_dims": [],
    "vec_in_dim": None,
    # the distilled guidance approximator (a stack of its own, nested in a prologue module):
    # 16 timestep + 16 guidance + 32 modulation-index sinusoids in, one modulation vector out
    "in_dim": 64, "out_dim": 32, "hidden_dim": 32, "n_layers": 2,
}

SPECS: dict[str, Spec] = {
    "flux": Spec(
        "Flux",
        {
            "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2,
            "vec_in_dim": 8, "context_in_dim": 8, "hidden_size": 32, "mlp_ratio": 4.0,
            "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [4, 6, 6],
            "theta": 10000, "qkv_bias": True, "guidance_embed": True, "txt_ids_dims": [],
        },
        latent_shape=(1, 16, 8, 8), context_dim=8, pooled_dim=8, extra_cond={"guidance": 3.5},
        cached_blocks=_blocks("double_blocks", 2) + _blocks("single_blocks", 2), cfg=1.0,
        time_embedders=("time_in.in_layer",),
    ),
    "sd3": Spec(
        "SD3",
        {
            "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2,  # width 64 * depth
            "input_size": None, "adm_in_channels": 16, "pos_embed_max_size": 8, "num_patches": 64,
            "context_embedder_config": {
                "target": "torch.nn.Linear", "params": {"in_features": 16, "out_features": 128},
            },
            "qk_norm": "rms", "x_block_self_attn_layers": [],
        },
        latent_shape=(1, 16, 8, 8), context_dim=16, pooled_dim=16, cached_blocks=_blocks("joint_blocks", 2),
        random_buffers=("pos_embed",), time_embedders=("t_embedder.mlp.0",),
    ),
    "sdxl": Spec(
        "SDXL",
        {
            "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
            "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
            "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1],
            "transformer_depth_middle": 1, "use_spatial_transformer": True, "legacy": False,
            "num_classes": "sequential", "adm_in_channels": SDXL_POOLED + SDXL_SIZE_EMBEDDINGS,
            "use_linear_in_transformer": True, "context_dim": 16, "dtype": torch.float32,
            "use_temporal_attention": False, "use_temporal_resblock": False,
        },
        latent_shape=(1, 4, 8, 8), context_dim=16, pooled_dim=SDXL_POOLED,
        extra_cond={"width": 64, "height": 64},
        # ComfyUI's UNetModel runs the layers of each TimestepEmbedSequential itself
        # (forward_timestep_embed), so only `input_blocks.N.i` calls are on the module stacks;
        # they still make the block `input_blocks.N`. input_blocks.0 (the input conv, a plain
        # layer) runs in the prologue; the region runs through the middle block and up path.
        cached_blocks=tuple(f"input_blocks.{i}" for i in range(1, 4)) + _blocks("middle_block", 3)
        + _blocks("output_blocks", 4),
        time_embedders=("time_embed.0",),
    ),
    "ltxv": Spec(
        "LTXV",
        {
            "image_model": "ltxv", "in_channels": 128, "num_layers": 3, "attention_head_dim": 16,
            "num_attention_heads": 2, "cross_attention_dim": 32, "caption_channels": 16,
        },
        latent_shape=(1, 128, 2, 4, 4), context_dim=16,  # LTXV latents have 128 channels
        extra_cond={"frame_rate": 25, "attention_mask": torch.ones(1, TOKENS, dtype=torch.long)},
        cached_blocks=_blocks("transformer_blocks", 3),
        time_embedders=("adaln_single.emb.timestep_embedder.linear_1",),
    ),
    "hunyuan_video": Spec(
        "HunyuanVideo",
        {
            "image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16,
            "vec_in_dim": 8, "context_in_dim": 8, "hidden_size": 32, "mlp_ratio": 4.0,
            "num_heads": 2, "depth": 2, "depth_single_blocks": 2, "axes_dim": [4, 6, 6],
            "theta": 256, "patch_size": [1, 2, 2], "qkv_bias": True, "guidance_embed": True,
            "byt5": False, "meanflow": False, "use_cond_type_embedding": False,
            "vision_in_dim": None, "meanflow_sum": False,
        },
        latent_shape=(1, 16, 2, 8, 8), context_dim=8, pooled_dim=8, extra_cond={"guidance": 6.0},
        cached_blocks=_blocks("double_blocks", 2) + _blocks("single_blocks", 2), cfg=1.0,
        time_embedders=("time_in.in_layer", "txt_in.t_embedder.in_layer"),
    ),
    "wan": Spec(
        "WAN21_T2V",
        {
            "image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "text_len": 8,
            "in_dim": 16, "dim": 32, "ffn_dim": 64, "freq_dim": 32, "text_dim": 16, "out_dim": 16,
            "num_heads": 2, "num_layers": 3, "window_size": (-1, -1), "qk_norm": True,
            "cross_attn_norm": True, "eps": 1e-6,
        },
        latent_shape=(1, 16, 2, 8, 8), context_dim=16, cached_blocks=_blocks("blocks", 3),
        time_embedders=("time_embedding.0",),
    ),
    "hidream": Spec(
        "HiDream",
        {
            "image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16,
            "num_layers": 2, "num_single_layers": 3, "attention_head_dim": 8, "num_attention_heads": 2,
            "caption_channels": [8, 8], "text_emb_dim": 8, "num_routed_experts": 4,
            "num_activated_experts": 2, "axes_dims_rope": [4, 2, 2], "max_resolution": [8, 8],
            "llama_layers": [0, 1, 2, 3, 3],
        },
        # every block's mixture of experts routes tokens through boolean masks: graph breaks,
        # so the stack is split and cached at the module level (wavepass.stack_cache)
        latent_shape=(1, 16, 8, 8), context_dim=8, pooled_dim=8,
        extra_cond={"conditioning_llama3": torch.randn(1, 4, TOKENS, 8, generator=torch.Generator().manual_seed(7))},
        cached_blocks=_blocks("single_stream_blocks", 3), cfg=1.0,
        time_embedders=("t_embedder.timestep_embedder.linear_1",),
    ),
    "lumina2": Spec(
        "Lumina2",
        {
            "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 32, "cap_feat_dim": 8,
            "n_layers": 3, "n_refiner_layers": 2, "n_heads": 2, "n_kv_heads": 2, "qk_norm": True,
            "axes_dims": [4, 6, 6], "axes_lens": [1, 512, 512], "multiple_of": 16,
        },
        # refiners: the context refiner runs on the caption first (prologue), the noise refiner
        # on the image, then the layers on cat((caption, image), 1)
        latent_shape=(1, 16, 8, 8), context_dim=8,
        cached_blocks=_blocks("noise_refiner", 2) + _blocks("layers", 3),
    ),
    "qwen_image": Spec(
        "QwenImage",
        {
            "image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 3,
            "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 8,
            "axes_dims_rope": (4, 6, 6),
        },
        # 4 x 6 latents in 2 x 2 patches: as many image tokens as text tokens (6), and the
        # blocks return (text, image)
        latent_shape=(1, 16, 1, 4, 6), context_dim=8, cached_blocks=_blocks("transformer_blocks", 3),
        time_embedders=("time_text_embed.timestep_embedder.linear_1",),
    ),
    "chroma": Spec(
        "Chroma",
        CHROMA,
        latent_shape=(1, 16, 8, 8), context_dim=8, extra_cond={"guidance": 0.0},
        cached_blocks=_blocks("double_blocks", 2) + _blocks("single_blocks", 2),
        time_embedders=(("distilled_guidance_layer.in_proj", 16),),
    ),
    "chroma_radiance": Spec(
        "ChromaRadiance",
        {
            **CHROMA,
            "image_model": "chroma_radiance", "in_channels": 3, "out_channels": 3, "patch_size": 4,
            # a decoder head: a stack of small NeRF blocks over the pixels of each patch
            "nerf_hidden_size": 16, "nerf_mlp_ratio": 2, "nerf_depth": 2, "nerf_max_freqs": 4,
            "nerf_tile_size": 0, "nerf_final_head_type": "conv", "nerf_embedder_dtype": torch.float32,
            "use_x0": False, "use_sequential_txt_ids": False,
        },
        latent_shape=(1, 3, 16, 16), context_dim=8, extra_cond={"guidance": 0.0},
        cached_blocks=_blocks("double_blocks", 2) + _blocks("single_blocks", 2),
        time_embedders=(("distilled_guidance_layer.in_proj", 16),),
    ),
}

MODEL_NAMES = tuple(SPECS)


@dataclass
class TinyModel:
    """A tiny ComfyUI model and what KSampler needs to sample it."""

    name: str
    spec: Spec
    patcher: comfy.model_patcher.ModelPatcher
    positive: list
    negative: list
    # The model as built. Clones of a ModelPatcher share its `model`, and ComfyUI leaves a
    # clone's object patches (e.g. a compiled `diffusion_model`) applied while it is loaded,
    # so `patcher.model.diffusion_model` is not always this module.
    diffusion_model: torch.nn.Module

    @property
    def cfg(self) -> float:
        return self.spec.cfg

    def latent(self) -> dict:
        """An empty latent (zeros, as EmptyLatentImage and its video siblings make)."""
        return {"samples": torch.zeros(self.spec.latent_shape)}


NORM_SCALES = ("weight", "scale")  # a vector by these names is a norm's scale: about 1


def randomize_(module: torch.nn.Module, seed: int, buffers: tuple[str, ...] = ()) -> None:
    """Fill every parameter (and the named buffers): fan-in scaled normals for matrices and
    convolutions, about 1 for norm scales, small normals for other vectors (biases)."""
    g = torch.Generator().manual_seed(seed)
    named = dict(module.named_buffers())
    tensors = [*module.named_parameters(), *((b, named[b]) for b in buffers)]
    with torch.no_grad():
        for name, p in tensors:
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))  # fan-in: all but dim 0
            elif name.rpartition(".")[2] in NORM_SCALES:
                p.copy_(1.0 + noise * 0.1)
            else:
                p.copy_(noise * 0.1)


@torch.no_grad()
def smooth_time_embedding_(module: torch.nn.Module, paths: tuple[str | tuple[str, int], ...],
                           max_radians: float = 10.0) -> None:
    """Let the random timestep MLPs see only the slow sinusoids of the timestep.

    Every model here embeds t (in [0, 1]) * 1000 as [cos, sin] of the frequencies
    10000^(-i/half); random weights mix the fast ones in as strongly as the slow ones, so the
    modulation of every block jumps between neighbouring steps, unlike a trained model's
    (as in benchmarks/demo.py). Zeroing the input weights of sinusoids that turn more than
    `max_radians` over the schedule makes the first block's residual change smoothly.
    """
    for entry in paths:
        path, width = entry if isinstance(entry, tuple) else (entry, None)
        linear = module.get_submodule(path)
        half = (width or linear.in_features) // 2
        frequencies = torch.pow(10000.0, -torch.arange(half) / half) * 1000
        slow = (frequencies <= max_radians).to(linear.weight.dtype)
        linear.weight[:, :2 * half].mul_(torch.cat([slow, slow]))


def conditioning(spec: Spec, seed: int) -> list:
    """`[[cond, {"pooled_output": ..., ...}]]`: ComfyUI's conditioning for `spec`."""
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, TOKENS, spec.context_dim, generator=g)
    extra = dict(spec.extra_cond)
    if spec.pooled_dim is not None:
        extra["pooled_output"] = torch.randn(1, spec.pooled_dim, generator=g)
    return [[cond, extra]]


def build(name: str, seed: int = 0) -> TinyModel:
    """A `ModelPatcher` around ComfyUI's model class for `name`, random weights from `seed`."""
    spec = SPECS[name]
    config = getattr(comfy.supported_models, spec.config_class)(dict(spec.unet_config))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    randomize_(model.diffusion_model, seed, spec.random_buffers)
    smooth_time_embedding_(model.diffusion_model, spec.time_embedders)
    model.eval()
    device = comfy.model_management.get_torch_device()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
    return TinyModel(name, spec, patcher, conditioning(spec, seed + 1), conditioning(spec, seed + 2),
                     model.diffusion_model)


FLUX_LORA_TARGETS = ("double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.0", "single_blocks.1.linear1")


def write_lora(folder, name: str, diffusion_model: torch.nn.Module, seed: int,
               targets: tuple[str, ...] = FLUX_LORA_TARGETS) -> str:
    """A random rank-2 LoRA of the `targets` Linear layers, in ComfyUI's key format
    (`diffusion_model.<module>.lora_up/down`), saved as `folder/name`."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    state = {}
    for path in targets:
        out_features, in_features = diffusion_model.get_submodule(path).weight.shape
        key = f"diffusion_model.{path}"
        state[f"{key}.lora_up.weight"] = torch.randn(out_features, 2, generator=g) * 0.3
        state[f"{key}.lora_down.weight"] = torch.randn(2, in_features, generator=g) * 0.3
    save_file(state, str(folder / name))
    return name
