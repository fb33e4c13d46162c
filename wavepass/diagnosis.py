"""Why a model runs without wavepass: the words `stats(model).reason` and the one warning use.

Read-only questions to Dynamo about a model the user asked to compile with `wavespeed`:

- `why_uncompiled(module)`: no program of ours ran for a call (`runtime.watch` saw it). The
  usual cause is Dynamo's recompile limit: every `torch.compile` of the same class with
  other backend options, dtypes or guards adds a compiled version of its `forward` (or of
  `nn.Module._call_impl`, which `nn.Module.compile` and the diffusers integration enter);
  at `torch._dynamo.config.recompile_limit` versions Dynamo runs it uncompiled for the rest
  of the process, silently but for one log line.
- `frame_outside(watched)`: while the backend compiles a graph, whether Dynamo is compiling
  a frame *inside* the watched model (one block's `forward`) rather than the model's own,
  which means the model's frame was not compiled and its blocks reach us one by one.

Each answer names the real cause and the fix. Every private Dynamo API read here is
optional (looked up through `torch_api`): without it the answer is less specific, never wrong.
"""

from __future__ import annotations

import torch

from . import torch_api


def why_uncompiled(module: torch.nn.Module) -> str:
    """Why calls of `module` reach no wavespeed program."""
    name = type(module).__name__
    try:
        config = torch_api.api("dynamo_config")
    except torch_api.Missing:
        config = None
    if getattr(config, "disable", False):
        return ("Dynamo is disabled in this process (torch._dynamo.config.disable or "
                "TORCHDYNAMO_DISABLE=1); unset it to compile and cache")
    limit = getattr(config, "recompile_limit", None)
    for what, code in _entry_codes(module):
        versions = _compiled_versions(code)
        if limit is not None and versions is not None and versions >= limit:
            return (f"Dynamo hit torch._dynamo.config.recompile_limit ({limit}) for "
                    f"{what} ({versions} compiled versions) and runs it uncompiled "
                    f"for the rest of this process. Each torch.compile of this code with other "
                    f"backend options, dtypes, input shapes or model architectures adds a version; "
                    f"wavepass's cache settings (threshold, hit limit, warm-up, start/end) are "
                    f"run-time values and add none. Fix: restart the process with fewer compile "
                    f"variants of the model, or raise torch._dynamo.config.recompile_limit "
                    f"before compiling")
    return (f"Dynamo did not compile {name}.forward (a frame it skips: torch.compiler.disable, "
            f"a skipped module, or a model called outside torch.compile); compile the model "
            f"itself: torch.compile(model, backend='wavespeed')")


def frame_outside(watched: torch.nn.Module | None) -> str | None:
    """If Dynamo is compiling the forward of a module *inside* `watched` (not `watched`'s
    own), why: the frame, and why the model's own frame was not compiled."""
    frame_self = _frame_self()
    if watched is None or frame_self is None or frame_self is watched:
        return None
    if not any(m is frame_self for m in watched.modules()):
        return None
    return (f"Dynamo compiled `{type(frame_self).__name__}.forward` inside "
            f"{type(watched).__name__} on its own, not {type(watched).__name__}.forward with its "
            f"block stack: {why_uncompiled(watched)}")


def _entry_codes(module: torch.nn.Module) -> list[tuple[str, object]]:
    """(what to call it, code object) of each code Dynamo may have compiled for calls of
    `module`: its forward (the code inside any decorator on it), and `nn.Module._call_impl`."""
    forward = type(module).forward
    codes = [(f"{type(module).__name__}.forward", f) for f in (forward, getattr(forward, "__wrapped__", None))]
    codes += [(f"nn.Module.{f.__name__} (the frame nn.Module.compile enters)", f)
              for f in (torch.nn.Module._call_impl, torch.nn.Module._wrapped_call_impl)]
    return [(what, f.__code__) for what, f in codes if hasattr(f, "__code__")]


def _compiled_versions(code) -> int | None:
    """How many compiled versions Dynamo holds for `code` (None: this torch does not say)."""
    try:
        entries = torch_api.api("debug_get_cache_entry_list")
    except torch_api.Missing:
        return None
    return len(entries(code))


def _frame_self() -> object | None:
    """The first argument of the frame Dynamo is compiling now (`self` of a forward)."""
    try:
        tx = torch_api.api("InstructionTranslator").current_tx()
    except (torch_api.Missing, AttributeError):
        return None
    if tx is None:
        return None
    code = tx.f_code
    if code.co_argcount == 0:
        return None
    return tx.f_locals.get(code.co_varnames[0])
