"""The theory of speculative decoding (Yin, Chen, Huang, Wang, NeurIPS 2024) in the engine.

- Expected-rejection accounting: the sum over verified positions of TV(p, q) predicts the realized rejections.
- Over-acceptance: accepting with min(1, (p + epsilon) / q) gives an output whose bias TV(output, p) is the
  theory's value and lies on the Pareto front bias + rejection = TV(p, q); resampling from p instead
  (Decoding-UNO) lies above it; epsilon 0 stays lossless. Lossy output is refused unless the engine allows it.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from conftest import DISTRIBUTION_VOCAB as VOCAB
from conftest import random_head
from test_engine_distribution import chi_square_pvalue
from tiny import char_tokenizer, tiny_model

from engine.llm_engine import LLMEngine, RequestError
from engine.params import SamplingParams, SpecConfig
from engine.sampling import acceptance_overlap, over_acceptance_output, processed_probs, verify
from specdecpp.bench.theory import total_variation, uno_output

EPSILONS = (0.0, 0.05, 0.1, 0.2)
# Explicit target and draft distributions with large and small gaps between them.
P = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04])
Q = torch.tensor([0.10, 0.30, 0.05, 0.35, 0.12, 0.08])



# ----- the acceptance rule on explicit p and q -----------------------------------------------
@pytest.mark.parametrize("epsilon", EPSILONS)
def test_over_acceptance_bias_is_the_theorys_and_lies_on_the_pareto_front(epsilon):
    output, rejection = over_acceptance_output(P, Q, epsilon)
    bias = total_variation(output, P)
    gap = (Q - P).clamp_min(0.0)  # where the draft over-proposes
    assert bias == pytest.approx(float(torch.minimum(gap, torch.tensor(epsilon)).sum()), abs=1e-6)
    assert rejection == pytest.approx(float((gap - epsilon).clamp_min(0.0).sum()), abs=1e-6)
    assert bias + rejection == pytest.approx(total_variation(P, Q), abs=1e-6)  # on the Pareto line
    assert float(output.sum()) == pytest.approx(1.0, abs=1e-6)
    if rejection > 0:  # resampling from p (Decoding-UNO) pays more bias at the same rejection probability
        assert total_variation(uno_output(P, Q, epsilon), P) > bias + 0.01
    if epsilon == 0.0:
        torch.testing.assert_close(output, P)


def first_tokens_of_verify(epsilon: float, n: int, seed: int = 0) -> Counter:
    """The output token of n one-candidate rounds: y ~ Q verified against P (the bonus position is P too)."""
    generator = torch.Generator().manual_seed(seed)
    counts: Counter = Counter()
    for _ in range(n):
        y = torch.multinomial(Q, 1, generator=generator)
        verdict = verify(y, Q.unsqueeze(0), torch.stack([P, P]), generator, epsilon)
        counts[int(y) if verdict.num_accepted == 1 else verdict.next_token] += 1
    return counts


@pytest.mark.parametrize("epsilon", EPSILONS)
def test_verify_samples_the_over_acceptance_output(epsilon):
    """`verify` with epsilon follows the exact output distribution; its empirical bias is the theory's value,
    and the naive Decoding-UNO distribution is rejected by the same test (the control)."""
    n = 20000
    counts = first_tokens_of_verify(epsilon, n)
    output, _ = over_acceptance_output(P, Q, epsilon)
    assert chi_square_pvalue(counts, {v: float(output[v]) for v in range(len(P))}, n) > 1e-3
    empirical = torch.tensor([counts.get(v, 0) / n for v in range(len(P))])
    assert total_variation(empirical, P) == pytest.approx(total_variation(output, P), abs=0.015)
    uno = uno_output(P, Q, epsilon)
    assert chi_square_pvalue(counts, {v: float(uno[v]) for v in range(len(P))}, n) < 1e-6


def test_verdict_counts_tested_positions_and_expected_acceptance():
    """The test runs at the accepted positions and the rejected one; each passes with sum min(q, p + eps)."""
    target = torch.stack([P, Q, P, P])
    draft = torch.stack([Q, Q, P])
    for epsilon in (0.0, 0.1):
        generator = torch.Generator().manual_seed(3)
        for _ in range(50):
            verdict = verify(torch.tensor([3, 1, 0]), draft, target, generator, epsilon)
            assert verdict.tested == min(verdict.num_accepted + 1, 3)
            assert verdict.rejected == (verdict.num_accepted < 3)
            expected = float(acceptance_overlap(target[: verdict.tested], draft[: verdict.tested], epsilon).sum())
            assert verdict.expected_accepted == pytest.approx(expected)
    assert float(acceptance_overlap(P, Q)) == pytest.approx(1.0 - total_variation(P, Q))


# ----- the engine -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lossy_engine():
    """The distribution tests' sharp 6-token pair, allowed over-acceptance up to 0.2."""
    target = tiny_model(10, vocab_size=VOCAB, hidden=16, layers=1, scale=10.0)
    draft = tiny_model(11, vocab_size=VOCAB, hidden=16, layers=1, scale=10.0)
    return LLMEngine(target, draft, char_tokenizer("abcde"), max_over_acceptance=0.2)


PROMPT = [1, 2, 3]


def next_position(engine: LLMEngine, params: SamplingParams, output: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's and the draft's processed distributions of the token after PROMPT + output."""
    with torch.no_grad():
        ids = torch.tensor([PROMPT + output])
        p = processed_probs(engine.target.model(ids).logits[0, -1], params)
        q = processed_probs(engine.draft.model(ids).logits[0, -1], params)
    return p, q


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_engine_first_candidate_follows_the_over_acceptance_output(lossy_engine, epsilon):
    """The second output token, the first speculative round's single candidate (the first token comes from the
    target alone), follows the over-acceptance output at its position, summed over the first token."""
    params = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True)
    spec = SpecConfig(policy="constant", k=1, over_acceptance=epsilon)
    samples = 1000
    counts = Counter(lossy_engine.generate(PROMPT, params.model_copy(update={"seed": s}), spec).token_ids[1]
                     for s in range(samples))
    first, _ = next_position(lossy_engine, params, [])
    output, target = torch.zeros(VOCAB), torch.zeros(VOCAB)
    for t1 in range(VOCAB):
        p, q = next_position(lossy_engine, params, [t1])
        output += first[t1] * over_acceptance_output(p, q, epsilon)[0]
        target += first[t1] * p
    assert chi_square_pvalue(counts, {v: float(output[v]) for v in range(VOCAB)}, samples) > 1e-3
    if epsilon > 0:  # biased indeed: the target's own distribution is rejected (the theory's bias is large here)
        assert total_variation(output, target) > 0.05
        assert chi_square_pvalue(counts, {v: float(target[v]) for v in range(VOCAB)}, samples) < 1e-6


def test_expected_rejections_predict_the_realized_ones(lossy_engine):
    """Theorem 1: each tested position rejects with probability TV(p, q), so realized rejections minus their
    expectation is a sum of centred Bernoullis (variance at most the expectation)."""
    for epsilon in (0.0, 0.1):
        spec = SpecConfig(policy="constant", k=3, over_acceptance=epsilon)
        realized = expected = positions = accepted = 0.0
        for seed in range(60):
            stats = lossy_engine.generate(
                PROMPT, SamplingParams(temperature=1.0, seed=seed, max_tokens=30, ignore_eos=True), spec).stats
            realized += stats["rejections"]
            expected += stats["expected_rejections"]
            positions += stats["verified_positions"]
            accepted += stats["accepted_tokens"]
            assert stats["lossless"] is (epsilon == 0.0) and stats["over_acceptance"] == epsilon
            assert stats["verified_positions"] >= stats["accepted_tokens"] + stats["rejections"]
        assert expected > 20 and positions > accepted
        assert abs(realized - expected) < 4 * math.sqrt(expected) + 1, (epsilon, realized, expected)


def test_over_acceptance_needs_the_engine_to_allow_it(tiny_pair, tokenizer):
    engine = LLMEngine(*tiny_pair, tokenizer)  # max_over_acceptance 0: every epsilon > 0 is refused
    params = SamplingParams(max_tokens=4)
    with pytest.raises(RequestError, match="over_acceptance") as refused:
        engine.add_request("r", "hi", params, SpecConfig(over_acceptance=0.05))
    assert refused.value.param == "specdec.over_acceptance" and not engine.requests
    assert engine.generate("hi", params, SpecConfig(policy="constant", over_acceptance=0.0)).stats["lossless"]
    with pytest.raises(ValueError, match="per request"):  # never from the server's default spec
        LLMEngine(*tiny_pair, tokenizer, default_spec=SpecConfig(over_acceptance=0.1), max_over_acceptance=0.1)


def test_greedy_stays_the_target_alone_at_epsilon_zero(lossy_engine):
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    reference = lossy_engine.generate(PROMPT, params, SpecConfig(policy="none")).token_ids
    assert lossy_engine.generate(PROMPT, params, SpecConfig(policy="constant", k=3)).token_ids == reference


def test_heads_still_judge_with_over_acceptance(tiny_pair, tokenizer):
    """specdec++ with a head runs with over-acceptance too (the rule changes only acceptance)."""
    target, draft = tiny_pair
    engine = LLMEngine(target, draft, tokenizer, heads={"default": random_head(target.config.hidden_size)},
                       max_over_acceptance=0.1)
    out = engine.generate("hi", SamplingParams(seed=1, max_tokens=12, ignore_eos=True),
                          SpecConfig(policy="specdec++", over_acceptance=0.1))
    assert len(out.token_ids) == 12 and out.stats["lossless"] is False
