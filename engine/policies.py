"""Stop policies: when does the draft stop proposing and hand the candidates over?

Every policy shares one speculation loop (engine/speculate.py) and differs only here. The loop
asks every policy the same questions: how many candidates at most this round (`max_candidates`),
then, for each candidate y_s, `should_stop` at both judgement points of its step (`ProposalStep.when`):
"before" the draft runs on y_s and "after" it has (a stop there submits y_{s+1}, drawn from that
forward, as the round's last candidate). A policy answers False where it does not judge.
To add a policy: write a class below and register it in `make_policy`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.head import CANDIDATE_FEATURES, AcceptanceHead, HeadTiming
from engine.params import AUTO, SpecConfig

DEFAULT_AUTO_START = 0.5  # an auto level before the engine's first plan sets it (a policy used outside the engine)

LOG_Q = CANDIDATE_FEATURES.index("log_q")  # the draft's log-probability of its candidate


@dataclass
class ProposalStep:
    """What is known about the s-th proposed token y_s of the current round when a policy judges it."""

    index: int  # s, 1-based
    when: HeadTiming  # "before" the draft's forward on y_s, or "after" it
    features: torch.Tensor | None = None  # candidate_features of y_s [F]; given to policies that read them
    accept_prob: float | None = None  # the head's calibrated P(y_s accepted | earlier accepted), at its timing

    @property
    def draft_prob(self) -> float:
        """The draft's own (temperature 1, unfiltered) probability of y_s."""
        assert self.features is not None, "draft_prob needs a policy with reads_features"
        return float(self.features[LOG_Q].exp())


class StopPolicy:
    """Base policy: never stops on its own; `max_candidates` bounds the round."""

    name: str = "base"
    # What the policy reads beyond y_s's index: True makes the loop compute ProposalStep.features
    # (a pass over the vocabulary per candidate), which the draft probability and the head read.
    reads_features: bool = False

    def max_candidates(self) -> int:
        raise NotImplementedError

    @property
    def self_tuning(self) -> bool:
        """Whether the engine sets this policy's knob and budget from its cost model (threshold "auto")."""
        return False

    def set_levels(self, level: float, depth_levels: list[float], accept: float) -> None:
        """A self-tuning policy's levels for the coming round (`engine.tuning.RoundTuning`)."""
        raise TypeError(f"policy {self.name!r} does not tune itself")

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
    """`confidence`: stop once the draft's probability of its token is below p_min (llama.cpp).

    It judges y_s before the draft runs on it: a stop costs no forward.
    """

    name = "confidence"
    reads_features = True

    def __init__(self, p_min: float, bounds: tuple[int, int]) -> None:
        self.p_min = p_min
        self.low, self.high = bounds

    def max_candidates(self) -> int:
        return self.high

    def should_stop(self, step: ProposalStep) -> bool:
        return step.when == "before" and step.index >= self.low and step.draft_prob < self.p_min


class SpecDecPP(StopPolicy):
    """`specdec++`: stop once 1 - prod_{i<=s} a_i > threshold, a_i from the acceptance head.

    Every candidate is judged, the first included, at the head's timing. A head judging "after"
    the draft's forward on y_s yields s + 1 candidates when it stops there, so the lower bound
    counts that one. With threshold "auto" the engine sets the level every round from the cost
    model (engine/tuning.py), one per depth (`depth_thresholds[n - 1]`: a round of n candidates stops
    there); `threshold` is the level at the best fixed count, in force where no depth's is set. The depth
    levels price a round of n candidates all accepted: for an "after" head the unjudged (n)th enters at the
    deployment's acceptance (`pending_accept`). The offline evaluator replays this policy (`auto_round`).

    A round proposes no deeper than `depth`, the deepest position the head was trained on (its
    `max_position`; 0: no limit), and never below the lower bound: past it the head reads every position
    as its last one seen, so it cannot tell how deep the round is (measured in docs/benchmarks/README.md,
    "How deep a head may judge").
    """

    name = "specdec++"
    reads_features = True

    def __init__(self, threshold: float | str, bounds: tuple[int, int], timing: HeadTiming = "before",
                 depth: int = 0) -> None:
        self.auto = threshold == AUTO
        self.threshold = DEFAULT_AUTO_START if self.auto else float(threshold)
        self.low, self.high = bounds
        if depth:
            self.high = max(self.low, min(self.high, depth))
        self.timing = timing
        self.depth_thresholds: list[float] = []
        self.pending_accept = 1.0  # with depth levels: the expected acceptance of an unjudged candidate
        self._all_accepted_prob = 1.0

    def max_candidates(self) -> int:
        return self.high

    @property
    def self_tuning(self) -> bool:
        return self.auto

    def set_levels(self, level: float, depth_levels: list[float], accept: float) -> None:
        self.threshold, self.depth_thresholds, self.pending_accept = level, depth_levels, accept

    def start_round(self) -> None:
        self._all_accepted_prob = 1.0

    def should_stop(self, step: ProposalStep) -> bool:
        if step.when != self.timing:
            return False
        assert step.accept_prob is not None, "specdec++ needs the head's estimate"
        self._all_accepted_prob *= step.accept_prob
        length_if_stopped = step.index + int(step.when == "after")  # `index` is 1-based
        if not self.depth_thresholds:
            return length_if_stopped >= self.low and 1.0 - self._all_accepted_prob > self.threshold
        level = self.depth_thresholds[min(length_if_stopped, len(self.depth_thresholds)) - 1]
        # P(every candidate a stop submits is accepted): an "after" stop submits y_{s+1} unjudged
        held = self._all_accepted_prob * (self.pending_accept if self.timing == "after" else 1.0)
        return length_if_stopped >= self.low and 1.0 - held > level


def make_policy(spec: SpecConfig, head: AcceptanceHead | None = None) -> StopPolicy:
    """A fresh policy object per request (policies may keep per-request state).

    `head` is the head serving this request (specdec++ only): its timing and its depth (`max_position`).
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
        if head is None:
            return SpecDecPP(spec.threshold, spec.bounds)
        return SpecDecPP(spec.threshold, spec.bounds, timing=head.timing, depth=head.config.max_position)
    raise ValueError(f"unknown policy {spec.policy!r}")
