"""The `options=` of `torch.compile(..., backend="wavespeed")`, validated at compile time.

Two kinds of option, kept apart on purpose:

- **Cache settings** (`CacheSettings`: threshold, hit limit, warm-up) are run-time values.
  `options=` gives a compiled program its defaults; `wavepass.cache_settings(...)` overrides
  them for the calls made inside it, read by the cached program at every call. Changing
  them compiles nothing.
- **Compile options** (`compiler`, `mode`, `inductor`, `outline_blocks`, `bundle_kernels`)
  decide what Inductor builds. They are part of the backend Dynamo compiled with, so other
  values are another compile (and another entry against Dynamo's recompile limit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

COMPILERS = ("inductor", "eager")
POLICIES = ("fbcache", "taylor", "predictive", "accumulated")
EXTRAPOLATING = ("taylor", "predictive", "accumulated")  # the policies whose skipped calls extrapolate
PREDICTING = ("predictive", "accumulated")  # the policies that compare with the extrapolated signal
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class CacheSettings:
    """First Block Cache's decision rule, read at every call.

    residual_diff_threshold: skip the remaining blocks when the first block's residual moved
        less than this (relative mean absolute difference) since the last fully computed
        call ("predictive": from its extrapolation). 0 never skips.
    max_consecutive_cache_hits: at most this many skipped calls in a row; -1 no limit,
        0 never skip.
    warmup_steps: calls after a reset that always run every block.
    policy: what a skipped call adds to the first block's output (`POLICIES`):
        "fbcache": the residual the skipped blocks produced at the last computed call
            (First Block Cache);
        "taylor": that residual extrapolated to this call along its change between the last
            two computed calls (first-order TaylorSeer): r + (r - r_prev) * n / m, n calls
            since the last computed one, m calls between the last two. It keeps one more
            residual per stream and adds one multiply-add per stream on a skipped call.
        "predictive": taylor's residuals, and the decision compares the first block's
            residual with that residual extrapolated the same way, s + (s - s_prev) * n / m,
            instead of with s: a call is skipped while the model moves as the last two
            computed calls predict, which is when the extrapolated residuals are right. One
            more first-block residual in memory and one multiply-add per call. Its thresholds
            sit lower than fbcache's for the same quality (docs/performance.md).
        "accumulated": predictive's residuals and comparison, and the decision bounds the error
            accumulated since the last computed call (as MagCache and EasyCache do with their
            own estimates): a call is skipped while the sum of the changes predictive compares,
            over the calls skipped since the last computed one and this call, stays below the
            threshold. Long runs of skipped calls, each a little off, end sooner; its
            thresholds sit higher than predictive's for the same quality (docs/performance.md).
            No more memory than predictive; one float per cache context.
        The extrapolating policies fall back to fbcache's rule until two calls were computed.
    """

    residual_diff_threshold: float = 0.12
    max_consecutive_cache_hits: int = -1
    warmup_steps: int = 0
    policy: str = "fbcache"

    def __post_init__(self) -> None:
        threshold = self.residual_diff_threshold
        if (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                or not math.isfinite(threshold) or threshold < 0):
            raise ValueError(
                f"wavespeed: residual_diff_threshold must be a finite number >= 0 (0 disables "
                f"skipping; 0.05-0.2 is typical), got {threshold!r}"
            )
        _check_int("max_consecutive_cache_hits", self.max_consecutive_cache_hits, -1,
                   "-1 for no limit, 0 to never skip, or n >= 1")
        _check_int("warmup_steps", self.warmup_steps, 0, "an integer >= 0")
        if self.policy not in POLICIES:
            raise ValueError(f"wavespeed: policy must be one of {POLICIES}, got {self.policy!r}")

    @property
    def may_skip(self) -> bool:
        return self.residual_diff_threshold > 0 and self.max_consecutive_cache_hits != 0

    @classmethod
    def check_overrides(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        """`overrides` (some of the settings), validated; an unknown name is an error."""
        _check_names(overrides, SETTING_NAMES, "wavepass.cache_settings")
        cls(**overrides)  # each field is validated on its own, the others at their defaults
        return dict(overrides)


SETTING_NAMES = frozenset(f.name for f in fields(CacheSettings))


@dataclass(frozen=True)
class CacheOptions:
    """Everything `options=` may hold: the default `settings`, and how pieces are compiled.

    compiler: "inductor" compiles every piece with Inductor; "eager" runs the same cached
        program without compiling (debugging, fast tests).
    mode: Inductor's mode for every piece ("max-autotune", "reduce-overhead", ...). torch
        refuses `mode=` beside `options=`; here it is one more option, so that equal settings
        compare equal and Dynamo reuses what it compiled.
    inductor: Inductor config patches (e.g. {"max_autotune": True}), applied to every piece
        over `compiler_interface.PIECE_PATCHES` (pieces skip Inductor's per-input size asserts).
    outline_blocks: compile each distinct block structure once per piece and call it for
        every block of that structure (False: Inductor inlines every block).
    bundle_kernels: build each piece's C++ kernels (CPU) as one library instead of one
        library per kernel (`cpp_bundle.py`); the kernels are the same.
    """

    settings: CacheSettings = field(default_factory=CacheSettings)
    compiler: str = "inductor"
    mode: str | None = None
    inductor: dict[str, Any] = field(default_factory=dict)
    outline_blocks: bool = True
    bundle_kernels: bool = True

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> CacheOptions:
        options = dict(options or {})
        compile_names = {f.name for f in fields(cls)} - {"settings"}
        _check_names(options, compile_names | SETTING_NAMES, "wavespeed",
                     " (Inductor settings go in options={'inductor': {...}})")
        settings = CacheSettings(**{k: options.pop(k) for k in SETTING_NAMES & set(options)})
        return cls(settings=settings, **options)

    def __post_init__(self) -> None:
        if self.compiler not in COMPILERS:
            raise ValueError(f"wavespeed: compiler must be one of {COMPILERS}, got {self.compiler!r}")
        if self.mode not in MODES:
            raise ValueError(f"wavespeed: mode must be one of {MODES}, got {self.mode!r}")
        if not isinstance(self.inductor, dict):
            raise ValueError(f"wavespeed: inductor must be a dict of Inductor config patches, got {self.inductor!r}")
        for name in ("outline_blocks", "bundle_kernels"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"wavespeed: {name} must be True or False, got {getattr(self, name)!r}")


def _check_names(given: dict[str, Any], valid: set[str] | frozenset[str], who: str, hint: str = "") -> None:
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ValueError(f"{who}: unknown option(s) {unknown}; valid options are {sorted(valid)}{hint}")


def _check_int(name: str, value: Any, minimum: int, valid: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"wavespeed: {name} must be {valid}, got {value!r}")
