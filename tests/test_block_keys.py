"""Keys that cannot lie (issue 29).

A block structure's key names the tensor type (a subclass with its inner tensors) and dtype
of every input, so two same-shaped models, one with plain weights and one with quantized
weights (a tensor subclass), never share block code. Every key wavepass puts into an on-disk
cache names wavepass's sources, and whether a block graph runs without AOTAutograd's
wrappers is read from the AOTAutograd entry actually loaded, never from a verdict on disk.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
from torch import nn
from torch.utils._pytree import tree_map

import wavepass
from test_compiled_blocks import Stack, dynamo_graph
from wavepass import block_op, pipeline, torch_api
from wavepass.cpp_bundle import Kernel, bundle_source
from wavepass.passes.outline_blocks import outline_blocks, structural_key


class QuantWeight(torch.Tensor):
    """A toy quantized weight: int8 data and a float scale, dequantized by every op it
    meets (`__torch_dispatch__`), as GGUF and quantized loaders' weights are."""

    @staticmethod
    def __new__(cls, qdata: torch.Tensor, scale: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, qdata.shape, dtype=scale.dtype, device=qdata.device,
                                                   requires_grad=False)

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor):
        self.qdata, self.scale = qdata, scale

    def __tensor_flatten__(self):
        return ["qdata", "scale"], None

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        return QuantWeight(inner["qdata"], inner["scale"])

    def dequantize(self) -> torch.Tensor:
        return self.qdata.to(self.scale.dtype) * self.scale

    def __repr__(self) -> str:
        return f"QuantWeight({self.dequantize()})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            return QuantWeight(func(args[0].qdata), func(args[0].scale))

        def plain(t):
            return t.dequantize() if isinstance(t, QuantWeight) else t

        return func(*tree_map(plain, args), **tree_map(plain, kwargs or {}))


def quantized(model: nn.Module) -> nn.Module:
    """`model` with every Linear weight a `QuantWeight` (8 bits, one scale per weight)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            weight = module.weight.detach()
            scale = weight.abs().amax() / 127
            del module.weight
            module.weight = nn.Parameter(QuantWeight(torch.round(weight / scale).to(torch.int8), scale),
                                         requires_grad=False)
    return model


def _key(fn, *inputs):
    return structural_key(torch.fx.symbolic_trace(fn).graph, inputs)


def test_a_structure_names_the_tensor_type_and_dtype_of_every_input():
    def block(x, w):
        return torch.nn.functional.linear(x, w).relu()

    x, w = torch.randn(2, 8), torch.randn(8, 8)
    scale = w.abs().amax() / 127
    quant = QuantWeight(torch.round(w / scale).to(torch.int8), scale)
    wide = QuantWeight(torch.round(w / scale).to(torch.int16), scale)
    plain = _key(block, x, w)
    assert plain == _key(block, torch.randn(2, 8), torch.randn(8, 8))
    assert plain != _key(block, x, quant)  # same shape, dtype and strides outside: another program
    assert _key(block, x, quant) != _key(block, x, wide)  # the inner tensors' dtypes count
    assert plain != _key(block, x, w.to(torch.bfloat16))
    assert _key(block, x, quant) == _key(block, torch.randn(2, 8), quant)


def test_plain_and_quantized_models_get_their_own_block_code(no_fallback):
    """Two same-shaped models in one process, one with quantized weights: the quantized one
    never calls the block graph compiled for plain weights (its blocks, on a subclass, are
    not called by name), and each equals its own eager model."""
    torch.manual_seed(0)
    plain = Stack(2, [False] * 4).eval()
    quant = quantized(copy.deepcopy(plain))
    inputs = (torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 4))
    options = {"residual_diff_threshold": 0.0}
    compiled_plain = torch.compile(plain, backend="wavespeed", options=options)
    torch.testing.assert_close(compiled_plain(*inputs), plain(*inputs))
    compiled_quant = torch.compile(quant, backend="wavespeed", options=options)
    expected = quant(*inputs)
    assert not torch.allclose(expected, plain(*inputs), atol=1e-4)  # the weights differ
    torch.testing.assert_close(compiled_quant(*inputs), expected)
    torch.testing.assert_close(compiled_plain(*inputs), plain(*inputs))

    def names(model):
        (program,) = wavepass.runtime.programs_of(model)
        return {s.name for piece in (program._head, program._rest) for s in getattr(piece, "structures", ())}

    assert names(plain) and not names(plain) & names(quant)


def test_on_disk_keys_name_wavepass_sources(monkeypatch):
    """The structures' names (in the pieces' Inductor and AOTAutograd cache keys) and the
    bundles' sources (their library keys) change with wavepass's sources."""
    key = block_op.source_key()
    assert len(key) == 20 and key == block_op.source_key()
    kernel = Kernel(["const float*", "float*"], 'extern "C" void kernel(const float* a, float* b) { b[0] = a[0]; }')
    assert bundle_source([kernel]).splitlines()[0] == f"// wavepass {key}"

    inputs = (torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 4))
    gm, _ = dynamo_graph(Stack(1, [False] * 3).eval(), *inputs)
    outlined = outline_blocks(gm)
    before = pipeline.structure_names(outlined, ())
    monkeypatch.setattr(pipeline, "source_key", lambda: "another wavepass")
    after = pipeline.structure_names(outlined, ())
    assert before and before.keys() == after.keys() and set(before.values()).isdisjoint(after.values())


def test_the_bare_verdict_comes_from_the_entry_loaded(no_fallback, monkeypatch):
    """A block graph runs bare as the AOTAutograd entry it was compiled to or loaded from
    says; nothing under Inductor's cache folder speaks for it. An entry whose metadata says
    an input is mutated keeps the wrappers."""
    torch.manual_seed(0)
    plain = Stack(2, [False] * 4).eval()
    inputs = (torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 4))

    def runs(model):
        (program,) = wavepass.runtime.programs_of(model)
        return [type(s.run).__name__ for piece in (program._head, program._rest)
                for s in getattr(piece, "structures", ())]

    compiled = torch.compile(plain, backend="wavespeed", options={"residual_diff_threshold": 0.0})
    torch.testing.assert_close(compiled(*inputs), plain(*inputs))
    assert set(runs(plain)) == {"CompiledFxGraph"}

    entry = torch_api.aot_entry

    def mutating(compiled_fn):
        found = entry(compiled_fn)
        metadata = SimpleNamespace(**{**vars(found.runtime_metadata), "num_mutated_inp_runtime_indices": 1})
        return SimpleNamespace(runtime_metadata=metadata, maybe_subclass_meta=None)

    monkeypatch.setattr(torch_api, "aot_entry", mutating)
    torch._dynamo.reset()
    wavepass.reset()
    other = copy.deepcopy(plain)
    for block in other.blocks:  # another structure: compiled (or loaded) anew, not found live
        block.mlp[1] = nn.Tanh()
    compiled_other = torch.compile(other, backend="wavespeed", options={"residual_diff_threshold": 0.0})
    torch.testing.assert_close(compiled_other(*inputs), other(*inputs))
    assert runs(other) and "CompiledFxGraph" not in runs(other)
