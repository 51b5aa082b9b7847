"""Multi-draft rounds (batch speculative decoding, Yin et al. 2024, Algorithm 4): lossless, caches exact,
more tokens accepted per target call than one draft."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import fresh_prefill, random_head, step_checking_caches
from test_engine_batching import run_all
from test_engine_distribution import PAIR, PROMPT, SAMPLES, T1, chi_square_pvalue, exact_two_token_distribution
from test_theory import P, Q

import engine.sampling as sampling
from engine.llm_engine import LLMEngine, RequestError
from engine.params import SamplingParams, SpecConfig
from engine.runner import ModelRunner, SharedPrefixCache
from engine.sampling import acceptance_overlap, verify_paths
from engine.scheduler import SchedulerConfig
from specdecpp.bench.theory import total_variation

SEED_OFFSET = 1000
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
SPECS = [
    SpecConfig(policy="constant", k=3, num_drafts=2),
    SpecConfig(policy="constant", k=2, num_drafts=3),
    SpecConfig(policy="heuristic", k=2, bounds=(1, 8), num_drafts=2),
    SpecConfig(policy="confidence", p_min=0.5, bounds=(1, 6), num_drafts=3),
    SpecConfig(policy="specdec++", threshold=0.4, bounds=(1, 6), num_drafts=2),
]


@pytest.fixture(scope="module")
def engine(tiny_pair, tokenizer):
    target, draft = tiny_pair
    return LLMEngine(target, draft, tokenizer, heads={"default": random_head(target.config.hidden_size)})


def no_residual_update(residual: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """A wrong rule for the controls: every path is tested against the target's p itself, as is the correction."""
    return residual.unsqueeze(0)


# ----- the rule on explicit p and q -----------------------------------------------------------
def first_tokens_of_paths(num_drafts: int, n: int) -> tuple[Counter, float]:
    """The output token of n one-candidate rounds of `num_drafts` paths y_m ~ Q against P, and how often
    the round accepted a candidate."""
    generator = torch.Generator().manual_seed(0)
    counts: Counter = Counter()
    accepted = 0
    for _ in range(n):
        paths = [torch.multinomial(Q, 1, generator=generator) for _ in range(num_drafts)]
        winner, verdict = verify_paths(paths, [Q.unsqueeze(0)] * num_drafts, [torch.stack([P, P])] * num_drafts,
                                       generator)
        counts[int(paths[winner]) if verdict.num_accepted else verdict.next_token] += 1
        accepted += verdict.num_accepted
        assert verdict.tested == 1 and verdict.rejected == (verdict.num_accepted == 0)
    return counts, accepted / n


@pytest.mark.parametrize("num_drafts", [2, 3])
def test_paths_rule_is_lossless_and_accepts_more(num_drafts):
    n = 20000
    counts, acceptance = first_tokens_of_paths(num_drafts, n)
    assert chi_square_pvalue(counts, {v: float(P[v]) for v in range(len(P))}, n) > 1e-3
    # P(some path accepted) = 1 - prod_j TV(r_j, q), the residual chain r_1 = p, r_{j+1} = norm(max(0, r_j - q))
    residual, all_reject = P, 1.0
    for _ in range(num_drafts):
        all_reject *= 1.0 - float(acceptance_overlap(residual, Q))
        residual = (residual - Q).clamp_min(0.0) / (residual - Q).clamp_min(0.0).sum()
    assert acceptance == pytest.approx(1.0 - all_reject, abs=0.015)
    assert 1.0 - all_reject > 1.0 - total_variation(P, Q) + 0.05  # more than one path accepts
    _, verdict = verify_paths([torch.tensor([1])] * num_drafts, [Q.unsqueeze(0)] * num_drafts,
                              [torch.stack([P, P])] * num_drafts, torch.Generator().manual_seed(1))
    assert verdict.expected_accepted == pytest.approx(1.0 - all_reject, abs=1e-5)


def test_paths_rule_control_without_residuals_fails(monkeypatch):
    monkeypatch.setattr(sampling, "residual_of", no_residual_update)
    n = 20000
    counts, _ = first_tokens_of_paths(3, n)
    assert chi_square_pvalue(counts, {v: float(P[v]) for v in range(len(P))}, n) < 1e-6


def test_paths_follow_the_accepted_prefix_and_take_the_bonus():
    """Paths that disagree with the accepted token drop out; the longest agreeing path continues; the bonus
    comes from p after the winner's last candidate."""
    one_hot = torch.eye(4)
    target = [torch.stack([one_hot[2], one_hot[3], one_hot[1], one_hot[0]])] * 3  # the target says 2, 3, 1, 0
    paths = [torch.tensor([1, 3, 1]), torch.tensor([2, 3]), torch.tensor([2, 3, 1])]
    drafts = [torch.stack([one_hot[int(t)] for t in path]) for path in paths]
    winner, verdict = verify_paths(paths, drafts, [t[: len(p) + 1] for t, p in zip(target, paths, strict=True)],
                                   torch.Generator().manual_seed(0))
    assert (winner, verdict.num_accepted, verdict.next_token) == (2, 3, 0)
    assert verdict.tested == 3 and verdict.expected_accepted == pytest.approx(3.0)


# ----- the runner -----------------------------------------------------------------------------
def test_paths_sharing_a_prefix_equal_single_forwards(tiny_pair):
    """Rows reading one shared cache, next to a plain row, equal one forward per full sequence; twice, so the
    paths' own caches written by the first forward are right too; the shared cache is never written."""
    runner = ModelRunner(tiny_pair[0])
    prefix, other = [1, 2, 3, 4, 5], [9, 8, 7]
    shared, plain = fresh_prefill(runner, prefix), fresh_prefill(runner, other)
    paths = [SharedPrefixCache(shared, runner.new_cache()) for _ in range(3)]
    feeds = [[[6, 10], [6, 11, 12], [6], [1, 2]], [[13], [14, 15], [16, 17], [3]]]
    history = [prefix, prefix, prefix, other]
    for step in feeds:
        _, logits = runner.forward_batch(step, [*paths, plain], [len(f) for f in step])
        for i, feed in enumerate(step):
            history[i] = history[i] + feed
            _, ref = runner.forward(torch.tensor([history[i]]), runner.new_cache(), num_logits=len(feed))
            torch.testing.assert_close(logits[i], ref[0], atol=1e-5, rtol=1e-4)
    assert shared.get_seq_length() == len(prefix) and [p.own.get_seq_length() for p in paths] == [3, 5, 3]


# ----- the engine -----------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.policy}-m{s.num_drafts}")
def test_greedy_identical_to_target_alone(engine, spec):
    for prompt in ("hello world", "a"):
        reference = engine.generate(prompt, GREEDY, SpecConfig(policy="none"))
        out = engine.generate(prompt, GREEDY, spec)
        assert out.token_ids == reference.token_ids
        assert out.stats["proposed_tokens"] > 0 and len(out.stats["accepted_paths"]) > 0


def test_greedy_identical_in_a_mixed_batch(tiny_pair, tokenizer):
    target, draft = tiny_pair
    engine = LLMEngine(target, draft, tokenizer, heads={"default": random_head(target.config.hidden_size)},
                       scheduler_config=SchedulerConfig(max_num_seqs=4))
    specs = [SpecConfig(policy="constant", k=3), *SPECS[:3], SpecConfig(policy="none")]
    prompts = ["hello world", "the quick brown fox", "a", "zz top", "lorem ipsum"]
    reference = {f"r{i}": engine.generate(p, GREEDY, SpecConfig(policy="none")).token_ids
                 for i, p in enumerate(prompts)}
    requests = [(f"r{i}", p, GREEDY.model_copy(update={"max_tokens": 16 + 4 * i}), spec)
                for i, (p, spec) in enumerate(zip(prompts, specs, strict=True))]
    outputs = run_all(engine, requests)
    for rid, _, params, _ in requests:
        assert outputs[rid] == reference[rid][: params.max_tokens], rid


def sample_two_tokens(engine: LLMEngine, spec: SpecConfig) -> Counter:
    """SAMPLES seeded outputs' `PAIR` tokens, on seeds apart from the single-draft tests' (a fixed seed set fails a
    correct rule at p < 1e-3 once in a thousand)."""
    seeds = range(SEED_OFFSET, SEED_OFFSET + SAMPLES)
    return Counter(tuple(engine.generate(PROMPT, T1.model_copy(update={"seed": s}), spec).token_ids[PAIR])
                   for s in seeds)


@pytest.mark.parametrize("num_drafts", [2, 3])
def test_distribution_matches_the_target(distribution_engine, num_drafts):
    counts = sample_two_tokens(distribution_engine, SpecConfig(policy="constant", k=3, num_drafts=num_drafts))
    pvalue = chi_square_pvalue(counts, exact_two_token_distribution(distribution_engine, T1), SAMPLES)
    assert pvalue > 1e-3, f"M={num_drafts}: chi-square p={pvalue:.2e}"


def test_distribution_control_without_residuals_fails(distribution_engine, monkeypatch):
    monkeypatch.setattr(sampling, "residual_of", no_residual_update)
    counts = sample_two_tokens(distribution_engine, SpecConfig(policy="constant", k=3, num_drafts=3))
    assert chi_square_pvalue(counts, exact_two_token_distribution(distribution_engine, T1), SAMPLES) < 1e-6


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_caches_equal_fresh_prefill_after_every_round(engine, temperature):
    spec = SpecConfig(policy="specdec++", threshold=0.5, bounds=(1, 6), num_drafts=3)
    engine.add_request("m", "hello world", SamplingParams(temperature=temperature, seed=3, max_tokens=40,
                                                          ignore_eos=True), spec)
    seq = engine.requests["m"]
    step_checking_caches(engine, seq)
    stats = seq.stats
    # The first round runs the target alone, the last may not speculate.
    assert stats.rounds - 2 <= len(stats.accepted_paths) <= stats.rounds - 1 and stats.candidate_lengths[0] == 0
    assert stats.rounds > 3
    assert stats.rejections > 0
    assert set(stats.accepted_paths) <= {0, 1, 2}
    if temperature:  # sampled paths differ, so a path other than the first must win sometimes
        assert max(stats.accepted_paths) > 0


def test_more_tokens_accepted_per_target_call_and_budgets_count_all_paths(engine):
    per_call = {}
    for num_drafts in (1, 3):
        accepted = calls = 0
        for seed in range(8):
            stats = engine.generate("hello world", SamplingParams(seed=seed, max_tokens=40, ignore_eos=True),
                                    SpecConfig(policy="constant", k=2, num_drafts=num_drafts)).stats
            accepted, calls = accepted + stats["accepted_tokens"], calls + stats["target_calls"]
            assert stats["accepted_per_target_call"] == stats["accepted_tokens"] / stats["target_calls"]
            full = [c for c in stats["candidate_lengths"] if c]
            assert full and max(full) == 2 * num_drafts  # every path's candidates count
        per_call[num_drafts] = accepted / calls
    assert per_call[3] > per_call[1] + 0.1


def test_scheduler_cap_is_shared_by_the_paths(tiny_pair, tokenizer):
    target, draft = tiny_pair
    engine = LLMEngine(target, draft, tokenizer, scheduler_config=SchedulerConfig(spec_batch_candidates=4))
    stats = engine.generate("hi", SamplingParams(seed=0, max_tokens=20, ignore_eos=True),
                            SpecConfig(policy="constant", k=4, num_drafts=3)).stats
    assert max(stats["candidate_lengths"]) == 3  # a cap of 4 for one sequence: one candidate on each of 3 paths


def test_num_drafts_with_over_acceptance_is_refused(tiny_pair, tokenizer):
    engine = LLMEngine(*tiny_pair, tokenizer, max_over_acceptance=0.1)
    with pytest.raises(RequestError) as refused:
        engine.add_request("r", "hi", SamplingParams(max_tokens=4),
                           SpecConfig(policy="constant", num_drafts=2, over_acceptance=0.1))
    assert refused.value.param == "specdec.over_acceptance"


def test_logprobs_come_from_the_winning_path(engine):
    params = GREEDY.model_copy(update={"logprobs": 2, "max_tokens": 12})
    reference = engine.generate("hello", params, SpecConfig(policy="none"))
    engine.add_request("lp", "hello", params, SpecConfig(policy="constant", k=3, num_drafts=2))
    seq = engine.requests["lp"]
    while engine.has_unfinished():
        engine.step()
    engine.add_request("ref", "hello", params, SpecConfig(policy="none"))
    ref_seq = engine.requests["ref"]
    while engine.has_unfinished():
        engine.step()
    assert seq.output_ids == reference.token_ids
    for got, want in zip(seq.output_logprobs, ref_seq.output_logprobs, strict=True):
        assert got.token_id == want.token_id and got.logprob == pytest.approx(want.logprob, abs=1e-4)
