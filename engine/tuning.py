"""Self-tuning speculation: the specdec++ stop level (`threshold: "auto"`) and each round's candidate
budgets, from the cost model measured on this host and the acceptance the engine observes.

The derivation is in docs/design.md ("Self-tuning"). In short: a round's value is the tokens it
yields; its price is its wall time; the best policy maximises tokens per second, rate r. At that
rate a second of engine time is worth r tokens, so one more candidate pays when its expected
gain, P(every candidate so far accepted) x a (its own acceptance), exceeds r x its marginal
seconds m. The head gives P(all accepted) = 1 - P(some rejected), so the rule is the paper's
threshold rule, stop once P(some candidate rejected) > 1 - r m / a, at a level set by costs, and by
depth: m is the (n + 1)-th candidate's own margin, which steps where a kernel does.
Budgets use the same comparison for candidates that are surely accepted: past the k after which no run
of further candidates repays its summed margins (sum of r m(i) at least their count) none can pay, and
none is proposed. Whether to propose at all compares whole
rounds: none where the best fixed k is 0 (no round with candidates beats the target alone), since
the first candidate may cost more than those after it (a kernel that changes from 1 to 2 rows) and
its margin alone would refuse rounds that pay. m grows with the verified tokens of the batch, so
budgets and the level shrink where verification stops being cheap. A draft that lags by a whole prompt
(its prefill is deferred until the target has given the first token) is caught up only where the
seconds that costs are less than what speculating over the tokens left is expected to save.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from engine.costs import CostModel, LiveCosts

MIN_LEVEL, MAX_LEVEL = 0.01, 0.99  # the auto level stays a probability strictly inside (0, 1)
PRIOR_ACCEPTANCE = 0.6  # what a deployment's first request assumes before any verification
SMOOTHING = 0.01  # weight of one verified candidate in the deployment's acceptance estimate
PROBE_EVERY = 8  # the PROBE_EVERY-th round in a row that would propose nothing proposes one, to re-time the draft


def expected_tokens(accept: float, k: int) -> float:
    """Tokens of a round with k candidates each accepted with probability `accept` (independently),
    plus the target's own token: 1 + a + a^2 + ... + a^k."""
    return sum(accept**j for j in range(k + 1))


def round_seconds(costs: CostModel, batch: int, k: int) -> float:
    """A round of `batch` sequences proposing k candidates each: k draft forwards over the batch,
    each candidate drawn and judged, one target forward over every sequence's k + 1 tokens."""
    return k * costs.draft_seconds(batch) + batch * k * costs.candidate_seconds() + costs.target_seconds(
        batch * (k + 1), batch)


def best_fixed(costs: CostModel, batch: int, accept: float, max_k: int) -> tuple[int, float]:
    """The best candidate count shared by `batch` sequences (0: the target alone) and its rate in
    tokens per second, all sequences together: the operating point the marginal rules compare with."""
    rates = [(batch * expected_tokens(accept, k) / round_seconds(costs, batch, k), k) for k in range(max_k + 1)]
    rate, k = max(rates)
    return k, rate


def marginal_seconds(costs: CostModel, batch: int, k: int) -> float:
    """What the k-th candidate of every sequence of a batch adds to the round's wall time, per
    sequence: a share of one more draft forward, its draw and judgement, and its rows of the target's
    forward (from k to k + 1 tokens per sequence)."""
    verify = costs.target_seconds(batch * (k + 1), batch) - costs.target_seconds(batch * k, batch)
    return costs.draft_seconds(batch) / batch + costs.candidate_seconds() + verify / batch


def stop_level(rate: float, marginal: float, accept: float) -> float:
    """The stop level: P(some candidate rejected) above which one more candidate (or a run of them: their
    summed margins `marginal` and expected gains `accept`) costs more than its expected gain, 1 - r m / a."""
    return min(max(1.0 - rate * marginal / max(accept, 1e-6), MIN_LEVEL), MAX_LEVEL)


def depth_levels(costs: CostModel, batch: int, rate: float, accept: float, max_k: int) -> list[float]:
    """[n - 1]: the level a round holding n candidates stops at (n = 1 .. max_k). Proposing on pays where
    some run of j more candidates (within max_k) pays in total, each accepted with probability a given the
    ones before: pi_n (a + ... + a^j) > r (m(n + 1) + ... + m(n + j)). So the level is 1 - min_j r M_j / A_j.
    The paper's one-step rule is j = 1. Where verification steps in cost at some row count, the candidate
    that crosses the step is repaid by the cheap ones after it, which one step does not see."""
    margins = [marginal_seconds(costs, batch, k) for k in range(1, max_k + 2)]  # margins[k - 1]: m(k)
    gains = list(itertools.accumulate(accept**j for j in range(1, max_k + 1)))  # gains[j - 1]: a + ... + a^j
    levels = []
    for n in range(1, max_k + 1):
        spent = itertools.accumulate(margins[n : n + max(max_k - n, 1)])  # m(n + 1) + ... + m(n + j), j = 1, 2, ...
        levels.append(max(stop_level(rate, m, a) for m, a in zip(spent, gains, strict=False)))  # runs: as many as fit
    return levels


def candidate_budget(costs: CostModel, batch: int, rate: float, k_best: int, max_k: int) -> int:
    """The most candidates a sequence of `batch` may propose (within `max_k`): none where the best fixed
    count `k_best` is none, else the longest round of surely accepted candidates whose candidates past the
    first pay in total at `rate`, sum (1 - r m(i)) largest (the latest such k), and at least k_best. Past it no
    run of candidates can pay at any acceptance, while a candidate dearer than its gain (the one that crosses a
    step in verification cost) stays in where the cheap ones after it repay it, as the stop levels price it."""
    if max_k < 1 or k_best == 0:
        return 0
    value, best_value, k = 0.0, 0.0, 1
    for n in range(2, max_k + 1):
        value += 1.0 - rate * marginal_seconds(costs, batch, n)
        if value >= best_value:
            best_value, k = value, n
    return max(k, min(k_best, max_k))


def budget_at(costs: CostModel, batch: int, accept: float, max_k: int) -> int:
    """The candidate budget a sequence of `batch` gets at acceptance `accept` (within `max_k`), at the
    best fixed operating point's rate: what the engine reports as its current budget."""
    k_best, rate = best_fixed(costs, batch, accept, max_k)
    return candidate_budget(costs, batch, rate, k_best, max_k)


def catch_up_pays(costs: CostModel, batch: int, accept: float, k: int, lag: int, tokens_left: int) -> bool:
    """Whether feeding a sequence's draft the `lag` tokens it lacks pays: the catch-up holds up every sequence
    of the batch, and speculating at k candidates saves, on each of the sequence's `tokens_left` tokens, the
    difference between a round of the target alone and a speculative round's seconds per token. An upper
    bound of the saving (a request may end before max_tokens), so a catch-up refused here never pays."""
    if k < 1:
        return False
    alone = costs.target_seconds(batch, batch)
    speculating = round_seconds(costs, batch, k) / expected_tokens(accept, k)
    return batch * costs.draft_feed_seconds(lag) < tokens_left * (alone - speculating)


@dataclass
class RoundTuning:
    """What the self-tuning decided for a round: each sequence's budget and stop level."""

    budgets: list[int]
    levels: list[float]  # each sequence's level at the best fixed count (what the stats report)
    rate: float  # tokens per second the operating point predicts, all sequences together
    # [i][n - 1]: the level sequence i's round of n candidates stops at, its runs priced within its own budget
    depth_levels: list[list[float]] = field(default_factory=list)


class SelfTuning:
    """The engine's live cost model and acceptance estimate, and the decisions made from them.

    The acceptance estimate a is the deployment's, smoothed over every candidate that self-tuning requests
    verified: the head already judges each candidate in its context, so a only prices the next candidate
    on average. Requests with a fixed rule are left out: a constant k's long rounds accept their deep
    candidates far less often (0.52 at k=14 on HumanEval against 0.85 under auto), and learning from them
    made auto stop early, or propose nothing, in the requests that followed.
    (A per-request estimate, tried in the offline evaluator, swings low after a few rejections and
    then stops rounds the head would have continued, which cost more than it saved.)
    """

    def __init__(self, costs: LiveCosts, prior_acceptance: float = PRIOR_ACCEPTANCE) -> None:
        self.costs = costs
        self.acceptance = prior_acceptance
        self.rounds_without_candidates = 0

    def plan(self, max_k: list[int], catch_ups: list[tuple[int, int] | None] | None = None,
             load: int = 0) -> RoundTuning:
        """Budgets (within each sequence's `max_k`) and the stop level of a round over len(max_k) sequences.
        `catch_ups` gives, for a sequence whose draft lags by more than a round leaves, (tokens it lags by,
        tokens it has left): it proposes only where catching up pays (`catch_up_pays`).

        `load`: the sequences that will share the rounds to come (those admitted and still prefilling, and
        those waiting for room, with these). The batch is priced at the larger of it and this round's, since
        what a catch-up or a speculating round buys is earned over the rounds after it: while a burst is
        admitted one prefill a step, the first sequences would otherwise catch their drafts up at batch 1 or 2,
        then stop speculating a few steps later at the full batch, the catch-up wasted.

        Costs and acceptance are only re-learnt from rounds that propose: the PROBE_EVERY-th round in a
        row that would propose no candidate proposes one per sequence instead (a probe), so a draft once measured
        too dear (a busy host at start) or an acceptance that has since risen is noticed. A probe catches
        a draft up by no more tokens than its sequence has left.
        """
        costs, batch, accept = self.costs.current, max(len(max_k), load), self.acceptance
        catch_ups = catch_ups or [None] * len(max_k)
        k_best, rate = best_fixed(costs, batch, accept, max(max_k + [1]))
        # Each depth prices the candidates after it at their own margins: where verification steps in cost at
        # some row count, one level for every depth would price each candidate at the step (or none of them).
        budgets = [candidate_budget(costs, batch, rate, k_best, k) for k in max_k]
        budgets = [b if b == 0 or c is None or catch_up_pays(costs, batch, accept, min(b, k_best), *c) else 0
                   for b, c in zip(budgets, catch_ups, strict=True)]
        if any(budgets) or not any(max_k):
            self.rounds_without_candidates = 0
        else:
            self.rounds_without_candidates += 1
            if self.rounds_without_candidates >= PROBE_EVERY:
                budgets = [min(1, k) if c is None or c[0] <= c[1] else 0 for k, c in zip(max_k, catch_ups, strict=True)]
                self.rounds_without_candidates = 0
        # A sequence's runs end at its own budget (tokens left, its bounds, the head's depth): a candidate that
        # crosses a step in verification cost is repaid only by cheap ones it can still propose.
        group = max(max_k + [1])  # the reported level is the group's, at the best fixed count
        by_budget = {b: depth_levels(costs, batch, rate, accept, max(b, 1)) for b in {*budgets, group}}
        level = by_budget[group][max(k_best, 1) - 1]
        return RoundTuning(budgets=budgets, levels=[level] * len(max_k), rate=rate,
                           depth_levels=[by_budget[b] for b in budgets])

    def state(self) -> dict:
        """Everything the decisions depend on, as plain data (another rank of a tensor-parallel target takes it)."""
        return {"costs": self.costs.state(), "acceptance": self.acceptance,
                "rounds_without_candidates": self.rounds_without_candidates}

    def load_state(self, state: dict) -> None:
        self.costs.load_state(state["costs"])
        self.acceptance = state["acceptance"]
        self.rounds_without_candidates = state["rounds_without_candidates"]

    def observe_acceptance(self, labels: list[float]) -> None:
        """Fold a verified round's exact labels a_s into the deployment's estimate."""
        for a in labels:
            self.acceptance += SMOOTHING * (a - self.acceptance)
