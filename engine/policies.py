"""Stop policies: when does the draft stop proposing and hand the candidates over?

Every policy shares one speculation loop (engine/speculate.py) and differs only here.
A policy sees one `ProposalStep` per proposed token and answers `should_stop`.
To add a policy: write a class below and register it in `make_policy`.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.params import SpecConfig


@dataclass
class ProposalStep:
    """What is known about the s-th proposed token y_s of the current round when a policy judges it."""

    index: int  # s, 1-based
    draft_prob: float  # the draft's own (temperature 1, unfiltered) probability of y_s
    accept_prob: float | None = None  # the head's calibrated P(y_s accepted | earlier accepted); head policies


class StopPolicy:
    """Base policy: never stops on its own; `max_candidates` bounds the round.

    The loop asks `should_stop` about y_s once y_s is drawn, before the draft runs on it, unless
    `judges_after_forward`: then it asks after that forward (the head reads its hidden state) and
    a stop submits y_{s+1}, drawn from the forward already paid for, as the round's last candidate.
    """

    name: str = "base"
    needs_features: bool = False  # True: the loop computes the draft's view of y_s (engine.head.candidate_features)
    judges_after_forward: bool = False

    def max_candidates(self) -> int:
        raise NotImplementedError

    def start_round(self) -> None:
        pass

    def should_stop(self, step: ProposalStep) -> bool:
        return False

    def end_round(self, proposed: int, accepted: int) -> None:
        pass


class TargetOnly(StopPolicy):
    """`none`: no draft at all; every round is one target step."""

    name = "none"

    def max_candidates(self) -> int:
        return 0


class Constant(StopPolicy):
    """`constant`: exactly k candidates per round (the paper's SpecDec baseline)."""

    name = "constant"

    def __init__(self, k: int) -> None:
        self.k = k

    def max_candidates(self) -> int:
        return self.k


class Heuristic(StopPolicy):
    """`heuristic`: K += 2 after a fully accepted round, else K -= 1 (transformers' rule)."""

    name = "heuristic"

    def __init__(self, k: int, bounds: tuple[int, int]) -> None:
        self.low, self.high = bounds
        self.k = min(max(k, self.low), self.high)

    def max_candidates(self) -> int:
        return self.k

    def end_round(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        self.k = self.k + 2 if accepted == proposed else self.k - 1
        self.k = min(max(self.k, self.low), self.high)


class Confidence(StopPolicy):
    """`confidence`: stop once the draft's probability of its token is below p_min (llama.cpp)."""

    name = "confidence"
    needs_features = True

    def __init__(self, p_min: float, bounds: tuple[int, int]) -> None:
        self.p_min = p_min
        self.low, self.high = bounds

    def max_candidates(self) -> int:
        return self.high

    def should_stop(self, step: ProposalStep) -> bool:
        return step.index >= self.low and step.draft_prob < self.p_min


class SpecDecPP(StopPolicy):
    """`specdec++`: stop once 1 - prod_{i<=s} a_i > threshold, a_i from the acceptance head.

    Every candidate is judged, the first included. With a head that judges after the draft's
    forward on y_s, stopping there yields s + 1 candidates, so the lower bound counts that one.
    """

    name = "specdec++"
    needs_features = True

    def __init__(self, threshold: float, bounds: tuple[int, int], judges_after_forward: bool = False) -> None:
        self.threshold = threshold
        self.low, self.high = bounds
        self.judges_after_forward = judges_after_forward
        self._all_accepted_prob = 1.0

    def max_candidates(self) -> int:
        return self.high

    def start_round(self) -> None:
        self._all_accepted_prob = 1.0

    def should_stop(self, step: ProposalStep) -> bool:
        assert step.accept_prob is not None, "specdec++ needs the head's estimate"
        self._all_accepted_prob *= step.accept_prob
        length_if_stopped = step.index + int(self.judges_after_forward)
        return length_if_stopped >= self.low and 1.0 - self._all_accepted_prob > self.threshold


def make_policy(spec: SpecConfig, head_timing: str | None = None) -> StopPolicy:
    """A fresh policy object per request (policies may keep per-request state).

    `head_timing` is the timing of the head serving this request (specdec++ only).
    """
    if spec.policy == "none":
        return TargetOnly()
    if spec.policy == "constant":
        return Constant(spec.k)
    if spec.policy == "heuristic":
        return Heuristic(spec.k, spec.bounds)
    if spec.policy == "confidence":
        return Confidence(spec.p_min, spec.bounds)
    if spec.policy == "specdec++":
        return SpecDecPP(spec.threshold, spec.bounds, judges_after_forward=head_timing == "after")
    raise ValueError(f"unknown policy {spec.policy!r}")
