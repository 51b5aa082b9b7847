"""One stats record per request; it travels on the final TokenEvent and feeds the response body
and the Prometheus metrics.

Definitions follow docs/design.md (the SpecDec++ paper):
  discard rate      = discarded draft tokens / generated tokens
  verification rate = target forward passes / generated tokens
  acceptance rate   = accepted draft tokens / proposed draft tokens
A draft token is *accepted* when it ends up in the completion; every other proposed token
(rejected, after a rejection, or cut by a stop condition) is *discarded*.

Expected-rejection accounting (Yin et al. 2024, Theorem 1): at each position where the acceptance test ran
(`verified_positions`) the test passes with probability sum_v min(p, q) = 1 - TV(p, q) (with
over-acceptance epsilon, sum_v min(q, p + epsilon)); `expected_accepted` sums it, and
expected rejections = verified positions - expected accepted, next to the realized `rejections`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class RequestStats:
    policy: str = "none"
    prompt_tokens: int = 0
    generated_tokens: int = 0
    rounds: int = 0
    target_calls: int = 0
    proposed_tokens: int = 0
    accepted_tokens: int = 0
    candidate_lengths: list[int] = field(default_factory=list)
    accepted_lengths: list[int] = field(default_factory=list)
    stop_levels: list[float] = field(default_factory=list)  # the specdec++ level of each round (threshold "auto")
    judged_candidates: int = 0  # candidates the acceptance head judged (specdec++)
    predicted_acceptance_sum: float = 0.0  # over those: the P(accepted) the stop rule used
    realized_acceptance_sum: float = 0.0  # ... and their exact a_s = min(1, p/q)
    verified_positions: int = 0  # positions where the acceptance test ran
    expected_accepted: float = 0.0  # sum over them of P(the test passes)
    rejections: int = 0  # rounds whose acceptance test rejected a candidate
    over_acceptance: float = 0.0  # the request's epsilon: above 0 the output is not the target's distribution
    accepted_paths: list[int] = field(default_factory=list)  # the winning path of each multi-draft round
    draft_seconds: float = 0.0
    target_seconds: float = 0.0
    first_token_seconds: float | None = None
    total_seconds: float = 0.0

    @property
    def discarded_tokens(self) -> int:
        return self.proposed_tokens - self.accepted_tokens

    @property
    def discard_rate(self) -> float:
        return self.discarded_tokens / self.generated_tokens if self.generated_tokens else 0.0

    @property
    def verification_rate(self) -> float:
        return self.target_calls / self.generated_tokens if self.generated_tokens else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else 0.0

    @property
    def mean_candidate_length(self) -> float:
        n = len(self.candidate_lengths)
        return sum(self.candidate_lengths) / n if n else 0.0

    @property
    def mean_accepted_length(self) -> float:
        n = len(self.accepted_lengths)
        return sum(self.accepted_lengths) / n if n else 0.0

    @property
    def mean_stop_level(self) -> float | None:
        """The mean specdec++ stop level the engine chose (threshold "auto"; None otherwise)."""
        return sum(self.stop_levels) / len(self.stop_levels) if self.stop_levels else None

    @property
    def mean_predicted_acceptance(self) -> float | None:
        """The head's mean P(accepted) over the request's judged candidates: compare with the realized mean."""
        return self.predicted_acceptance_sum / self.judged_candidates if self.judged_candidates else None

    @property
    def mean_realized_acceptance(self) -> float | None:
        return self.realized_acceptance_sum / self.judged_candidates if self.judged_candidates else None

    def record_judgements(self, predicted: list[float], realized: list[float]) -> None:
        self.judged_candidates += len(predicted)
        self.predicted_acceptance_sum += sum(predicted)
        self.realized_acceptance_sum += sum(realized)

    @property
    def expected_rejections(self) -> float:
        return self.verified_positions - self.expected_accepted

    @property
    def lossless(self) -> bool:
        return self.over_acceptance == 0.0

    @property
    def accepted_per_target_call(self) -> float:
        return self.accepted_tokens / self.target_calls if self.target_calls else 0.0

    def record_verification(self, tested: int, expected_accepted: float, rejected: bool) -> None:
        """One round's acceptance test: the positions it ran at, its expected passes, whether it rejected."""
        self.verified_positions += tested
        self.expected_accepted += expected_accepted
        self.rejections += int(rejected)

    def record_round(self, candidates: int, accepted: int) -> None:
        self.rounds += 1
        self.target_calls += 1
        self.proposed_tokens += candidates
        self.accepted_tokens += accepted
        self.candidate_lengths.append(candidates)
        self.accepted_lengths.append(accepted)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict with the raw counts and the derived rates."""
        out = asdict(self)
        out.update(
            discarded_tokens=self.discarded_tokens,
            discard_rate=self.discard_rate,
            verification_rate=self.verification_rate,
            acceptance_rate=self.acceptance_rate,
            mean_candidate_length=self.mean_candidate_length,
            mean_accepted_length=self.mean_accepted_length,
            mean_stop_level=self.mean_stop_level,
            mean_predicted_acceptance=self.mean_predicted_acceptance,
            mean_realized_acceptance=self.mean_realized_acceptance,
            expected_rejections=self.expected_rejections,
            accepted_per_target_call=self.accepted_per_target_call,
            lossless=self.lossless,
        )
        return out
