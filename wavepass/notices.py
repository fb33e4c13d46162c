"""The one way wavepass tells a user that caching or compiling stopped: once per reason.

Every message names the real cause and the fix. It is a Python warning (category
`WavespeedWarning`, a `UserWarning`), shown once per distinct message in a process (and routed
to logging at WARNING level by `logging.captureWarnings(True)`, as servers do);
`wavepass.stats(model).reason` keeps saying it for as long as it holds.

`compile_failure(error)` gives those words for an error a compiled call raised, when the error
is the compiler's (Dynamo, Inductor, wavepass) rather than the model's: the integrations then
run the plain model instead of failing the user's sampling.
"""

from __future__ import annotations

import warnings

from . import process_state

_warned: set[str] = set()
process_state.owns("warnings given", _warned)


class WavespeedWarning(UserWarning):
    """Caching or compilation is off for some calls; the message says why and what to do."""


def warn_once(message: str, stacklevel: int = 3) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, WavespeedWarning, stacklevel=stacklevel)


# A sampling schedule of fewer model steps than this is too short for any skip to pay: on the
# benchmarks' trained FLUX models no policy skips a step of a 4-step schedule below threshold
# 0.3, and the one skip it takes at 0.5 leaves the image at 28 dB PSNR; at 8 steps `predictive`
# skips 1-2 steps at 38-48 dB (docs/performance.md#few-step-schedules).
FEW_STEPS = 5


def warn_if_too_few_steps(steps: int, stacklevel: int = 3) -> bool:
    """Say once (per step count) that a sampling schedule of `steps` model steps is too short
    for the cache to pay, and what to do; True where it is. The integrations call it at the
    start of a run that may skip (ComfyUI's node, `apply_wavespeed`)."""
    if steps >= FEW_STEPS:
        return False
    warn_once(f"wavespeed: a {steps}-step schedule is too short for First Block Cache to pay: "
              f"below {FEW_STEPS} steps each step moves the image too far for a skipped one to "
              "reuse the last (no step skipped at threshold <= 0.3 on the benchmarks' 4-step runs, "
              "and a skip at 0.5 cost them 28 dB PSNR), so the cache only adds the cost of its "
              "decision. Keep compiling but remove the cache (threshold 0), or sample with more "
              "steps (docs/performance.md#few-step-schedules)", stacklevel=stacklevel + 1)
    return True


# Where a compiler failure is raised from: Dynamo, AOTAutograd, Inductor, FX (which re-raises
# the errors of the graphs it generated) and wavepass itself (its passes raise at compile time,
# inside Dynamo's BackendCompilerFailed; its runtime raises "wavespeed: ..." errors while a
# compiled program runs), or code the compiler generated.
_COMPILER_MODULES = ("torch._dynamo", "torch._functorch", "torch._inductor", "wavepass")
_COMPILER_FILES = tuple(f"{sep}{path}{sep}".replace("/", sep) for sep in ("/", "\\")
                        for path in ("torch/_dynamo", "torch/_functorch", "torch/_inductor", "torch/fx"))


def compile_failure(error: BaseException, user_errors: tuple[type[BaseException], ...] = ()) -> str | None:
    """If `error` (raised by a call of a model compiled with `wavespeed`) is a failure of the
    compiler, the words that name it and the fix; None for anything else: the model's own
    errors, out of memory, an interrupt (KeyboardInterrupt, or one of `user_errors` anywhere
    in its chain of causes), which must reach the user as they are.

    Compiler failures: Dynamo's errors (`torch._dynamo.exc`: an internal error, a backend that
    failed, Unsupported code under fullgraph=True, ...) and Inductor's, and errors raised in
    wavepass's own code. Dynamo also reports some errors of the model itself as its own
    (TorchRuntimeError: an operator failed on fake tensors); the integrations tell them apart
    by running the plain model on the same inputs, which raises the model's error again.
    """
    import torch

    chain, seen = [], set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        chain.append(link)
        link = link.__cause__ or getattr(link, "inner_exception", None) or link.__context__
    never = (KeyboardInterrupt, SystemExit, MemoryError, getattr(torch, "OutOfMemoryError", MemoryError),
             *user_errors)
    if any(isinstance(e, never) for e in chain):
        return None
    if not (_from_compiler_module(type(error)) or _raised_in_compiler(error)):
        return None
    what = f"{type(error).__name__}: {_first_line(error)}"
    exc = getattr(getattr(torch, "_dynamo", None), "exc", None)
    if exc is not None and isinstance(error, getattr(exc, "Unsupported", ())):
        return (f"fullgraph=True and Dynamo cannot trace it as one graph ({what}). Fix: turn "
                f"fullgraph off (Compile Model+'s `fullgraph`, torch.compile's fullgraph=False) "
                f"to compile around the graph break, or remove the code Dynamo names")
    inner = getattr(error, "inner_exception", None)  # BackendCompilerFailed
    if isinstance(inner, BaseException):
        what = f"{type(error).__name__}, from {type(inner).__name__}: {_first_line(inner)}"
        if type(inner).__module__.startswith("torch._inductor") or _raised_in(inner, "inductor"):
            return (f"Inductor failed to compile its graph ({what}). Fix: try Compile Model+'s "
                    f"mode 'default' without Inductor options, or caching alone (Apply First "
                    f"Block Cache without Compile Model+; diffusers: compile=False), or another "
                    f"PyTorch version; report it to PyTorch if it persists")
        return (f"the wavespeed backend failed to compile its graph ({what}). Fix: please report "
                f"it to wavepass with this message")
    if _raised_in(error, "wavepass"):
        return (f"wavespeed's cached program failed ({what}). Fix: please report it to wavepass "
                f"with this message")
    return (f"torch.compile failed on it ({what}), an error of PyTorch's compiler, not of the "
            f"model. Fix: try another PyTorch version, or report it to PyTorch with this message")


def _from_compiler_module(cls: type) -> bool:
    return any(c.__module__ == m or c.__module__.startswith(m + ".") for c in cls.__mro__
               for m in _COMPILER_MODULES)


def _raised_in_compiler(error: BaseException) -> bool:
    return _raised_in(error, "wavepass") or _raised_in(error, "torch") or _raised_in(error, "compiled")


def _raised_in(error: BaseException, package: str) -> bool:
    """Whether `error` was raised by code of `package` (wavepass: any of its modules; torch:
    its compiler's modules only; inductor: Inductor's; compiled: code the compiler generated,
    FX graphs and Inductor's output), judged by the innermost frame of its traceback."""
    import os

    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    if package == "wavepass":
        return os.path.abspath(filename).startswith(os.path.dirname(os.path.abspath(__file__)) + os.sep)
    if package == "compiled":
        return filename.startswith("<eval_with_key>") or _in_inductor_cache(filename)
    if package == "inductor":
        return any(f"{sep}torch{sep}_inductor{sep}" in filename for sep in ("/", "\\"))
    return any(part in filename for part in _COMPILER_FILES)


def _in_inductor_cache(filename: str) -> bool:
    import os

    from . import torch_api

    try:
        folder = os.path.abspath(torch_api.api("inductor_cache_dir")())
    except torch_api.Missing:  # another torch: not judged by this
        return False
    return os.path.abspath(filename).startswith(folder + os.sep)


def _first_line(error: BaseException, limit: int = 300) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else "(no message)"
    return line if len(line) <= limit else line[:limit] + "..."
