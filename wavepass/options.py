"""The `options=` of `torch.compile(..., backend="wavespeed")`, validated once at compile time."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

COMPILERS = ("inductor", "eager")


@dataclass(frozen=True)
class CacheOptions:
    """First Block Cache settings.

    residual_diff_threshold: skip the remaining blocks when the first block's residual moved
        less than this (relative mean absolute difference) since the last fully computed
        call. 0 never skips.
    max_consecutive_cache_hits: at most this many skipped calls in a row; -1 no limit,
        0 never skip.
    warmup_steps: calls after a reset that always run every block.
    compiler: "inductor" compiles every piece with Inductor; "eager" runs the same cached
        program without compiling (debugging, fast tests).
    inductor: Inductor config patches (e.g. {"max_autotune": True}), applied to every piece
        over `compilers.PIECE_PATCHES` (pieces skip Inductor's per-input size asserts).
    outline_blocks: compile each distinct block structure once per piece and call it for
        every block of that structure (False: Inductor inlines every block).
    bundle_kernels: build each piece's C++ kernels (CPU) as one library instead of one
        library per kernel (`cpp_bundle.py`); the kernels are the same.
    """

    residual_diff_threshold: float = 0.12
    max_consecutive_cache_hits: int = -1
    warmup_steps: int = 0
    compiler: str = "inductor"
    inductor: dict[str, Any] = field(default_factory=dict)
    outline_blocks: bool = True
    bundle_kernels: bool = True

    @classmethod
    def from_dict(cls, options: dict[str, Any] | None) -> CacheOptions:
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"wavespeed: unknown option(s) {unknown}; valid options are {sorted(known)} "
                "(Inductor settings go in options={'inductor': {...}})"
            )
        return cls(**options)

    def __post_init__(self) -> None:
        threshold = self.residual_diff_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or threshold < 0:
            raise ValueError(
                f"wavespeed: residual_diff_threshold must be a finite number >= 0 (0 disables "
                f"skipping; 0.05-0.2 is typical), got {threshold!r}"
            )
        _check_int("max_consecutive_cache_hits", self.max_consecutive_cache_hits, -1,
                   "-1 for no limit, 0 to never skip, or n >= 1")
        _check_int("warmup_steps", self.warmup_steps, 0, "an integer >= 0")
        if self.compiler not in COMPILERS:
            raise ValueError(f"wavespeed: compiler must be one of {COMPILERS}, got {self.compiler!r}")
        if not isinstance(self.inductor, dict):
            raise ValueError(f"wavespeed: inductor must be a dict of Inductor config patches, got {self.inductor!r}")
        for name in ("outline_blocks", "bundle_kernels"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"wavespeed: {name} must be True or False, got {getattr(self, name)!r}")

    @property
    def may_skip(self) -> bool:
        return self.residual_diff_threshold > 0 and self.max_consecutive_cache_hits != 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_int(name: str, value: Any, minimum: int, valid: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"wavespeed: {name} must be {valid}, got {value!r}")
