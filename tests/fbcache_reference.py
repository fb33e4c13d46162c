"""An independent First Block Cache, in plain Python, for tests to compare the backend against.

A model under test is written as three eager stages:

    head(*inputs)       -> (block_input, first_outputs, aux)   prologue + first block
    rest(first_outputs, aux) -> final_streams                   the remaining blocks
    tail(final_streams, aux) -> output                          epilogue

`first_outputs` and `final_streams` are dicts of tensors keyed by stream name; `final_streams`
holds the streams the epilogue reads, and `main` names the stream whose first-block residual
(`first_outputs[main] - block_input`) decides. A final stream continues the first output of
its name, or `bases[name](first_outputs)` where given (e.g. a concatenation of two streams
that two stacks are joined by). The rule is the one docs/design.md#decisions states.

`policy="taylor"`: a skipped call adds the residuals extrapolated along their change between
the last two computed calls, `r + (r - r_prev) * n / m` (n calls since the last computed
call, m calls between the last two computed ones), where two computed calls exist.

`policy="predictive"`: the same residuals as taylor, and the decision compares the first-block
residual with the first-block residual extrapolated the same way (where two computed calls
exist), instead of with the last computed one.

`policy="accumulated"`: predictive's residuals and comparison; a call is skipped only while
the changes compared at every call skipped since the last computed call, and at this one,
add up to less than the threshold. (Written from that sentence: the reference keeps the
changes of the current run of skipped calls in a list and sums it.)
"""

from __future__ import annotations

import torch


class ReferenceFBCache:
    def __init__(self, threshold: float, max_consecutive_hits: int = -1, warmup_steps: int = 0,
                 main: str = "img", bases=None, policy: str = "fbcache"):
        self.threshold = threshold
        self.policy = policy
        self.bases = dict(bases or {})
        self.max_hits = max_consecutive_hits
        self.warmup = warmup_steps
        self.main = main
        self.reset()

    def reset(self) -> None:
        self.signal = None
        self.residuals = None
        self.history = []  # (call number, residuals, signal) of the last two computed calls, newest last
        self.calls = 0
        self.hits_in_row = 0
        self.decisions: list[bool] = []
        self.skipped_changes: list[float] = []  # the changes compared at the calls skipped since the last computed one

    def _skip(self, signal: torch.Tensor) -> bool:
        self.calls += 1
        if (
            self.threshold <= 0
            or self.max_hits == 0
            or self.signal is None
            or self.calls <= self.warmup
            or 0 < self.max_hits <= self.hits_in_row
        ):
            return False
        expected = self.signal
        if self.policy in ("predictive", "accumulated") and len(self.history) == 2:
            expected = self._extrapolate(self.history[0][2], self.history[1][2])
        change = ((signal - expected).abs().mean() / expected.abs().mean()).item()
        if self.policy != "accumulated":
            return change < self.threshold
        if sum(self.skipped_changes) + change < self.threshold:
            self.skipped_changes.append(change)
            return True
        return False

    def _extrapolate(self, older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
        """`newer` (last computed call) carried on to this call along its change since `older`."""
        (before, *_), (last, *_) = self.history
        return newer + (newer - older) * ((self.calls - last) / (last - before))

    def _residuals(self) -> dict:
        if self.policy not in ("taylor", "predictive", "accumulated") or len(self.history) < 2:
            return self.residuals
        older, newer = self.history[0][1], self.history[1][1]
        return {name: self._extrapolate(older[name], newer[name]) for name in newer}

    def _base(self, name: str, first: dict) -> torch.Tensor:
        return self.bases[name](first) if name in self.bases else first[name]

    def decide(self, signal: torch.Tensor) -> bool:
        """The decision of one call, given its first-block residual on the main stream."""
        skip = self._skip(signal)
        self.decisions.append(skip)
        if skip:
            self.hits_in_row += 1
        return skip

    def skipped(self, first: dict) -> dict:
        """The final streams of a skipped call: each stream's base plus its stored residual."""
        return {name: self._base(name, first) + residual for name, residual in self._residuals().items()}

    def computed(self, first: dict, final: dict, signal: torch.Tensor) -> None:
        """What a computed call leaves for the calls after it."""
        self.residuals = {name: final[name] - self._base(name, first) for name in final}
        self.history = (self.history + [(self.calls, self.residuals, signal)])[-2:]
        self.signal = signal
        self.hits_in_row = 0
        self.skipped_changes = []

    def __call__(self, head, rest, tail, *inputs):
        block_input, first, aux = head(*inputs)
        signal = first[self.main] - block_input
        if self.decide(signal):
            final = self.skipped(first)
        else:
            final = rest(dict(first), aux)
            self.computed(first, final, signal)
        return tail(final, aux)


class MarginReference(ReferenceFBCache):
    """The reference, also keeping how far each compared change was from the threshold (a
    test can then require its decisions to be far from it, where rounding cannot flip them)."""

    def reset(self) -> None:
        super().reset()
        self.margins: list[float] = []

    def _skip(self, signal: torch.Tensor) -> bool:
        if self.signal is not None and self.threshold > 0:
            change = ((signal - self.signal).abs().mean() / self.signal.abs().mean()).item()
            self.margins.append(abs(change - self.threshold) / self.threshold)
        return super()._skip(signal)
