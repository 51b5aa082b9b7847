"""Sampled speculative outputs follow the target's distribution (chi-square tests).

A 6-token vocabulary makes the exact target distribution of two output tokens cheap to compute
(36 outcomes). The tokens tested are the 2nd and 3rd (`PAIR`): a request's first token comes from the
target alone (its first round), and the next ones from its first speculative round, up to two candidates
and a bonus token with `max_tokens` 4. Every policy must match it; a deliberately wrong acceptance
rule (accept every draft token) must fail the same test, proving the test has power.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch
from conftest import CHEAP_DRAFT_COSTS
from conftest import DISTRIBUTION_VOCAB as VOCAB
from scipy.stats import chisquare

import engine.speculate as speculate
from engine.costs import LiveCosts
from engine.llm_engine import LLMEngine
from engine.params import SamplingParams, SpecConfig
from engine.sampling import Verdict, processed_probs, sample, sampling_cdf

PROMPT = [1, 2, 3]
SAMPLES = 1000
PAIR = slice(1, 3)  # the output tokens tested: the first speculative round's first two
T1 = SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True)
FILTERED = SamplingParams(temperature=0.7, top_p=0.9, top_k=4, max_tokens=4, ignore_eos=True)


def exact_pair_distribution(next_probs: Callable[[list[int]], torch.Tensor]) -> dict[tuple[int, int], float]:
    """The exact distribution of the output's `PAIR` tokens (t2, t3), summed over the first token t1, from
    `next_probs(output)`: the distribution of the token after PROMPT + output."""
    out: dict[tuple[int, int], float] = {}
    p1 = next_probs([])
    for t1 in range(VOCAB):
        if p1[t1] == 0:
            continue
        p2 = next_probs([t1])
        for t2 in range(VOCAB):
            if p2[t2] == 0:
                continue
            p3 = next_probs([t1, t2])
            for t3 in range(VOCAB):
                out[(t2, t3)] = out.get((t2, t3), 0.0) + float(p1[t1] * p2[t2] * p3[t3])
    return out


def exact_two_token_distribution(engine: LLMEngine, params: SamplingParams) -> dict[tuple[int, int], float]:
    """The target's exact distribution of the `PAIR` tokens under `params`."""
    model, device = engine.target.model, engine.target.device

    def next_probs(output: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return processed_probs(model(torch.tensor([PROMPT + output], device=device)).logits[0, -1], params)

    return exact_pair_distribution(next_probs)


def chi_square_pvalue(counts: Counter, expected_probs: dict, n: int) -> float:
    """Pearson chi-square with outcomes of expected count < 5 pooled into one cell."""
    assert set(counts) <= {k for k, v in expected_probs.items() if v > 0}, "impossible outcome sampled"
    obs, exp, pooled_obs, pooled_exp = [], [], 0, 0.0
    for outcome, prob in expected_probs.items():
        if prob * n < 5:
            pooled_obs += counts.get(outcome, 0)
            pooled_exp += prob * n
        else:
            obs.append(counts.get(outcome, 0))
            exp.append(prob * n)
    if pooled_exp > 0:
        obs.append(pooled_obs)
        exp.append(pooled_exp)
    scale = sum(obs) / sum(exp)
    return float(chisquare(obs, [e * scale for e in exp]).pvalue)


def sample_two_tokens(engine: LLMEngine, params: SamplingParams, spec: SpecConfig) -> Counter:
    counts: Counter = Counter()
    for seed in range(SAMPLES):
        out = engine.generate(PROMPT, params.model_copy(update={"seed": seed}), spec)
        counts[tuple(out.token_ids[PAIR])] += 1
    return counts


SPECS = [
    SpecConfig(policy="none"),
    SpecConfig(policy="constant", k=3),
    SpecConfig(policy="heuristic", k=1, bounds=(1, 6)),
    SpecConfig(policy="confidence", p_min=0.5, bounds=(1, 6)),
    SpecConfig(policy="specdec++", threshold=0.4, bounds=(1, 6)),
    SpecConfig(policy="specdec++", threshold=0.05, bounds=(1, 6)),  # mostly one-candidate rounds: y_1 judged
    SpecConfig(policy="specdec++", threshold=0.4, bounds=(1, 6), head="after"),
    SpecConfig(policy="specdec++", threshold="auto", bounds=(1, 6)),  # the level the cost model sets per round
]


CASES = [(spec, T1) for spec in SPECS] + [(SPECS[1], FILTERED), (SPECS[4], FILTERED)]


@pytest.mark.parametrize(
    ("spec", "params"),
    CASES,
    ids=[f"{s.policy}-{s.head}-{s.threshold}-t{p.temperature}-p{p.top_p}-k{p.top_k}" for s, p in CASES],
)
def test_policy_matches_target_distribution(distribution_engine, spec, params):
    counts = sample_two_tokens(distribution_engine, params, spec)
    pvalue = chi_square_pvalue(counts, exact_two_token_distribution(distribution_engine, params), SAMPLES)
    assert pvalue > 1e-3, f"{spec.policy}: chi-square p={pvalue:.2e}"


def test_auto_with_online_calibration_refitting_matches_target_distribution(distribution_engine, monkeypatch):
    """Threshold auto while the head's online calibrator refits every few rounds (from labels of earlier
    rounds only): the stop rule keeps changing, the output distribution stays the target's."""
    # The cheap-draft costs as they are (not refreshed from the tiny models' timings), so auto speculates.
    monkeypatch.setattr(distribution_engine.tuning, "costs", LiveCosts(CHEAP_DRAFT_COSTS, smoothing=0.0))
    calibrator = distribution_engine.calibration.calibrators[("default", "sampled")]
    monkeypatch.setattr(calibrator, "min_labels", 16)
    monkeypatch.setattr(calibrator, "refit_every", 8)
    fits = calibrator.scale, calibrator.bias
    spec = SpecConfig(policy="specdec++", threshold="auto", bounds=(1, 6))
    counts = sample_two_tokens(distribution_engine, T1, spec)
    pvalue = chi_square_pvalue(counts, exact_two_token_distribution(distribution_engine, T1), SAMPLES)
    assert (calibrator.scale, calibrator.bias) != fits and calibrator.labels_seen > 100
    assert pvalue > 1e-3, f"auto with online calibration: chi-square p={pvalue:.2e}"


def accept_every_draft_token(candidates, draft_probs, target_probs, generator, over_acceptance=0.0) -> Verdict:
    """A wrong acceptance rule for the controls: every candidate is kept, so the output follows the draft."""
    k = candidates.shape[0]
    return Verdict(k, int(sample(target_probs[k : k + 1], generator)[0]))


def test_wrong_acceptance_rule_is_detected(distribution_engine, monkeypatch):
    """Control: accepting every draft token yields the draft's distribution, and the test sees it."""
    monkeypatch.setattr(speculate, "verify", accept_every_draft_token)
    params = T1
    counts = sample_two_tokens(distribution_engine, params, SpecConfig(policy="constant", k=3))
    pvalue = chi_square_pvalue(counts, exact_two_token_distribution(distribution_engine, params), SAMPLES)
    assert pvalue < 1e-6


def test_sample_follows_the_distribution_row_by_row():
    """The inverse-CDF sampler: each row of a batch by its own distribution, never a zero-probability
    token (zeros at the ends and inside), unnormalised rows allowed."""
    probs = torch.tensor([[0.0, 0.1, 0.0, 0.6, 0.3, 0.0], [0.5, 0.0, 0.0, 0.0, 0.0, 1.5]])
    generator = torch.Generator().manual_seed(0)
    n = 20000
    draws = torch.stack([sample(probs, generator) for _ in range(n)])  # [n, 2]
    for row in range(2):
        expected = probs[row] / probs[row].sum()
        counts = Counter(draws[:, row].tolist())
        pvalue = chi_square_pvalue(counts, {i: float(p) for i, p in enumerate(expected)}, n)
        assert pvalue > 1e-3, (row, counts)


def test_sampler_distribution_exact_at_full_vocabulary():
    """Inverse-CDF sampling draws token i with probability equal to its CDF step. Over a 151,936-entry
    vocabulary a float32 running sum makes those steps drift from q (the acceptance rule divides by
    q itself); the float64 CDF keeps the sampled distribution q. The control proves the check bites."""
    gen = torch.Generator().manual_seed(0)
    vocab = 151_936
    q = torch.rand(vocab, generator=gen) ** 6  # a long tail of small entries, as a softmax has
    q[:10] += 50.0  # and a few dominant tokens
    q = (q / q.sum()).float()
    exact = q.double() / q.double().sum()

    def total_variation(cdf: torch.Tensor) -> float:
        steps = torch.diff(cdf.double(), prepend=torch.zeros(1, dtype=torch.float64)) / cdf[-1].double()
        return 0.5 * float((steps - exact).abs().sum())

    assert total_variation(sampling_cdf(q.unsqueeze(0))[0]) < 1e-9
    assert total_variation(q.float().cumsum(-1)) > 1e-5  # the float32 sum the sampler used before
    # sample() inverts that very CDF: a uniform just below a step's end picks that step's token
    draws = torch.stack([sample(q.unsqueeze(0), gen) for _ in range(2000)]).squeeze(-1)
    assert draws.max() < vocab and (q[draws] > 0).all()
    assert 0.2 < float((draws < 10).double().mean()) / float(exact[:10].sum()) < 5.0
