"""`passes/find_streams.py` on hand-built Dynamo graphs: identity paths and the regions an
output reads.

Each graph is a tiny function traced by Dynamo with a backend that only keeps the graph
(no compiler runs); the pass is then called on its nodes directly:

- `trace_stream`: every op that writes "first argument + something" (add in all its forms,
  sub, addcmul/addcdiv, baddbmm/addmm, in-place forms, slices written in place) leads back to
  its first argument; ops that do not (a product with a tensor, the subtrahend, a `beta`
  other than 1) do not; hypothesis chains random updates of two streams, returned in either
  order, and checks each leads back to its own input;
- `read_regions`/`parts_read`: the region an epilogue slices off a concatenation is followed
  back through the ops between them, to the part it came from, whatever the parts' sizes.
"""

from __future__ import annotations

import torch
import torch._dynamo
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphs import traced

from wavepass.passes.find_streams import parts_read, read_regions, trace_stream




def arguments(gm, *names: str) -> list:
    """The graph inputs of the function's arguments `names` (Dynamo names them `l_{name}_`,
    in the order the function first uses them; the global `W` is an input too)."""
    by_name = {n.name: n for n in gm.graph.find_nodes(op="placeholder")}
    return [by_name[f"l_{name}_"] for name in names]


def returned(gm) -> list:
    """The nodes the graph returns, in order."""
    (output,) = gm.graph.find_nodes(op="output")
    return list(output.args[0])


def origin(gm, value) -> object:
    """The placeholder `value` continues along an identity path (None if none)."""
    return trace_stream(value, list(gm.graph.find_nodes(op="placeholder")), set(gm.graph.nodes))


W = torch.randn(8, 8)


def iadd(x, y):
    x += y
    return x


# Each writes `x` plus something computed from `x` and `y`; the identity path runs through x.
RESIDUAL_UPDATES = {
    "add": lambda x, y: x + torch.tanh(y @ W),
    "add, stream second": lambda x, y: torch.tanh(y @ W) + x,
    "iadd": lambda x, y: iadd(x, torch.tanh(y @ W)),
    "add_": lambda x, y: x.add_(torch.tanh(y @ W)),
    "torch.add alpha": lambda x, y: torch.add(x, torch.tanh(y @ W), alpha=0.5),
    "method add alpha": lambda x, y: x.add(y @ W, alpha=2.0),
    "sub": lambda x, y: x - y @ W,
    "addcmul": lambda x, y: torch.addcmul(x, y @ W, torch.sigmoid(y)),
    "addcmul method": lambda x, y: x.addcmul(y @ W, torch.sigmoid(y), value=0.3),
    "addcmul_": lambda x, y: x.addcmul_(y @ W, torch.sigmoid(y)),
    "addcdiv": lambda x, y: torch.addcdiv(x, y @ W, 2 + torch.sigmoid(y)),
    "addcdiv_": lambda x, y: x.addcdiv_(y @ W, 2 + torch.sigmoid(y)),
    "baddbmm": lambda x, y: torch.baddbmm(x, y, W.expand(y.shape[0], 8, 8)),
    "baddbmm alpha": lambda x, y: torch.baddbmm(x, y, W.expand(y.shape[0], 8, 8), alpha=0.5),
    "scaled": lambda x, y: (x + y @ W) / 2.0,
    "cast": lambda x, y: (x.double() + (y @ W).double()).float(),
}

# Each is computed from `x`, but is not `x` plus something (`y - x` continues `y`).
NOT_RESIDUAL = {
    "product": lambda x, y: x * torch.sigmoid(y),
    "subtrahend": lambda x, y: y - x,
    "alpha on x": lambda x, y: torch.add(y, x, alpha=0.5),
    "beta": lambda x, y: torch.baddbmm(x, y, W.expand(y.shape[0], 8, 8), beta=0.5),
    "broadcast into": lambda x, y: torch.addcmul(x[:, :1], y, y),
    "matmul": lambda x, y: x @ W + y,
    "norm": lambda x, y: F.layer_norm(x, (8,)) + y,
}


def test_every_residual_op_leads_back_to_its_first_argument():
    for name, update in RESIDUAL_UPDATES.items():
        gm = traced(lambda x, y: update(x, y) * 1.0, torch.randn(2, 3, 8), torch.randn(2, 3, 8))
        x, y = arguments(gm, "x", "y")
        assert origin(gm, returned(gm)[0]) is x, name


def test_addmm_leads_back_to_its_first_argument():
    gm = traced(lambda x, y: torch.addmm(x, y, W) * 1.0, torch.randn(3, 8), torch.randn(3, 8))
    assert origin(gm, returned(gm)[0]) is arguments(gm, "x")[0]


def test_other_ops_do_not_lead_back_to_x():
    for name, update in NOT_RESIDUAL.items():
        gm = traced(update, torch.randn(2, 3, 8), torch.randn(2, 3, 8))
        assert origin(gm, returned(gm)[0]) is not arguments(gm, "x")[0], name


def test_a_slice_written_in_place_keeps_the_stream():
    """`x[:, :n] += y` keeps the node of `x` (Dynamo writes through `setitem`): what follows
    reads `x`, which the trace reaches."""

    def block(x, y):
        x[:, :2] += torch.tanh(y[:, :2] @ W)
        return torch.addcmul(x, y @ W, torch.sigmoid(y))

    gm = traced(block, torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    assert origin(gm, returned(gm)[0]) is arguments(gm, "x")[0]


def test_a_slice_of_a_concatenation_leads_back_to_its_part():
    """FLUX's single blocks: `h = cat([txt, img])`, updated, then `h[:, T:]` is the image."""

    def single(img, txt):
        h = torch.cat([txt, img], dim=1)
        h = torch.addcmul(h, torch.tanh(h @ W), torch.sigmoid(h))
        return h[:, txt.shape[1]:], h[:, : txt.shape[1]]

    for text_tokens in (2, 5, 9):
        gm = traced(single, torch.randn(1, 5, 8), torch.randn(1, text_tokens, 8))
        img, txt = arguments(gm, "img", "txt")
        out_img, out_txt = returned(gm)
        assert (origin(gm, out_img), origin(gm, out_txt)) == (img, txt), text_tokens


UPDATE_NAMES = sorted(RESIDUAL_UPDATES)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    x_updates=st.lists(st.sampled_from(UPDATE_NAMES), min_size=1, max_size=4),
    c_updates=st.lists(st.sampled_from(UPDATE_NAMES), min_size=1, max_size=4),
    swapped=st.booleans(),
    text_tokens=st.sampled_from((2, 3, 5)),
)
def test_two_streams_each_lead_back_to_their_own_input(x_updates, c_updates, swapped, text_tokens):
    """Two streams updated by random residual ops that read each other (a joint block),
    returned in either order: each leads back to its own input, never the other's."""

    def block(x, c):
        for update_x, update_c in zip(x_updates, c_updates):
            summary_x, summary_c = x.mean(1, keepdim=True), c.mean(1, keepdim=True)
            x = RESIDUAL_UPDATES[update_x](x, x * summary_c)
            c = RESIDUAL_UPDATES[update_c](c, c * summary_x)
        return (c, x) if swapped else (x, c)

    gm = traced(block, torch.randn(1, 3, 8), torch.randn(1, text_tokens, 8))
    x, c = arguments(gm, "x", "c")
    out = returned(gm)
    out_x, out_c = (out[1], out[0]) if swapped else out
    assert origin(gm, out_x) is x
    assert origin(gm, out_c) is c


def epilogue_regions(epilogue, img_tokens: int, text_tokens: int):
    """The parts of `cat([txt, img])` that `epilogue(h, temb, T)` reads of `h`, the
    concatenation rescaled; and the nodes of txt and img."""

    def model(img, txt, temb):
        h = torch.cat([txt, img], dim=1) * 2.0
        return epilogue(h, temb, txt.shape[1])

    gm = traced(model, torch.randn(1, img_tokens, 8), torch.randn(1, text_tokens, 8), torch.randn(1, 8))
    img, txt = arguments(gm, "img", "txt")
    (joined,) = [n for n in gm.graph.nodes if n.target is torch.cat]
    (h,) = joined.users
    (output,) = gm.graph.find_nodes(op="output")
    tail = {n for n in gm.graph.nodes if n not in {img, txt, joined, h} and n.op != "placeholder"}
    regions = read_regions(output, {h}, tail)[h]
    return {part for region in regions for part in parts_read([txt, img], 1, region)}, txt, img


EPILOGUES = {
    # ComfyUI's Flux: the image sliced off, an AdaLN-modulated norm, a linear
    "flux": lambda h, temb, t: F.linear(
        F.layer_norm(h[:, t:], (8,)) * (1 + temb[:, None]) + temb[:, None], W).reshape(-1, 8),
    # the slice after the token-wise ops
    "slice last": lambda h, temb, t: F.silu(F.rms_norm(h, (8,)) * temb[:, None]).to(torch.float64)[:, t:],
}


@given(img_tokens=st.integers(1, 6), text_tokens=st.integers(1, 9), epilogue=st.sampled_from(sorted(EPILOGUES)))
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_the_region_an_epilogue_slices_maps_to_its_part(img_tokens, text_tokens, epilogue):
    """However long the text is, the epilogue reads the image part of the joined stream."""
    read, txt, img = epilogue_regions(EPILOGUES[epilogue], img_tokens, text_tokens)
    assert read == {img}


def test_ops_that_mix_tokens_read_every_part():
    """Attention over all tokens (or a mean over them) before the slice reads the text too."""
    mixing = lambda h, temb, t: torch.softmax(h @ h.transpose(1, 2), -1) @ h  # noqa: E731
    read, txt, img = epilogue_regions(lambda h, temb, t: mixing(h, temb, t)[:, t:], 3, 4)
    assert read == {txt, img}
    read, txt, img = epilogue_regions(lambda h, temb, t: h[:, t:] + h.mean(1, keepdim=True), 3, 4)
    assert read == {txt, img}


def test_a_size_read_from_a_value_is_no_data_of_it():
    """`h[:, txt.shape[1]:]` under dynamic shapes: the size of `txt` (a symbolic input) bounds
    the slice and is added to the output, but is no data of `txt`; the region read is still
    the image, its bounds symbolic."""

    def model(img, txt):
        h = torch.cat([txt, img], dim=1) * 2.0
        return (h[:, txt.shape[1]:] @ W) + txt.shape[1]

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=keep, fullgraph=True, dynamic=True)(torch.randn(1, 4, 8), torch.randn(1, 3, 8))
    (gm,) = graphs
    img, txt = arguments(gm, "img", "txt")
    (joined,) = [n for n in gm.graph.nodes if n.target is torch.cat]
    (h,) = joined.users
    (output,) = gm.graph.find_nodes(op="output")
    tail = {n for n in gm.graph.nodes if n.op != "placeholder"} - {joined, h}
    regions = read_regions(output, {h, txt}, tail)
    assert set(regions) == {h}
    assert {p for region in regions[h] for p in parts_read([txt, img], 1, region)} == {img}
