"""Property tests: random small denoisers under the wavespeed backend, against ReferenceFBCache.

Hypothesis draws a `ModelSpec` (which streams, which blocks, which glue code), builds a
`RandomDenoiser` from it, draws a short sampling-like sequence of calls and cache options,
and runs the calls three ways:

    ReferenceFBCache(model.head, model.rest, model.tail)   the rule, in plain Python
    torch.compile(model, backend="wavespeed", ...)         the backend under test
    model(*inputs)                                         the uncached model

Properties checked for every drawn case:
- the backend caches the model (no fallback, one cached program for all calls);
- it decides every call as the reference does, and returns the reference's outputs;
- a call that runs every block returns what the model returns, so threshold 0 (which never
  skips) is the uncached model;
- after `wavepass.reset`, the same calls make the same decisions and outputs again.
Most cases run with `compiler="eager"` (the partitioned program, uncompiled: each example
costs one Dynamo trace); a few run with Inductor, with a looser tolerance.

The models are cacheable by construction: blocks update their streams by residual additions,
the epilogue reads the image stream only, and the cached region (the consecutive stacks of
two or more blocks, with only top-level glue between them) is known from the spec alone,
because a one-block list is placed only before the stacks (prologue) or after them
(epilogue), never between them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import wavepass
from fbcache_reference import ReferenceFBCache
from wavepass import compilers

IMAGE_CHANNELS = 4  # channels of the image input (and of the model's output)
TEXT_CHANNELS = 6  # channels of the text input

# Block kinds. Image kinds update `x` only (and pass `c` through); joint kinds need the
# text stream `c` and update both.
IMAGE_KINDS = ("mlp", "attention", "adaln")
JOINT_KINDS = ("dual", "single")
# How a block writes a residual update `delta` into a stream `x`.
UPDATES = ("add", "iadd", "add_")  # x = x + delta | x += delta | x.add_(delta)
# Top-level code (in no submodule) between two stacks of the cached region.
GLUES = (
    "none",
    "arithmetic",  # x = x * 1.0 + 0.0
    "casts",  # x = x.double().float().contiguous()
    "cond",  # x = x + cond, a per-call conditioning input
)
# Size of the change of every input from one call to the next: 0 repeats the call (a skip
# wherever the options allow one), 1e-4 usually skips, 1.0 never does.
DRIFTS = (0.0, 1e-4, 1e-3, 1e-2, 0.1, 1.0)


# --- the model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StackSpec:
    """An `nn.ModuleList` of `size` blocks of one kind, all writing updates the same way."""

    kind: str
    size: int
    update: str


@dataclass(frozen=True)
class ModelSpec:
    batch: int
    dim: int
    heads: int
    image_tokens: int
    text_tokens: int | None  # None: the image stream only
    lead: StackSpec | None  # a one-block list in the prologue, before the stacks
    stacks: tuple[StackSpec, ...]  # the cached region: 1-3 stacks of 2-4 blocks
    glue: tuple[str, ...]  # the glue after each stack but the last
    trail: StackSpec | None  # a one-block list in the epilogue (an image kind)
    modulated_out: bool  # the epilogue's norm is modulated by temb
    seed: int


def attend(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head self-attention over the tokens of `qkv` (B, L, 3 * D) -> (B, L, D)."""
    q, k, v = (part.unflatten(-1, (heads, -1)).transpose(1, 2) for part in qkv.chunk(3, dim=-1))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class MLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """A block `(x, c, temb) -> (x, c)` whose streams change only by residual updates."""

    def __init__(self, dim: int, heads: int, update: str) -> None:
        super().__init__()
        self.heads, self.update = heads, update

    def add(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if self.update == "iadd":
            x += delta
            return x
        if self.update == "add_":
            return x.add_(delta)
        return x + delta


class MLPBlock(Block):
    def __init__(self, dim: int, heads: int, update: str) -> None:
        super().__init__(dim, heads, update)
        self.norm, self.mlp = nn.LayerNorm(dim), MLP(dim)

    def forward(self, x, c, temb):
        return self.add(x, self.mlp(self.norm(x))), c


class AttentionBlock(Block):
    def __init__(self, dim: int, heads: int, update: str) -> None:
        super().__init__(dim, heads, update)
        self.norm, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, c, temb):
        return self.add(x, self.proj(attend(self.qkv(self.norm(x)), self.heads))), c


class AdaLNBlock(Block):
    """An MLP whose input is shifted and scaled, and whose output is gated, by temb."""

    def __init__(self, dim: int, heads: int, update: str) -> None:
        super().__init__(dim, heads, update)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.modulation, self.mlp = nn.Linear(dim, 3 * dim), MLP(dim)

    def forward(self, x, c, temb):
        shift, scale, gate = self.modulation(F.silu(temb)).unsqueeze(1).chunk(3, dim=-1)
        return self.add(x, gate * self.mlp(self.norm(x) * (1 + scale) + shift)), c


class DualBlock(Block):
    """Joint attention over `cat([c, x])` with per-stream projections (SD3, Flux double)."""

    def __init__(self, dim: int, heads: int, update: str) -> None:
        super().__init__(dim, heads, update)
        self.norm_x, self.norm_c = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv_x, self.qkv_c = nn.Linear(dim, 3 * dim), nn.Linear(dim, 3 * dim)
        self.proj_x, self.proj_c = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_mlp, self.mlp = nn.LayerNorm(dim), MLP(dim)

    def forward(self, x, c, temb):
        text = c.shape[1]
        qkv = torch.cat([self.qkv_c(self.norm_c(c)), self.qkv_x(self.norm_x(x))], dim=1)
        attended = attend(qkv, self.heads)
        c = self.add(c, self.proj_c(attended[:, :text]))
        x = self.add(x, self.proj_x(attended[:, text:]))
        return self.add(x, self.mlp(self.norm_mlp(x))), c


class SingleBlock(Block):
    """One stream `cat([c, x])` through attention and an MLP, split back by slices (Flux single)."""

    def __init__(self, dim: int, heads: int, update: str) -> None:
        super().__init__(dim, heads, update)
        self.norm, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm_mlp, self.mlp = nn.LayerNorm(dim), MLP(dim)

    def forward(self, x, c, temb):
        text = c.shape[1]
        h = torch.cat([c, x], dim=1)
        h = self.add(h, self.proj(attend(self.qkv(self.norm(h)), self.heads)))
        h = self.add(h, self.mlp(self.norm_mlp(h)))
        return h[:, text:], h[:, :text]


BLOCKS = {"mlp": MLPBlock, "attention": AttentionBlock, "adaln": AdaLNBlock,
          "dual": DualBlock, "single": SingleBlock}


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.fc1.in_features // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=t.dtype) / half)
        angles = t[:, None] * freqs[None]
        return self.fc2(F.silu(self.fc1(torch.cat([angles.cos(), angles.sin()], dim=-1))))


class OutNorm(nn.Module):
    """LayerNorm, optionally shifted and scaled by temb (AdaLN-style output norm)."""

    def __init__(self, dim: int, modulated: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.modulation = nn.Linear(dim, 2 * dim) if modulated else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.modulation is None:
            return x
        shift, scale = self.modulation(F.silu(temb)).unsqueeze(1).chunk(2, dim=-1)
        return x * (1 + scale) + shift


def glue(kind: str, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    if kind == "arithmetic":
        return x * 1.0 + 0.0
    if kind == "casts":
        return x.double().float().contiguous()
    if kind == "cond":
        return x + cond
    return x


class RandomDenoiser(nn.Module):
    """`forward(x_in, c_in, t, cond)`: prologue, blocks, epilogue, built from a `ModelSpec`.

    The forward is written as the three stages `ReferenceFBCache` runs, so the reference and
    the compiled model run the same math: `head` is the prologue and the first block of the
    first stack, `rest` the remaining blocks with the glue between stacks, `tail` the
    epilogue (which reads the image stream and temb only).
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(spec.seed)
            dim = spec.dim
            self.x_embed = nn.Linear(IMAGE_CHANNELS, dim)
            self.c_embed = nn.Linear(TEXT_CHANNELS, dim) if spec.text_tokens else None
            self.t_embed = TimestepEmbedding(dim)
            self.lead = self._stack(spec.lead, spec) if spec.lead else None
            self.stacks = nn.ModuleList(self._stack(stack, spec) for stack in spec.stacks)
            self.glue = spec.glue
            self.trail = self._stack(spec.trail, spec) if spec.trail else None
            self.norm_out = OutNorm(dim, spec.modulated_out)
            self.proj_out = nn.Linear(dim, IMAGE_CHANNELS)

    @staticmethod
    def _stack(stack: StackSpec, spec: ModelSpec) -> nn.ModuleList:
        cls = BLOCKS[stack.kind]
        return nn.ModuleList(cls(spec.dim, spec.heads, stack.update) for _ in range(stack.size))

    def head(self, x_in, c_in, t, cond):
        """-> (the first block's image input, its outputs by stream, aux for rest and tail)."""
        x = self.x_embed(x_in)
        c = self.c_embed(c_in) if self.c_embed is not None else None
        temb = self.t_embed(t)
        if self.lead is not None:
            x, c = self.lead[0](x, c, temb)
        block_input = x.clone()  # the first block may write into x in place
        x, c = self.stacks[0][0](x, c, temb)
        return block_input, {"img": x, "txt": c}, (temb, cond)

    def rest(self, first, aux):
        x, c = first["img"], first["txt"]
        temb, cond = aux
        for s, stack in enumerate(self.stacks):
            for i in range(1 if s == 0 else 0, len(stack)):
                x, c = stack[i](x, c, temb)
            if s < len(self.glue):
                x = glue(self.glue[s], x, cond)
        return {"img": x}

    def tail(self, final, aux):
        x, temb = final["img"], aux[0]
        if self.trail is not None:
            x, _ = self.trail[0](x, None, temb)
        return self.proj_out(self.norm_out(x, temb))

    def forward(self, x_in, c_in, t, cond):
        _, first, aux = self.head(x_in, c_in, t, cond)
        return self.tail(self.rest(first, aux), aux)


def sampling_calls(spec: ModelSpec, drifts: tuple[float, ...]) -> list[tuple[torch.Tensor, ...]]:
    """The inputs of each call: random first inputs, then each call drifts from the one before."""
    generator = torch.Generator().manual_seed(spec.seed)
    b, n, d = spec.batch, spec.image_tokens, spec.dim
    shapes = ((b, n, IMAGE_CHANNELS), (b, spec.text_tokens or 1, TEXT_CHANNELS), (b,), (b, n, d))
    calls = [tuple(torch.randn(shape, generator=generator) for shape in shapes)]
    for drift in drifts:
        calls.append(tuple(v + drift * torch.randn(v.shape, generator=generator) for v in calls[-1]))
    return calls


# --- strategies ------------------------------------------------------------------------------


def stack_specs(kinds: tuple[str, ...], sizes: st.SearchStrategy[int]) -> st.SearchStrategy[StackSpec]:
    return st.builds(StackSpec, kind=st.sampled_from(kinds), size=sizes, update=st.sampled_from(UPDATES))


@st.composite
def model_specs(draw) -> ModelSpec:
    image_tokens = draw(st.integers(4, 8))
    # Text as long as the image makes shape-based pairing of streams ambiguous.
    text = draw(st.sampled_from(("none", "same length", "any length")))
    text_tokens = {"none": None, "same length": image_tokens}.get(text) or draw(st.integers(4, 8))
    kinds = IMAGE_KINDS + (JOINT_KINDS if text_tokens else ())
    stacks = draw(st.lists(stack_specs(kinds, st.integers(2, 4)), min_size=1, max_size=3))
    return ModelSpec(
        batch=draw(st.integers(1, 2)),
        dim=draw(st.sampled_from((8, 12, 16))),
        heads=draw(st.sampled_from((1, 2))),
        image_tokens=image_tokens,
        text_tokens=text_tokens,
        lead=draw(st.none() | stack_specs(kinds, st.just(1))),
        stacks=tuple(stacks),
        glue=tuple(draw(st.lists(st.sampled_from(GLUES), min_size=len(stacks) - 1, max_size=len(stacks) - 1))),
        trail=draw(st.none() | stack_specs(IMAGE_KINDS, st.just(1))),
        modulated_out=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@dataclass(frozen=True)
class Scenario:
    """A model, the cache options it is compiled with, and the drift before each later call."""

    spec: ModelSpec
    threshold: float
    max_hits: int
    warmup: int
    drifts: tuple[float, ...]


scenarios = st.builds(
    Scenario,
    spec=model_specs(),
    threshold=st.just(0.0) | st.floats(0.01, 0.5),
    max_hits=st.integers(-1, 3),
    warmup=st.integers(0, 3),
    drifts=st.lists(st.sampled_from(DRIFTS), min_size=2, max_size=7).map(tuple),
)


# --- running a scenario ----------------------------------------------------------------------


class MarginReference(ReferenceFBCache):
    """The reference, also keeping how far each compared change was from the threshold."""

    def reset(self) -> None:
        super().reset()
        self.margins: list[float] = []

    def _skip(self, signal: torch.Tensor) -> bool:
        if self.signal is not None and self.threshold > 0:
            change = ((signal - self.signal).abs().mean() / self.signal.abs().mean()).item()
            self.margins.append(abs(change - self.threshold) / self.threshold)
        return super()._skip(signal)


def run_reference(model: RandomDenoiser, scenario: Scenario, calls) -> tuple[MarginReference, list]:
    reference = MarginReference(scenario.threshold, scenario.max_hits, scenario.warmup, main="img")

    def rest(first, aux):
        # The model's blocks may write into their inputs; the reference reads `first` after.
        return model.rest({name: v if v is None else v.clone() for name, v in first.items()}, aux)

    outputs = [reference(model.head, rest, model.tail, *args) for args in calls]
    return reference, outputs


def check_scenario(scenario: Scenario, compiler: str, tol: float, decision_margin: float) -> None:
    """Run `scenario` through the reference, the backend (two generations) and the model.

    Cases where the reference's change came within `decision_margin` (relative) of the
    threshold are discarded: there, rounding alone may flip a decision.
    """
    # Per example what conftest's `clean_dynamo` does per test: a fresh Dynamo (so no
    # recompile limit is reached) and fallback warnings that fire again.
    torch._dynamo.reset()
    compilers._warned.clear()
    model = RandomDenoiser(scenario.spec).eval()
    calls = sampling_calls(scenario.spec, scenario.drifts)
    reference, expected = run_reference(model, scenario, calls)
    assume(all(margin > decision_margin for margin in reference.margins))
    uncached = [model(*args) for args in calls]

    options = dict(residual_diff_threshold=scenario.threshold, warmup_steps=scenario.warmup,
                   max_consecutive_cache_hits=scenario.max_hits, compiler=compiler)
    compiled = torch.compile(model, backend="wavespeed", fullgraph=True, options=options)
    generations = []
    for _ in range(2):
        wavepass.reset(model)
        outputs = [compiled(*args) for args in calls]
        stats = wavepass.stats(model)
        assert stats.calls == len(calls), "the backend did not cache this model (fallback?)"
        generations.append((stats.decisions, outputs))

    decisions, outputs = generations[0]
    assert decisions == tuple(reference.decisions)
    for step, (out, ref) in enumerate(zip(outputs, expected)):
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol, msg=lambda m: f"call {step}: {m}")
    if scenario.threshold == 0 or scenario.max_hits == 0:
        assert not any(decisions)
    for step, (out, plain, skipped) in enumerate(zip(outputs, uncached, decisions)):
        if not skipped:  # a full call is the model itself, whatever the cache holds
            torch.testing.assert_close(out, plain, atol=tol, rtol=tol, msg=lambda m: f"call {step}: {m}")
    repeated_decisions, repeated_outputs = generations[1]
    assert repeated_decisions == decisions
    for out, first in zip(repeated_outputs, outputs):
        torch.testing.assert_close(out, first, atol=0, rtol=0)


# --- tests -----------------------------------------------------------------------------------

# The autouse `clean_dynamo` fixture and `no_fallback` are per test, not per example.
FIXTURES_PER_TEST = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@settings(max_examples=30, deadline=None, suppress_health_check=FIXTURES_PER_TEST)
@given(scenario=scenarios)
def test_random_models_match_reference(scenario: Scenario, no_fallback) -> None:
    check_scenario(scenario, "eager", tol=1e-6, decision_margin=1e-5)


@settings(max_examples=3, deadline=None, derandomize=True, suppress_health_check=FIXTURES_PER_TEST)
@given(scenario=scenarios)
def test_random_models_match_reference_inductor(scenario: Scenario, no_fallback) -> None:
    check_scenario(scenario, "inductor", tol=1e-4, decision_margin=1e-2)
