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
and the image stream decides (the epilogue reads it, and reads the text stream only where that
is shorter). `head`, `rest` and `tail` follow the backend's documented region: from the first
to the last `nn.ModuleList` of two or more blocks under `stacks` (one-block lists are no
stacks: before the region they run in the prologue, inside it in `rest`, after it in the
epilogue). The lists are named items of an `nn.ModuleDict` (`stacks.s0`), so that the list
itself is no indexed block (a list of lists would also offer the outer level,
`stacks.0` holding a whole list, as a region; see `find_blocks`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch._dynamo
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, assume, event, example, given, settings
from hypothesis import strategies as st
from torch import nn

import wavepass
from fbcache_reference import MarginReference
from wavepass import notices

IMAGE_CHANNELS = 4  # channels of the image input (and of the model's output)
TEXT_CHANNELS = 6  # channels of the text input

# Block kinds. Image kinds update `x` only (and pass `c` through); joint kinds need the
# text stream `c` and update both.
IMAGE_KINDS = ("mlp", "attention", "adaln")
JOINT_KINDS = ("dual", "single")
# How a block writes a residual update `delta` into a stream `x`.
UPDATES = ("add", "iadd", "add_")  # x = x + delta | x += delta | x.add_(delta)
# Top-level code (in no submodule) after each stack but the last.
GLUES = (
    "none",
    "arithmetic",  # x = (x * 2.0 - 1.0) / 2.0
    "casts",  # x = x.double().float().contiguous()
    "cond",  # x = x + cond, a per-call conditioning input
    "join",  # x = cat([c, x]): the streams go on as one (ComfyUI's Flux between its stacks);
    # later stacks are image kinds on the joined stream, and the epilogue slices the image back
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
    stacks: tuple[StackSpec, ...]  # 1-3 lists, at least one of two or more blocks
    glue: tuple[str, ...]  # the glue after each stack but the last
    text_out: bool  # the epilogue also reads the (shorter) text stream
    modulated_out: bool  # the epilogue's norm is modulated by temb
    seed: int


def attend(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head self-attention over the tokens of `qkv` (B, L, 3 * D) -> (B, L, D)."""
    q, k, v = (part.unflatten(-1, (heads, -1)).transpose(1, 2) for part in qkv.chunk(3, dim=-1))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class MLP(nn.Module):
    """`fc2(gelu(fc1(norm(x))))`, or without the norm for blocks that modulate its input."""

    def __init__(self, dim: int, prenorm: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim) if prenorm else nn.Identity()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class SelfAttention(nn.Module):
    """`proj(attend(qkv(norm(x))))`."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm, self.qkv = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(attend(self.qkv(self.norm(x)), self.heads))


class Block(nn.Module):
    """A block `(x, c, temb) -> (x, c)` whose streams change only by residual updates."""

    def __init__(self, update: str) -> None:
        super().__init__()
        self.update = update

    def add(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if self.update == "iadd":
            x += delta
            return x
        if self.update == "add_":
            return x.add_(delta)
        return x + delta


class MLPBlock(Block):
    def __init__(self, dim: int, heads: int, update: str) -> None:
        super().__init__(update)
        self.mlp = MLP(dim)

    def forward(self, x, c, temb):
        return self.add(x, self.mlp(x)), c


class AttentionBlock(Block):
    def __init__(self, dim: int, heads: int, update: str) -> None:
        super().__init__(update)
        self.attn = SelfAttention(dim, heads)

    def forward(self, x, c, temb):
        return self.add(x, self.attn(x)), c


class AdaLNBlock(Block):
    """An MLP whose input is shifted and scaled, and whose output is gated, by temb."""

    def __init__(self, dim: int, heads: int, update: str) -> None:
        super().__init__(update)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.modulation, self.mlp = nn.Linear(dim, 3 * dim), MLP(dim, prenorm=False)

    def forward(self, x, c, temb):
        shift, scale, gate = self.modulation(F.silu(temb)).unsqueeze(1).chunk(3, dim=-1)
        return self.add(x, gate * self.mlp(self.norm(x) * (1 + scale) + shift)), c


class DualBlock(Block):
    """Joint attention over `cat([c, x])` with per-stream projections (SD3, Flux double)."""

    def __init__(self, dim: int, heads: int, update: str) -> None:
        super().__init__(update)
        self.heads = heads
        self.norm_x, self.norm_c = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv_x, self.qkv_c = nn.Linear(dim, 3 * dim), nn.Linear(dim, 3 * dim)
        self.proj_x, self.proj_c = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.mlp = MLP(dim)

    def forward(self, x, c, temb):
        text = c.shape[1]
        qkv = torch.cat([self.qkv_c(self.norm_c(c)), self.qkv_x(self.norm_x(x))], dim=1)
        attended = attend(qkv, self.heads)
        c = self.add(c, self.proj_c(attended[:, :text]))
        x = self.add(x, self.proj_x(attended[:, text:]))
        return self.add(x, self.mlp(x)), c


class SingleBlock(Block):
    """An image MLP, then attention over the one stream `cat([c, x])`, split back by slices.

    Like Flux's single blocks the outputs are views of the joint stream, so an in-place update
    at the start of the next block writes into the previous block's joint stream.
    """

    def __init__(self, dim: int, heads: int, update: str) -> None:
        super().__init__(update)
        self.mlp, self.attn = MLP(dim), SelfAttention(dim, heads)

    def forward(self, x, c, temb):
        text = c.shape[1]
        x = self.add(x, self.mlp(x))
        h = torch.cat([c, x], dim=1)
        h = self.add(h, self.attn(h))
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


def glue(kind: str, x: torch.Tensor, c: torch.Tensor | None, cond: torch.Tensor) -> torch.Tensor:
    if kind == "join":
        return torch.cat([c, x], dim=1)
    if kind == "arithmetic":
        return (x * 2.0 - 1.0) / 2.0
    if kind == "casts":
        return x.double().float().contiguous()
    if kind == "cond":
        return x + cond
    return x


class RandomDenoiser(nn.Module):
    """`forward(x_in, c_in, t, cond)`: prologue, blocks, epilogue, built from a `ModelSpec`.

    The forward is written as the three stages `ReferenceFBCache` runs, so the reference and
    the compiled model run the same math. The model is a sequence of *steps*, (s, i) for block
    i of stack s and (s, None) for the glue after stack s; `head` runs the prologue and the
    steps up to the first block of the region, `rest` the steps up to its last block, `tail`
    the remaining steps and the epilogue.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(spec.seed)
            dim = spec.dim
            self.x_embed = nn.Linear(IMAGE_CHANNELS, dim)
            self.c_embed = nn.Linear(TEXT_CHANNELS, dim) if spec.text_tokens else None
            self.t_embed = TimestepEmbedding(dim)
            self.stacks = nn.ModuleDict({
                f"s{s}": nn.ModuleList(
                    BLOCKS[stack.kind](dim, spec.heads, stack.update) for _ in range(stack.size)
                )
                for s, stack in enumerate(spec.stacks)
            })
            self.norm_out = OutNorm(dim, spec.modulated_out)
            self.proj_out = nn.Linear(dim, IMAGE_CHANNELS)
            self.text_out = nn.Linear(dim, IMAGE_CHANNELS) if spec.text_out else None
        self.glue = spec.glue
        self.text_tokens = spec.text_tokens
        self.steps: list[tuple[int, int | None]] = []
        for s, stack in enumerate(spec.stacks):
            self.steps += [(s, i) for i in range(stack.size)]
            if s < len(spec.glue):
                self.steps.append((s, None))
        region = [s for s, stack in enumerate(spec.stacks) if stack.size >= 2]
        self.first = self.steps.index((region[0], 0))
        self.last = self.steps.index((region[-1], spec.stacks[region[-1]].size - 1))
        joins = [self.steps.index((s, None)) for s, kind in enumerate(spec.glue) if kind == "join"]
        self.joined = bool(joins)
        # the image stream leaving the blocks continues cat([txt, img]) of the first block's
        self.joins_in_rest = any(self.first < j <= self.last for j in joins)
        joins_in_tail = any(j > self.last for j in joins)
        self.rest_hands_on_text = spec.text_out or joins_in_tail  # the epilogue reads the text

    def run(self, steps, x, c, temb, cond):
        for s, i in steps:
            if i is None:
                x = glue(self.glue[s], x, c, cond)
            else:
                x, c = self.stacks[f"s{s}"][i](x, c, temb)
        return x, c

    def head(self, x_in, c_in, t, cond):
        """-> (the first block's image input, its outputs by stream, aux for rest and tail)."""
        temb = self.t_embed(t)
        c = self.c_embed(c_in) if self.c_embed is not None else None
        x, c = self.run(self.steps[: self.first], self.x_embed(x_in), c, temb, cond)
        block_input = x.clone()  # the first block may write into x in place
        x, c = self.run(self.steps[self.first : self.first + 1], x, c, temb, cond)
        return block_input, {"img": x, "txt": c}, (temb, cond)

    def rest(self, first, aux):
        steps = self.steps[self.first + 1 : self.last + 1]
        x, c = self.run(steps, first["img"], first["txt"], *aux)
        return {"img": x, "txt": c} if self.rest_hands_on_text else {"img": x}

    def tail(self, final, aux):
        temb = aux[0]
        x, c = self.run(self.steps[self.last + 1 :], final["img"], final.get("txt"), *aux)
        if self.joined:
            x = x[:, self.text_tokens :]
        out = self.proj_out(self.norm_out(x, temb))
        if self.text_out is not None:
            out = out + self.text_out(c.mean(dim=1, keepdim=True))
        return out

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
        calls.append(
            tuple(v + drift * torch.randn(v.shape, generator=generator) for v in calls[-1])
        )
    return calls


# --- strategies ------------------------------------------------------------------------------


@st.composite
def model_specs(draw) -> ModelSpec:
    image_tokens = draw(st.integers(4, 8))
    # Text as long as the image makes shape-based pairing of streams ambiguous.
    text = draw(st.sampled_from(("none", "same length", "any length")))
    if text == "none":
        text_tokens = None
    elif text == "same length":
        text_tokens = image_tokens
    else:
        text_tokens = draw(st.integers(4, 8))
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    sizes[draw(st.integers(0, len(sizes) - 1))] = draw(st.integers(2, 4))  # one stack at least
    # Stacks after the region run in the epilogue, which may read the text stream only where it
    # is shorter than the image: there they are image kinds, which leave the text as it is.
    last = max(s for s, size in enumerate(sizes) if size >= 2)
    kinds = IMAGE_KINDS + (JOINT_KINDS if text_tokens else ())
    stacks = tuple(
        StackSpec(kind=draw(st.sampled_from(kinds if s <= last else IMAGE_KINDS)), size=size,
                  update=draw(st.sampled_from(UPDATES)))
        for s, size in enumerate(sizes)
    )
    glues = GLUES if text_tokens and text_tokens < image_tokens else tuple(g for g in GLUES if g != "join")
    glue = tuple(draw(st.sampled_from(glues)) for _ in stacks[1:])
    if "join" in glue:  # one join; the stacks after it run on the joined stream
        k = glue.index("join")
        glue = tuple("none" if g == "join" and i != k else g for i, g in enumerate(glue))
        stacks = tuple(stack if s <= k or stack.kind in IMAGE_KINDS else replace(stack, kind="mlp")
                       for s, stack in enumerate(stacks))
    return ModelSpec(
        batch=draw(st.integers(1, 2)),
        dim=draw(st.sampled_from((8, 12, 16))),
        heads=draw(st.sampled_from((1, 2))),
        image_tokens=image_tokens,
        text_tokens=text_tokens,
        stacks=stacks,
        glue=glue,
        text_out=bool(text_tokens and text_tokens < image_tokens and draw(st.booleans())),
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


# 0 (which never skips) one time in five, else a threshold in the range models use.
THRESHOLDS = st.sampled_from((True, False, False, False, False)).flatmap(
    lambda zero: st.just(0.0) if zero else st.floats(0.01, 0.5)
)
scenarios = st.builds(
    Scenario,
    spec=model_specs(),
    threshold=THRESHOLDS,
    max_hits=st.integers(-1, 3),
    warmup=st.integers(0, 2),
    drifts=st.lists(st.sampled_from(DRIFTS), min_size=2, max_size=7).map(tuple),
)


# --- running a scenario ----------------------------------------------------------------------



def run_reference(model: RandomDenoiser, scenario: Scenario, calls) -> tuple[MarginReference, list]:
    joined = {"img": lambda first: torch.cat([first["txt"], first["img"]], dim=1)}
    reference = MarginReference(scenario.threshold, scenario.max_hits, scenario.warmup, main="img",
                                bases=joined if model.joins_in_rest else None)

    def rest(first, aux):
        # The model's blocks may write into their inputs; the reference reads `first` after.
        return model.rest({name: v if v is None else v.clone() for name, v in first.items()}, aux)

    outputs = [reference(model.head, rest, model.tail, *args) for args in calls]
    return reference, outputs


def run_backend(model: RandomDenoiser, scenario: Scenario, calls, compiler: str) -> list[tuple]:
    """Two generations of `calls` through the compiled model: (decisions, outputs) of each."""
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
    return generations


def assert_calls_close(actual: list, expected: list, tol: float, which=None) -> None:
    """`actual[i]` matches `expected[i]` for every call i (or every i where `which[i]`)."""
    for step, (out, ref) in enumerate(zip(actual, expected)):
        if which is None or which[step]:
            torch.testing.assert_close(out, ref, atol=tol, rtol=tol,
                                       msg=lambda m: f"call {step}: {m}")


def check_scenario(scenario: Scenario, compiler: str, tol: float, decision_margin: float) -> None:
    """Run `scenario` through the reference, the backend (two generations) and the model.

    Cases where the reference's change came within `decision_margin` (relative) of the
    threshold are discarded: there, rounding alone may flip a decision.
    """
    # Per example what conftest's `clean_dynamo` does per test: a fresh Dynamo (so no
    # recompile limit is reached) and fallback warnings that fire again.
    torch._dynamo.reset()
    notices._warned.clear()
    model = RandomDenoiser(scenario.spec).eval()
    calls = sampling_calls(scenario.spec, scenario.drifts)
    reference, expected = run_reference(model, scenario, calls)
    assume(all(margin > decision_margin for margin in reference.margins))
    uncached = [model(*args) for args in calls]
    generations = run_backend(model, scenario, calls, compiler)
    (decisions, outputs), (repeated_decisions, repeated_outputs) = generations
    event("some calls skipped" if any(decisions) else "no call skipped")
    if model.joins_in_rest:
        event("two stacks joined by a cat inside the region")

    assert decisions == tuple(reference.decisions)
    assert_calls_close(outputs, expected, tol)
    # A call that runs every block is the model itself, whatever the cache holds.
    assert_calls_close(outputs, uncached, tol, which=[not skipped for skipped in decisions])
    if scenario.threshold == 0 or scenario.max_hits == 0:
        assert not any(decisions)
    # A new generation after `reset` repeats the first one.
    assert repeated_decisions == decisions
    assert_calls_close(repeated_outputs, outputs, tol=0)


# --- tests ---------------------------------------------------------------------------------

# Shapes every run checks, whatever hypothesis draws besides.
FLUX_LIKE = Scenario(
    # Dual then single blocks, updates in place, text as long as the image; the last block
    # hands on a slice of its joint stream.
    spec=ModelSpec(batch=2, dim=8, heads=2, image_tokens=4, text_tokens=4,
                   stacks=(StackSpec("dual", 2, "iadd"), StackSpec("single", 2, "add_")),
                   glue=("cond",), text_out=False, modulated_out=True, seed=0),
    threshold=0.3, max_hits=-1, warmup=0, drifts=(0.0, 1e-3, 1.0, 0.0),
)
SLICES_UPDATED_IN_PLACE = Scenario(
    # The first block returns two slices of one tensor; the next one updates them in place.
    spec=ModelSpec(batch=1, dim=8, heads=1, image_tokens=4, text_tokens=3,
                   stacks=(StackSpec("single", 3, "iadd"),), glue=(), text_out=False,
                   modulated_out=False, seed=0),
    threshold=0.5, max_hits=-1, warmup=0, drifts=(0.0, 0.0),
)
JOINED_STACKS = Scenario(
    # ComfyUI's Flux: dual blocks, then cat([txt, img]) and blocks on the joined stream, which
    # the epilogue slices; the blocks update in place.
    spec=ModelSpec(batch=1, dim=8, heads=2, image_tokens=6, text_tokens=3,
                   stacks=(StackSpec("dual", 2, "iadd"), StackSpec("attention", 2, "iadd")),
                   glue=("join",), text_out=False, modulated_out=True, seed=0),
    threshold=0.3, max_hits=-1, warmup=0, drifts=(0.0, 1e-3, 1.0, 0.0),
)
TWO_STREAMS_OUT = Scenario(
    # The epilogue reads both streams, which the remaining blocks update in place.
    spec=ModelSpec(batch=1, dim=8, heads=1, image_tokens=5, text_tokens=4,
                   stacks=(StackSpec("mlp", 1, "add"), StackSpec("dual", 3, "iadd")),
                   glue=("none",), text_out=True, modulated_out=False, seed=0),
    threshold=0.5, max_hits=-1, warmup=0, drifts=(1e-3, 0.0),
)

# Each example compiles a model, so examples are slow by hypothesis's measure; the autouse
# `clean_dynamo` and `no_fallback` fixtures are meant per test (check_scenario redoes their
# per-example part). The explain phase would rerun a failing example dozens of times.
SLOW_EXAMPLES = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    phases=[phase for phase in Phase if phase is not Phase.explain],
)


def with_fixed_shapes(test):
    """Run `test` on the fixed scenarios above too."""
    for scenario in (FLUX_LIKE, SLICES_UPDATED_IN_PLACE, JOINED_STACKS, TWO_STREAMS_OUT):
        test = example(scenario=scenario)(test)
    return test


@settings(max_examples=20, **SLOW_EXAMPLES)
@given(scenario=scenarios)
@with_fixed_shapes
def test_random_models_match_reference(scenario: Scenario, no_fallback) -> None:
    check_scenario(scenario, "eager", tol=1e-6, decision_margin=1e-5)


# Inductor compiles C++ for each piece (seconds per model): the fixed shapes and one drawn
# case that can skip. The drawn case is the same every run (so conftest's on-disk Inductor
# cache serves later runs) and is not shrunk (that would compile hundreds of models; the
# eager test shrinks what both tests find).
@settings(max_examples=1, derandomize=True,
          **{**SLOW_EXAMPLES, "phases": [Phase.explicit, Phase.generate]})
@given(scenario=scenarios.filter(lambda s: s.threshold > 0 and s.max_hits != 0))
@with_fixed_shapes
def test_random_models_match_reference_inductor(scenario: Scenario, no_fallback) -> None:
    check_scenario(scenario, "inductor", tol=1e-4, decision_margin=1e-2)
