"""`torch.ops.wavepass.blocks`: run a block structure that was compiled once, on its own.

    blocks(str name, int[] carry, Tensor[] operands) -> Tensor[]

A piece that calls a structure through this operator does not lower the structure itself:
Inductor emits one call per chain of blocks (its fake outputs are the structure's recorded
outputs), and the call runs the structure's compiled code once per block. So a structure
that occurs in two pieces (FLUX's or SD3's block 0 in `head`, the other blocks of its stack
in `rest`) is lowered and built once, and the pieces' AOTAutograd traces do not run the
structure again per block. A chain: the first block takes `operands[:len(carry)]`; each
further block takes, at input i, output `carry[i]` of the block before it, or where that is
-1 the next of its own operands (its weights, the shared conditioning).

`name` is a hash of the structure's program, its inputs' sizes and strides (tensor type and
dtype of every input included), Inductor options, the autocast it is compiled under and wavepass's own
sources (`source_key`), so equal names are equal programs: a piece in Inductor's on-disk
cache calls the structure by the same name in a new process, and a piece cached by another
wavepass calls none of this one's structures. Structures are static:
a structure whose sizes are symbolic is not called through this operator (Inductor's code
for it could rest on facts about the symbols that only its own graph's guards check). Each
compiled piece holds its structures (`Structure`); the registry only refers to them, so a
structure lives as long as a piece that calls it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import weakref
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import process_state, torch_api

TensorSpec = tuple[tuple[int, ...], tuple[int, ...], torch.dtype, torch.device]  # sizes, strides, dtype, device
_registry: weakref.WeakValueDictionary[str, Structure] = weakref.WeakValueDictionary()
process_state.owns("compiled block structures", _registry)


@dataclass(eq=False)
class Structure:
    """A compiled block structure (`key`: its `structural_key`): `run(operands)`, which takes
    a list of its operands (and may clear it), and its outputs' (sizes, strides, dtype,
    device), all static."""

    name: str
    key: Hashable
    run: Callable[..., Any]
    outputs: tuple[TensorSpec, ...]


# The modules whose code decides what wavepass's on-disk cache entries hold beyond the graphs
# Inductor keys them by: the block call and its code generation (here), how block graphs
# are keyed, named, cut and compiled, the bundles' binding, the torch internals used. The
# passes that decide where a graph is cut (partition, find_blocks, find_streams) are not
# listed: the graphs they hand Inductor are in its keys already.
_KEYED_SOURCES = ("block_op.py", "pipeline.py", "compiler_interface.py", "cpp_bundle.py", "torch_api.py",
                  "passes/outline_blocks.py", "passes/call_compiled_blocks.py", "passes/call_blocks_directly.py",
                  "passes/fx_facts.py", "passes/subgraph.py")


@functools.cache
def source_key() -> str:
    """A hash of wavepass's version and of the sources of `_KEYED_SOURCES`: part of every
    key wavepass puts into an on-disk cache (the structures' names, which the pieces'
    Inductor and AOTAutograd cache entries hold; the bundles' sources). What such an entry
    holds beyond its graph (a piece's code calling `run_blocks`, a block graph keyed and cut
    by these passes, a bundle's binding) is decided by these sources, which Inductor's own
    keys do not see: an entry another wavepass wrote is never found (vLLM keys its compile
    cache on its passes' source the same way)."""
    from . import __version__

    package = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256(f"wavepass {__version__}".encode())
    for name in _KEYED_SOURCES:
        digest.update(name.encode())
        with open(os.path.join(package, name), "rb") as source:
            digest.update(source.read())
    return digest.hexdigest()[:20]


def tensor_specs(values: Iterable[torch.Tensor]) -> tuple[TensorSpec, ...]:
    """(sizes, strides, dtype, device) of each of `values`, as `Structure.outputs` holds them."""
    return tuple((tuple(v.shape), tuple(v.stride()), v.dtype, v.device) for v in values)


def registered(name: str) -> Structure | None:
    """The live structure registered under `name`, if any."""
    return _registry.get(name)


def register(structure: Structure) -> Structure:
    """Make `structure` callable by its name; the caller keeps it alive."""
    _registry[structure.name] = structure
    return structure


def run_blocks(name: str, carry: Sequence[int], operands: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Run a chain of blocks of structure `name` (see the module docstring); return the last
    block's outputs."""
    run = _registry[name].run
    outputs = run(list(operands[: len(carry)]))
    if len(operands) == len(carry):  # one block
        return list(outputs)
    fresh = [position for position, source in enumerate(carry) if source < 0]
    for start in range(len(carry), len(operands), len(fresh)):
        args = [outputs[source] if source >= 0 else None for source in carry]
        for position, operand in zip(fresh, operands[start : start + len(fresh)]):
            args[position] = operand
        outputs = run(args)
    return list(outputs)


_library = torch.library.Library("wavepass", "DEF")
_library.define("blocks(str name, int[] carry, Tensor[] operands) -> Tensor[]")
_library.impl("blocks", run_blocks, "CompositeExplicitAutograd")


@torch.library.register_fake("wavepass::blocks", lib=_library)
def _blocks_fake(name: str, carry: Sequence[int], operands: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.empty_strided(sizes, strides, dtype=dtype, device=device)
            for sizes, strides, dtype, device in _registry[name].outputs]


BLOCKS = torch.ops.wavepass.blocks.default


def call_directly_from_inductor() -> None:
    """Make Inductor's Python wrapper call `run_blocks` itself where a graph calls
    `wavepass.blocks`: the dispatcher would convert every operand (a block's weights
    included) on the way in and out, ~1.4 us per tensor here, more than the rest of a call.
    Inductor's hook for this is private (`torch_api`, feature `direct_block_calls`): on a
    torch without it the generated code goes through the dispatcher, with the same results."""
    if not torch_api.enabled("direct_block_calls"):
        return
    codegen = torch_api.api("CUSTOM_EXTERN_KERNEL_CODEGEN")
    key = f"torch.ops.{BLOCKS.namespace}.{BLOCKS.__name__}"
    if key in codegen:
        return
    virtualized = torch_api.api("V")

    def python(node: Any, writeline: Callable[[str], None]) -> None:
        virtualized.graph.wrapper_code.add_import_once(f"from {__name__} import run_blocks as wavepass_run_blocks")
        args = ", ".join([*node.codegen_args(), *node.codegen_kwargs()])
        writeline(f"{node.get_name()} = wavepass_run_blocks({args})")

    codegen[key] = torch_api.api("CustomCodegen")(python=python)
