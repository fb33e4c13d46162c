"""A user's session in one process (issue #19): tuning never recompiles, and caching never
stops silently.

ComfyUI: the node pack loaded by ComfyUI's own loader (`nodes.load_custom_node`), sampling
through `nodes.KSampler`, ComfyUI's own Flux and SDXL classes (tiny, random weights), Apply
First Block Cache -> Compile Model+ (Inductor). The session: 20 thresholds (more than
Dynamo's recompile limit of 8), the cache node removed and added again, three LoRAs at two
strengths each, a second model of the same architecture, a second resolution and back.
Dynamo's counters must show exactly the compiles the README's table documents (one graph,
plus one dynamic graph for the second resolution); every run with a threshold > 0 skips
calls and equals the independent reference cache (`comfy_reference.py`) decision for
decision. diffusers: the same through `apply_wavespeed` (threshold changes, `remove()` and
apply again). And the ways compilation stops (the recompile limit, a model frame Dynamo
skips) are said once, in `stats(model).reason` and in ComfyUI's run line.
"""

from __future__ import annotations

import asyncio
import logging
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import comfy_support

nodes = comfy_support.require_nodes()

import comfy_models  # noqa: E402
import comfy_reference  # noqa: E402
import folder_paths  # noqa: E402
from fbcache_reference import ReferenceFBCache  # noqa: E402
from test_diffusers_integration import flux_pipe, run  # noqa: E402

import models  # noqa: E402
import wavepass  # noqa: E402
from wavepass_diffusers import apply_wavespeed  # noqa: E402

STEPS = 8
THRESHOLDS = [round(0.05 * i, 2) for i in range(2, 22)]  # 0.1 .. 1.05: 20 values
# the compiles of a session, as the README's "What compiles when" table says: the first
# resolution's graph, and one graph with dynamic sizes at the first new resolution
SESSION_GRAPHS = 2


@pytest.fixture(scope="module")
def pack():
    assert asyncio.run(nodes.load_custom_node(str(comfy_support.ROOT)))
    return (nodes.NODE_CLASS_MAPPINGS["WavepassApplyFirstBlockCache"],
            nodes.NODE_CLASS_MAPPINGS["WavepassCompileModelPlus"])


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("session-loras")
    folder_paths.add_model_folder_path("loras", str(folder))
    return folder


class Session:
    """One ComfyUI user's session on one model class: runs KSampler on each workflow
    variant, checks it against the reference cache, and counts what ran."""

    def __init__(self, name: str, pack, loras):
        self.name, self.loras = name, loras
        self.fbcache_node, self.compile_node = pack
        self.tiny = comfy_models.build(name)
        self.runs: list[wavepass.Stats] = []

    def fbcache(self, model, threshold: float):
        return self.fbcache_node.execute(model=model, object_to_patch="diffusion_model",
                                         residual_diff_threshold=threshold, start=0.0, end=1.0,
                                         max_consecutive_cache_hits=-1).result[0]

    def compiled(self, model):
        return self.compile_node.execute(model=model, object_to_patch="diffusion_model", mode="default",
                                         dynamic="auto", fullgraph=False, options="").result[0]

    def ksampler(self, model, latent) -> torch.Tensor:
        return nodes.KSampler().sample(model, 0, STEPS, self.tiny.cfg, "euler", "simple",
                                       self.tiny.positive, self.tiny.negative, latent)[0]["samples"]

    def run(self, base, threshold: float | None, latent=None, tiny=None):
        """KSampler on `base` -> [Apply First Block Cache(threshold)] -> Compile Model+;
        checked against the reference cache (threshold None: no cache node)."""
        tiny = tiny or self.tiny
        latent = latent or tiny.latent()
        reference = comfy_reference.CACHES[self.name](threshold or 0.0)
        with comfy_reference.installed(self.name, tiny.diffusion_model, reference):
            expected = self.ksampler(base, latent)
        model = self.compiled(base if threshold is None else self.fbcache(base, threshold))
        out = self.ksampler(model, latent)
        stats = wavepass.stats(model)
        self.runs.append(stats)
        assert stats.reason is None, stats
        assert stats.decisions == tuple(reference.decisions), (threshold, stats)
        if threshold:
            assert stats.hits > 0, f"threshold {threshold}: {stats}"
        torch.testing.assert_close(out, expected, atol=1e-3, rtol=1e-3)  # Inductor vs eager, 8 steps

    def lora(self, index: int, strength: float):
        name = f"session-{self.name}-{index}.safetensors"
        if not (self.loras / name).exists():
            write_lora_for(self.loras, name, self.tiny.diffusion_model, seed=10 + index)
        return nodes.LoraLoaderModelOnly().load_lora_model_only(self.tiny.patcher, name, strength)[0]

    def bigger_latent(self) -> dict:
        shape = list(self.tiny.spec.latent_shape)
        shape[-1], shape[-2] = 2 * shape[-1], 2 * shape[-2]
        return {"samples": torch.zeros(shape)}


def write_lora_for(folder, file, diffusion_model, seed):
    """A random LoRA on three of the model's attention and feed-forward Linear layers."""
    targets = tuple(path for path, module in diffusion_model.named_modules()
                    if isinstance(module, torch.nn.Linear) and path.endswith(LORA_SUFFIXES))[:3]
    comfy_models.write_lora(folder, file, diffusion_model, seed, targets)


LORA_SUFFIXES = ("img_attn.qkv", "txt_mlp.0", "linear1", "attn1.to_q", "attn2.to_v", "ff.net.2")


@pytest.mark.parametrize("name", ["flux", "sdxl"])
def test_a_comfyui_session_compiles_once_and_caches_every_run(name, pack, loras):
    session = Session(name, pack, loras)
    base = session.tiny.patcher
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=wavepass.WavespeedWarning)
        for threshold in THRESHOLDS:  # tuning, more values than Dynamo's recompile limit
            session.run(base, threshold)
        session.run(base, None)  # the cache node removed: Compile Model+ alone
        session.run(base, 0.3)  # and added again
        for index in range(3):  # three LoRAs, two strengths each
            for strength in (1.0, 0.5):
                session.run(session.lora(index, strength), 0.3)
        other = comfy_models.build(name, seed=1)  # another checkpoint of the architecture
        session.run(other.patcher, 0.3, tiny=other)
        session.run(base, 0.3, latent=session.bigger_latent())  # a second resolution
        session.run(base, 0.3)  # and back
    assert len(session.runs) == 31
    assert counters["stats"]["unique_graphs"] == SESSION_GRAPHS, dict(counters["stats"])


def test_a_diffusers_session_compiles_once(no_fallback):
    """apply_wavespeed with Inductor: thresholds changed through the handle, the handle removed
    and wavespeed applied again with other settings: one compile for the whole session, and
    each run equals the reference cache over the same transformer's stages."""
    pipe, kwargs = flux_pipe()
    case = models.flux()  # the same transformer: same config, same seed
    torch.testing.assert_close(case.model.proj_out.weight, pipe.transformer.proj_out.weight, atol=0, rtol=0)

    def reference(threshold):
        cache = ReferenceFBCache(threshold)
        ref_pipe, _ = flux_pipe()

        def forward(**kw):
            for unused in ("return_dict", "joint_attention_kwargs", "guidance"):
                kw.pop(unused, None)
            return (cache(*case.stages, kw),)

        ref_pipe.transformer.forward = forward
        return run(ref_pipe, kwargs, steps=STEPS), tuple(cache.decisions)

    handle = apply_wavespeed(pipe, residual_diff_threshold=0.3)
    for step, threshold in enumerate((0.3, 0.5, 0.2, 0.8, 0.0, 0.4)):
        if step == 3:
            handle.remove()
            handle = apply_wavespeed(pipe, residual_diff_threshold=threshold, max_consecutive_cache_hits=-1)
        else:
            handle.configure(residual_diff_threshold=threshold)
        out = run(pipe, kwargs, steps=STEPS)
        expected, decisions = reference(threshold)
        stats = wavepass.stats(pipe.transformer)
        assert stats.decisions == decisions and (stats.hits > 0) == (threshold > 0), (threshold, stats)
        torch.testing.assert_close(out, expected, atol=1e-3, rtol=1e-3)  # Inductor vs eager, 8 steps
    assert counters["stats"]["unique_graphs"] == 1


# --- never silent ------------------------------------------------------------------------


@torch._dynamo.config.patch(recompile_limit=2)
def test_the_recompile_limit_is_said_with_its_fix(pack, caplog):
    """Other compiles of the same class fill Dynamo's recompile limit (lowered to 2 here, to
    keep the test cheap; the default is 8): ComfyUI's run then runs uncompiled, and the user
    reads why once, in the warning, the run line and `stats`."""
    tiny = comfy_models.build("flux")
    fbcache_node, _ = pack
    call = []
    hook = tiny.diffusion_model.register_forward_pre_hook(lambda m, a, k: call.append((a, k)) if not call else None,
                                                          with_kwargs=True)
    nodes.common_ksampler(tiny.patcher, 0, 1, 1.0, "euler", "simple", tiny.positive, tiny.negative, tiny.latent())
    hook.remove()
    args, kwargs = call[0]
    for variant in range(2):  # two other compile settings of the same forward
        other = torch.compile(tiny.diffusion_model, backend="wavespeed",
                              options={"compiler": "eager", "inductor": {"variant": variant}})
        other(*args, **kwargs)
    model = fbcache_node.execute(model=tiny.patcher, object_to_patch="diffusion_model", residual_diff_threshold=0.3,
                                 start=0.0, end=1.0, max_consecutive_cache_hits=-1).result[0]
    with caplog.at_level(logging.INFO, logger="wavepass"), pytest.warns(wavepass.WavespeedWarning) as caught:
        nodes.common_ksampler(model, 0, STEPS, 1.0, "euler", "simple", tiny.positive, tiny.negative, tiny.latent())
        nodes.common_ksampler(model, 0, STEPS, 1.0, "euler", "simple", tiny.positive, tiny.negative, tiny.latent())
    messages = [str(w.message) for w in caught if isinstance(w.message, wavepass.WavespeedWarning)]
    assert len(messages) == 1  # once, not per call or per run
    assert "recompile_limit (2)" in messages[0] and "Flux.forward" in messages[0]
    assert "raise torch._dynamo.config.recompile_limit" in messages[0]
    stats = wavepass.stats(model)
    assert (stats.calls, stats.hits) == (STEPS, 0) and "recompile_limit" in stats.reason
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("wavespeed: skipped")]
    assert lines[-1].startswith(f"wavespeed: skipped 0 of {STEPS} model calls (not cached: Dynamo hit")


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x):
        return x + self.linear(x).tanh()


class SkippedFrameModel(torch.nn.Module):
    """Its own forward is a frame Dynamo skips (as under `torch.compiler.disable`); its blocks
    are not, so Dynamo compiles them one by one and the backend sees one block per graph.
    `listed`: the blocks are a ModuleList (a stack wavepass caches at the module level);
    otherwise three attributes, which are no stack."""

    def __init__(self, listed: bool = True):
        super().__init__()
        blocks = [Block() for _ in range(3)]
        if listed:
            self.blocks = torch.nn.ModuleList(blocks)
        else:
            self.b0, self.b1, self.b2 = blocks

    @torch.compiler.disable(recursive=False)
    def forward(self, x):
        blocks = self.blocks if hasattr(self, "blocks") else (self.b0, self.b1, self.b2)
        for block in blocks:
            x = block(x)
        return x


def test_blocks_compiled_one_by_one_are_cached_around_their_stack():
    model = SkippedFrameModel()
    compiled = torch.compile(model, backend="wavespeed",
                             options={"compiler": "eager", "residual_diff_threshold": 0.5})
    x = torch.randn(2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", wavepass.WavespeedWarning)
        for step in range(4):
            out = compiled(x + 1e-3 * step)
    stats = wavepass.stats(model)
    # the stack is learned during the first call, which runs uncached
    assert stats.reason is None and stats.decisions == (False, False, True, True)
    torch.testing.assert_close(out, model(x + 1e-3), atol=1e-2, rtol=0)


def test_blocks_compiled_one_by_one_without_a_stack_name_the_real_cause():
    model = SkippedFrameModel(listed=False)
    compiled = torch.compile(model, backend="wavespeed", options={"compiler": "eager"})
    x = torch.randn(2, 8)
    with pytest.warns(wavepass.WavespeedWarning) as caught, wavepass.watch(model):
        out = compiled(x)
    torch.testing.assert_close(out, model(x))
    text = " ".join(str(w.message) for w in caught)
    assert "compiled `Block.forward` inside SkippedFrameModel on its own" in text
    assert "no stack of repeated blocks" not in text  # not the misleading cause
    assert "compiled `Block.forward`" in wavepass.stats(model).reason


def test_an_uncompiled_model_says_so_in_stats():
    model = SkippedFrameModel()
    stats = wavepass.stats(model)
    assert stats.calls == 0 and "no wavespeed program has run with this model" in stats.reason
