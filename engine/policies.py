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
    """What is known about the s-th proposed token of the current round."""

    index: int  # s, 1-based
    draft_prob: float  # the draft's own (temperature 1, unfiltered) probability of y_s
    accept_prob: float | None = None  # head's P(y_s accepted | earlier accepted); head policies only


class StopPolicy:
    """Base policy: never stops on its own; `max_candidates` bounds the round."""

    name: str = "base"
    uses_head: bool = False  # True: the loop runs the draft on y_s and the head before asking
    needs_draft_prob: bool = False  # True: the loop reads the draft's probability of y_s (a sync)

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
    needs_draft_prob = True

    def __init__(self, p_min: float, bounds: tuple[int, int]) -> None:
        self.p_min = p_min
        self.low, self.high = bounds

    def max_candidates(self) -> int:
        return self.high

    def should_stop(self, step: ProposalStep) -> bool:
        return step.index >= self.low and step.draft_prob < self.p_min


class SpecDecPP(StopPolicy):
    """`specdec++`: stop once 1 - prod_{i<=s} a_i > threshold, a_i from the acceptance head.

    The first token's factor is 1 (as in the reference implementation): it never stops a
    round by itself.
    """

    name = "specdec++"
    uses_head = True

    def __init__(self, threshold: float, bounds: tuple[int, int]) -> None:
        self.threshold = threshold
        self.low, self.high = bounds
        self._all_accepted_prob = 1.0

    def max_candidates(self) -> int:
        return self.high

    def start_round(self) -> None:
        self._all_accepted_prob = 1.0

    def should_stop(self, step: ProposalStep) -> bool:
        if step.index > 1 and step.accept_prob is not None:
            self._all_accepted_prob *= step.accept_prob
        return step.index >= self.low and 1.0 - self._all_accepted_prob > self.threshold


def make_policy(spec: SpecConfig) -> StopPolicy:
    """A fresh policy object per request (policies may keep per-request state)."""
    if spec.policy == "none":
        return TargetOnly()
    if spec.policy == "constant":
        return Constant(spec.k)
    if spec.policy == "heuristic":
        return Heuristic(spec.k, spec.bounds)
    if spec.policy == "confidence":
        return Confidence(spec.p_min, spec.bounds)
    if spec.policy == "specdec++":
        return SpecDecPP(spec.threshold, spec.bounds)
    raise ValueError(f"unknown policy {spec.policy!r}")
