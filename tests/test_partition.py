"""`passes/partition.py` on hand-built Dynamo graphs, and its rule end to end.

The models are small denoisers built from a `Spec`: a prologue embeds a latent (B, N, 4) and
a text (B, T, 6), a stack of joint blocks updates both streams, an optional second stack runs
on the joined stream `cat((txt, img))` (ComfyUI's Flux), an optional trailing stack runs on
the image cut into patches (a decoder head the cache cannot take), and the epilogue reads the
image (sliced off the joined stream) and, optionally, the text.

- the pass itself (`partition`, `backend._first_partition`) on the captured graph: which
  first-block output decides, and that a cut it cannot prove raises `UnsafeCut`;
- end to end (`torch.compile(..., backend="wavespeed", options={"compiler": "eager"})`): the
  decisions and outputs of every call equal those of `ReferenceFBCache`, which is told the
  rule (the image decides; a joined stream continues `cat((txt0, img0))`) and runs the
  model's own stages. Hypothesis draws the number of blocks, the op that writes the
  residuals (add, addcmul, in place returning the op's result or `x` itself, whose node
  Dynamo keeps, sub, add with alpha, a slice written in place), the
  order the blocks return their streams in, text longer, shorter or as long as the image,
  code between blocks, a joined stack and a smaller trailing stack.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, assume, example, given, settings
from hypothesis import strategies as st

from graphs import traced
from torch import nn

import wavepass
from fbcache_reference import MarginReference, ReferenceFBCache
from wavepass import notices
from wavepass.backend import _first_partition
from wavepass.passes.errors import UnsafeCut
from wavepass.passes.find_blocks import find_blocks
from wavepass.passes.partition import partition

DIM = 8
UPDATES = ("add", "addcmul", "iadd", "addcmul_", "kept", "sub", "alpha", "slice")


def update(kind: str, x: torch.Tensor, delta: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """`x` plus something computed from `delta` and `gate`, written the way `kind` says."""
    if kind == "add":
        return x + gate * delta
    if kind == "addcmul":  # ComfyUI's Wan 2.1
        return torch.addcmul(x, delta, gate)
    if kind == "iadd":
        x += gate * delta
        return x
    if kind == "addcmul_":
        return x.addcmul_(delta, gate)
    if kind == "kept":  # in place, returning x itself: Dynamo keeps the node of x
        x.addcmul_(delta, gate)
        return x
    if kind == "sub":
        return x - gate * delta
    if kind == "alpha":
        return torch.add(x, gate * delta, alpha=0.5)
    if kind == "slice":  # a slice written in place keeps the node of x, then an addition
        x[:, :1] += delta[:, :1]
        return x + gate * delta
    raise ValueError(kind)


@dataclass(frozen=True)
class Spec:
    blocks: int  # joint blocks (the first stack), 2 or more
    update: str  # how every block writes its residuals
    swapped: bool  # the joint blocks return (txt, img) instead of (img, txt)
    image_tokens: int
    text_tokens: int
    between: bool  # top-level code after each joint block
    joined: int  # blocks of a second stack on cat((txt, img)), 0 for none
    trailing: int  # blocks of a trailing stack on the image cut into patches, 0 for none
    text_out: bool  # the epilogue reads the text too
    seed: int = 0


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(F.layer_norm(x, (x.shape[-1],)))))


class JointBlock(nn.Module):
    """Both streams read a summary of both (attention stand-in); each writes its residual."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.kind, self.swapped = spec.update, spec.swapped
        self.mix, self.img_mlp, self.txt_mlp = nn.Linear(DIM, DIM), MLP(), MLP()
        self.gates = nn.Linear(DIM, 2 * DIM)

    def forward(self, img, txt, temb):
        summary = torch.tanh(self.mix(torch.cat([txt, img], dim=1))).mean(dim=1, keepdim=True)
        gate_img, gate_txt = torch.sigmoid(self.gates(temb)).unsqueeze(1).chunk(2, dim=-1)
        img = update(self.kind, img, self.img_mlp(img + summary), gate_img)
        txt = update(self.kind, txt, self.txt_mlp(txt + summary), gate_txt)
        return (txt, img) if self.swapped else (img, txt)


class StreamBlock(nn.Module):
    """One stream: `x + gate * mlp(x)`, written the block's way."""

    def __init__(self, kind: str, dim: int = DIM) -> None:
        super().__init__()
        self.kind = kind
        self.fc1, self.fc2, self.gate = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim), nn.Linear(DIM, dim)

    def forward(self, x, temb):
        delta = self.fc2(F.silu(self.fc1(F.layer_norm(x, (x.shape[-1],)))))
        return update(self.kind, x, delta, torch.sigmoid(self.gate(temb)).unsqueeze(1))


class Denoiser(nn.Module):
    """`forward(x, c, t)`, written as the stages `ReferenceFBCache` runs."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec
        with torch.random.fork_rng():
            torch.manual_seed(spec.seed)
            self.x_embed, self.c_embed, self.t_embed = nn.Linear(4, DIM), nn.Linear(6, DIM), nn.Linear(1, DIM)
            stacks = {"joint": nn.ModuleList(JointBlock(spec) for _ in range(spec.blocks))}
            if spec.joined:
                stacks["single"] = nn.ModuleList(StreamBlock(spec.update) for _ in range(spec.joined))
            if spec.trailing:  # over patches: half the channels, twice the tokens
                stacks["patches"] = nn.ModuleList(StreamBlock("add", DIM // 2) for _ in range(spec.trailing))
            self.stacks = nn.ModuleDict(stacks)
            self.modulation, self.proj_out = nn.Linear(DIM, 2 * DIM), nn.Linear(DIM, 4)
            self.text_proj = nn.Linear(DIM, 4) if spec.text_out else None

    def joint(self, blocks, img, txt, temb):
        for block in blocks:
            if self.spec.between and block is not self.stacks["joint"][0]:  # top-level code between blocks
                img = img * 0.5 + 0.5 * torch.tanh(temb).unsqueeze(1)
            out = block(img, txt, temb)
            img, txt = (out[1], out[0]) if self.spec.swapped else out
        return img, txt

    def head(self, x, c, t):
        """-> (the first block's image input, its outputs by stream, aux)."""
        temb = F.silu(self.t_embed(t[:, None]))
        img, txt = self.x_embed(x), self.c_embed(c)
        block_input = img.clone()  # the first block may write into img in place
        img, txt = self.joint(self.stacks["joint"][:1], img, txt, temb)
        return block_input, {"img": img, "txt": txt}, temb

    def rest(self, first, temb):
        img, txt = first["img"].clone(), first["txt"].clone()  # the blocks may write in place
        img, txt = self.joint(self.stacks["joint"][1:], img, txt, temb)
        if self.spec.joined:
            h = torch.cat((txt, img), dim=1)
            for block in self.stacks["single"]:
                h = block(h, temb)
            return {"h": h, "txt": txt} if self.spec.text_out else {"h": h}
        return {"img": img, "txt": txt} if self.spec.text_out else {"img": img}

    def tail(self, final, temb):
        img = final["h"][:, self.spec.text_tokens:] if self.spec.joined else final["img"]
        if self.spec.trailing:
            patches = img.reshape(img.shape[0], -1, DIM // 2)
            for block in self.stacks["patches"]:
                patches = block(patches, temb)
            img = patches.reshape(img.shape)
        shift, scale = self.modulation(temb).unsqueeze(1).chunk(2, dim=-1)
        out = self.proj_out(F.layer_norm(img, (DIM,)) * (1 + scale) + shift)
        if self.text_proj is not None:
            out = out + self.text_proj(final["txt"].mean(dim=1, keepdim=True))
        return out

    def forward(self, x, c, t):
        _, first, temb = self.head(x, c, t)
        return self.tail(self.rest(first, temb), temb)

    def reference(self, threshold: float) -> ReferenceFBCache:
        """The rule: the image decides; a joined stream continues cat((txt0, img0))."""
        joined = {"h": lambda first: torch.cat((first["txt"], first["img"]), dim=1)}
        return MarginReference(threshold, main="img", bases=joined if self.spec.joined else None)

    def expected_blocks(self) -> tuple[str, ...]:
        """The blocks the backend caches: the joint and joined stacks, never the trailing one."""
        blocks = [f"stacks.joint.{i}" for i in range(self.spec.blocks)]
        return tuple(blocks + [f"stacks.single.{i}" for i in range(self.spec.joined)])



def calls(spec: Spec, drifts: tuple) -> list[tuple[torch.Tensor, ...]]:
    """Random first inputs (x, c, t), then each call drifts from the one before by the given
    size, or sizes (of x, c and t)."""
    generator = torch.Generator().manual_seed(spec.seed)
    shapes = ((2, spec.image_tokens, 4), (2, spec.text_tokens, 6), (2,))
    inputs = [tuple(torch.randn(shape, generator=generator) for shape in shapes)]
    for drift in drifts:
        sizes = drift if isinstance(drift, tuple) else (drift,) * 3
        inputs.append(tuple(v + size * torch.randn(v.shape, generator=generator) for v, size in zip(inputs[-1], sizes)))
    return inputs




def far_from_threshold(holds: bool) -> None:
    assert holds, "the reference's change came too close to the threshold: pick other drifts"


def check_against_reference(spec: Spec, threshold: float, drifts: tuple[float, ...],
                            require=far_from_threshold) -> list[bool]:
    """Every call's decision and output through the backend equal the reference's; returns the
    decisions. Cases where the reference's change came close to the threshold, where rounding
    alone may flip a decision, go to `require(False)`."""
    torch._dynamo.reset()
    notices._warned.clear()
    wavepass.reset()
    model = Denoiser(spec).eval()
    inputs = calls(spec, drifts)
    reference = model.reference(threshold)
    expected = [reference(model.head, model.rest, model.tail, *args) for args in inputs]
    require(all(margin > 1e-4 for margin in reference.margins))
    compiled = torch.compile(model, backend="wavespeed", fullgraph=True,
                             options={"residual_diff_threshold": threshold, "compiler": "eager"})
    outputs = [compiled(*args) for args in inputs]
    stats = wavepass.stats(model)
    assert stats.reason is None, stats.reason
    (program,) = wavepass.runtime.programs_of(model)
    assert program.blocks == model.expected_blocks()
    assert stats.decisions == tuple(reference.decisions)
    for call, (out, ref) in enumerate(zip(outputs, expected)):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"call {call}: {m}")
    return list(reference.decisions)


FLUX_TEXT_LONGER = Spec(blocks=2, update="iadd", swapped=False, image_tokens=3, text_tokens=7, between=False,
                        joined=2, trailing=0, text_out=False)
WAN = Spec(blocks=3, update="addcmul", swapped=False, image_tokens=5, text_tokens=4, between=False, joined=0,
           trailing=0, text_out=False)
BOTH_STREAMS_OUT = Spec(blocks=3, update="add", swapped=True, image_tokens=3, text_tokens=9, between=True,
                        joined=0, trailing=0, text_out=True)
IN_PLACE = Spec(blocks=3, update="kept", swapped=True, image_tokens=4, text_tokens=6, between=False, joined=2,
                trailing=0, text_out=True)
DECODER_HEAD = Spec(blocks=2, update="add", swapped=False, image_tokens=4, text_tokens=4, between=False,
                    joined=3, trailing=2, text_out=False)
# Repeat a call, move the text alone, then the image alone, then the timestep, then the image:
# the old rules (the text deciding, the first block's output deciding) skip other calls.
DRIFTS = ((0.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.05, 0.0, 0.0), (0.0, 0.0, 0.02), (0.02, 0.0, 0.0))


# --- the pass on the captured graph ----------------------------------------------------------


def first_partition(spec: Spec):
    model = Denoiser(spec).eval()
    return _first_partition(traced(model, *calls(spec, ())[0]))[0]


@pytest.mark.parametrize("spec", [FLUX_TEXT_LONGER, BOTH_STREAMS_OUT], ids=["joined", "both streams out"])
def test_the_image_decides_however_long_the_text(spec):
    """Defect: the main stream was the largest. The image decides by data flow (the epilogue
    slices it off the joined stream) or by role (its first-block input comes from the latent)."""
    part = first_partition(spec)
    assert part.signal_source.meta["example_value"].shape[1] == spec.image_tokens != spec.text_tokens


def test_addcmul_residuals_are_measured_from_the_block_input():
    """Defect: `torch.addcmul(x, y, gate)` was no residual path, and the signal silently became
    the first block's output. Now it is output minus the copied input."""
    part = first_partition(WAN)
    head = {n.name: n for n in part.head.gm.graph.nodes}
    signal = head["wavepass_signal"]
    assert signal.target is torch.sub and signal.args[1] is head["wavepass_block_input"]


class GatedNoResidual(nn.Module):
    """A block whose output is not its input plus something: `x * sigmoid(f(x))`."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(DIM, DIM)

    def forward(self, x):
        return x * torch.sigmoid(self.f(x))


class NoResidualModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.out = nn.Linear(4, DIM), nn.Linear(DIM, 4)
        self.blocks = nn.ModuleList(GatedNoResidual() for _ in range(3))

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x)


def test_no_residual_path_is_an_unsafe_cut_that_says_so():
    """Never silently another signal: the model runs uncached, with the reason."""
    model = NoResidualModel().eval()
    x = torch.randn(2, 3, 4)
    gm = traced(model, x)
    with pytest.raises(UnsafeCut, match="no residual path"):
        partition(gm, find_blocks(gm)[0])
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="wavespeed", options={"residual_diff_threshold": 10.0, "compiler": "eager"})
    with pytest.warns(UserWarning, match="no residual path"):
        for _ in range(3):
            torch.testing.assert_close(compiled(x), model(x))
    stats = wavepass.stats(model)
    assert (stats.calls, stats.hits) == (3, 0) and "no residual path" in stats.reason


def test_a_trailing_stack_the_cut_cannot_take_leaves_the_main_stacks_cached():
    """Defect: the joint region failed, and the fallback cached the largest stack alone."""
    part = first_partition(DECODER_HEAD)
    cached = tuple(block.path for block in part.region.blocks)
    assert cached == Denoiser(DECODER_HEAD).expected_blocks()


# --- the rule end to end -----------------------------------------------------------------------


@pytest.mark.parametrize("spec", [FLUX_TEXT_LONGER, WAN, BOTH_STREAMS_OUT, IN_PLACE, DECODER_HEAD],
                         ids=["joined, text longer", "addcmul", "both streams out", "in place", "decoder head"])
def test_each_defect_follows_the_reference(spec, no_fallback):
    decisions = check_against_reference(spec, threshold=0.02, drifts=DRIFTS)
    assert 0 < sum(decisions) < len(decisions)


@st.composite
def specs(draw) -> Spec:
    image_tokens = draw(st.integers(2, 5))
    text = draw(st.sampled_from(("shorter", "same", "longer")))
    text_tokens = {"shorter": max(1, image_tokens - draw(st.integers(1, 2))), "same": image_tokens,
                   "longer": image_tokens + draw(st.integers(1, 4))}[text]
    return Spec(
        blocks=draw(st.integers(2, 4)),
        update=draw(st.sampled_from(UPDATES)),
        swapped=draw(st.booleans()),
        image_tokens=image_tokens,
        text_tokens=text_tokens,
        between=draw(st.booleans()),
        joined=draw(st.sampled_from((0, 0, 2, 3))),
        trailing=draw(st.sampled_from((0, 0, 2))),
        text_out=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
          phases=[phase for phase in Phase if phase is not Phase.explain])
@given(spec=specs(), threshold=st.sampled_from((0.0, 0.05, 0.3)),
       drifts=st.lists(st.sampled_from((0.0, 1e-3, 1.0)), min_size=2, max_size=5).map(tuple))
@example(spec=FLUX_TEXT_LONGER, threshold=0.05, drifts=(0.0, 1e-3, 1.0, 0.0, 1e-3))
def test_random_models_follow_the_reference(spec, threshold, drifts, no_fallback):
    check_against_reference(spec, threshold, drifts, require=assume)



class TextLaterInPlace(nn.Module):
    """The first block updates the image; later ones also update the text in place (its node
    kept), and top-level code between them reads the text the epilogue uses."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_x, self.embed_c = nn.Linear(4, DIM), nn.Linear(6, DIM)
        self.img_blocks = nn.ModuleList(StreamBlock("add") for _ in range(3))
        self.txt_blocks = nn.ModuleList(StreamBlock("kept") for _ in range(3))
        self.out, self.text_out = nn.Linear(DIM, 4), nn.Linear(DIM, 4)

    def forward(self, x, c, t):
        temb = t[:, None].expand(-1, DIM)
        img, txt = self.embed_x(x), self.embed_c(c)
        doubled = None
        for i, (img_block, txt_block) in enumerate(zip(self.img_blocks, self.txt_blocks)):
            img = img_block(img, temb)
            if i > 0:
                txt_block(txt, temb)  # in place: `txt` keeps its node
            if i == 1:
                doubled = txt * 2.0  # between the blocks, after a write into txt
        return self.out(img) + self.text_out(doubled.mean(dim=1, keepdim=True))


def test_code_between_blocks_reads_what_the_blocks_wrote():
    """A value computed between the blocks from a stream they write in place stays after the
    write (it is no stream-free value to compute before the blocks); every computed call is
    the model's."""
    torch.manual_seed(0)
    model = TextLaterInPlace().eval()
    compiled = torch.compile(model, backend="wavespeed", options={"residual_diff_threshold": 0.0, "compiler": "eager"})
    for args in calls(WAN, (1.0, 1.0)):
        torch.testing.assert_close(compiled(*args), model(*args))
    assert wavepass.stats(model).reason is None
