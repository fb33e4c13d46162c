"""Find the block stack a frame runs in, from the module tree and the Python call stack.

Where Dynamo cannot keep a model's block stack in one graph (a graph break inside a block, or
between blocks in the loop that runs them), it does not compile the model's `forward` at all
(it cannot resume inside a loop): the forward runs as Python, and the blocks' `forward`s (and
any function the model calls) reach the backend as frames of their own, whose graphs know
nothing above them. The model's forward is still on the Python call stack, running its own
code: this module reads it there.

    Python call stack (innermost first)      found
    ---------------------------------------  -------------------------------------------
    Block.forward           (being compiled)
    Module._call_impl       self = blocks[2]
    Model.forward           self = owner     owner runs its own code (not code Dynamo
    OptimizedModule ...                      compiled) and holds repeated containers
                                             => Stack(owner, anchor(owner))

A model whose forward Dynamo compiles is not found here, even in a graph of a later piece:
a compiled frame runs code that Dynamo rewrote, not the model's own.

Rules (the same idea of a block as `passes/find_blocks.py`, read from modules, not graphs):
- a *repeated container* is a `ModuleList` or `Sequential` directly held by a module, with
  two or more composite items (modules that hold submodules; plain layers are no blocks);
- the owner is the outermost module on the call stack that runs a method of its own class
  (not `nn.Module`'s call machinery) and holds a repeated container;
- the container the cache is put around (`anchor`) is the owner's repeated container with
  the most parameters (the first on a tie): FLUX's single blocks, HiDream's single-stream
  blocks. The owner's other containers run every block, each compiled.
- the owner's variables (`owner_variables`, read where block 0 is called): those of its
  innermost running method, its parameters then its locals in the order its code names
  them; the first that holds one of the blocks' streams is the main stream (`stack_cache`).
Nothing here changes a module.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Stack:
    """`owner.<container>` is the repeated container the cache is put around."""

    owner: torch.nn.Module
    container: str

    @property
    def blocks(self) -> list[torch.nn.Module]:
        return [m for m in getattr(self.owner, self.container) if _composite(m)]


def enclosing_stack() -> Stack | None:
    """The stack whose owner runs, as Python, around the frame Dynamo compiles now (None
    where no module on the call stack runs its own code and holds a repeated container)."""
    owner = None
    for module, code in _running_methods():  # innermost first: the last found is outermost
        if code in _own_codes(type(module)) and repeated_containers(module):
            owner = module
    return Stack(owner, anchor(owner)) if owner is not None else None


def owner_variables(owner: torch.nn.Module) -> list[object]:
    """The values of the variables of the innermost method of `owner`'s own class on this
    thread's call stack, in the order its code names them: its parameters after `self`, then
    its locals in the order they first appear (empty where none runs). The first of them
    that holds a stream of the blocks is the owner's main stream: diffusers'
    `hidden_states = self.x_embedder(hidden_states)`, ComfyUI's `img = self.img_in(img)`, or
    `img` of `img, txt = self.img_in(latent), self.txt_in(text)`."""
    codes = _own_codes(type(owner))
    frame = sys._getframe(1)
    while frame is not None:
        code, values = frame.f_code, frame.f_locals
        if code in codes and code.co_argcount and values.get(code.co_varnames[0]) is owner:
            return [values[name] for name in (*code.co_varnames[1:], *code.co_cellvars) if name in values]
        if code.co_name.startswith(RESUME_PREFIX) and any(value is owner for value in values.values()):
            # the rest of the owner's method after a graph break: Dynamo passes its stack
            # (`___stack0`, ...) and then the method's live variables, by their own names
            return [values[name] for name in (*code.co_varnames, *code.co_cellvars)
                    if name in values and not name.startswith("___") and values[name] is not owner]
        frame = frame.f_back
    return []


# Dynamo runs the rest of a frame after a graph break as a function it makes, named so
# (`torch_dynamo_resume_in_forward_at_702`); where it cannot compile it, it runs as Python.
RESUME_PREFIX = "torch_dynamo_resume_in_"


def modules_on_call_stack() -> list[torch.nn.Module]:
    """The modules whose methods are running on this thread, innermost first."""
    found: list[torch.nn.Module] = []
    for module, _ in _running_methods():
        if not any(module is m for m in found):
            found.append(module)
    return found


def _running_methods() -> list[tuple[torch.nn.Module, object]]:
    """(module, code) of each Python frame on this thread whose first argument is a module."""
    found = []
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code.co_argcount:
            first = frame.f_locals.get(code.co_varnames[0])
            if isinstance(first, torch.nn.Module):
                found.append((first, code))
        frame = frame.f_back
    return found


def _own_codes(cls: type) -> frozenset[object]:
    """The code objects of the methods `cls` and its bases up to `nn.Module` define (and of
    what their decorators wrap)."""
    codes = set()
    for klass in cls.__mro__:
        if klass is torch.nn.Module:
            break
        for value in vars(klass).values():
            for function in (value, getattr(value, "__wrapped__", None)):
                if hasattr(function, "__code__"):
                    codes.add(function.__code__)
    return frozenset(codes)


def repeated_containers(owner: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, container) of each repeated container `owner` holds directly."""
    return [
        (name, child) for name, child in owner.named_children()
        if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential))
        and sum(map(_composite, child)) >= 2
    ]


def anchor(owner: torch.nn.Module) -> str | None:
    """The name of `owner`'s repeated container that holds the most parameters (the most
    work to skip: HiDream's 49 caption projections are small layers, its 32 single-stream
    blocks are the model)."""
    containers = repeated_containers(owner)
    if not containers:
        return None
    return max(containers, key=lambda item: sum(p.numel() for p in item[1].parameters()))[0]


def _composite(module: torch.nn.Module) -> bool:
    return next(module.children(), None) is not None
