"""Greedy speculative output is token-identical to the target alone, for every policy."""

from __future__ import annotations

import pytest
import torch
from conftest import random_head

from engine.llm_engine import LLMEngine
from engine.params import SamplingParams, SpecConfig
from heads.model import AcceptanceHead, HeadConfig

SPECS = [
    SpecConfig(policy="constant", k=1),
    SpecConfig(policy="constant", k=3),
    SpecConfig(policy="constant", k=8),
    SpecConfig(policy="heuristic", k=2, bounds=(1, 10)),
    SpecConfig(policy="confidence", p_min=0.3, bounds=(1, 8)),
    SpecConfig(policy="confidence", p_min=0.8, bounds=(2, 6)),
    SpecConfig(policy="specdec++", threshold=0.2, bounds=(1, 10)),
    SpecConfig(policy="specdec++", threshold=0.7, bounds=(2, 20)),
    SpecConfig(policy="specdec++", threshold=0.4, bounds=(1, 10), free_final_token=False),
]
PROMPTS = ["hello world", "the quick brown fox", "a"]


@pytest.fixture(scope="module")
def engine(tiny_pair, tokenizer):
    target, draft = tiny_pair
    return LLMEngine(target, draft, tokenizer, head=random_head(target.config.hidden_size))


@pytest.mark.parametrize("spec", SPECS,
                         ids=lambda s: f"{s.policy}-{s.k}-{s.threshold}-{s.p_min}-{int(s.free_final_token)}")
def test_greedy_identical_to_target_alone(engine, spec):
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    proposed = 0
    for prompt in PROMPTS:
        reference = engine.generate(prompt, params, SpecConfig(policy="none"))
        out = engine.generate(prompt, params, spec)
        assert out.token_ids == reference.token_ids
        assert out.text == reference.text
        assert out.stats["generated_tokens"] == 48
        proposed += out.stats["proposed_tokens"]
    assert proposed > 0  # the draft really ran


def test_target_alone_stats(engine):
    out = engine.generate("hello", SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
                          SpecConfig(policy="none"))
    s = out.stats
    assert s["target_calls"] == 10 and s["proposed_tokens"] == 0
    assert s["verification_rate"] == 1.0 and s["discard_rate"] == 0.0


def test_stats_definitions(engine):
    out = engine.generate("hello world", SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
                          SpecConfig(policy="constant", k=4))
    s = out.stats
    assert s["generated_tokens"] == 40
    assert s["discarded_tokens"] == s["proposed_tokens"] - s["accepted_tokens"]
    assert s["discard_rate"] == pytest.approx(s["discarded_tokens"] / 40)
    assert s["verification_rate"] == pytest.approx(s["target_calls"] / 40)
    assert s["acceptance_rate"] == pytest.approx(s["accepted_tokens"] / s["proposed_tokens"])
    assert sum(s["candidate_lengths"]) == s["proposed_tokens"]
    assert sum(s["accepted_lengths"]) == s["accepted_tokens"]
    # every round yields its accepted drafts plus one target token
    assert s["accepted_tokens"] + s["rounds"] == 40
    assert 0.0 < s["acceptance_rate"] < 1.0


def test_seed_reproducible(engine):
    params = SamplingParams(temperature=1.0, max_tokens=30, seed=123, ignore_eos=True)
    spec = SpecConfig(policy="specdec++", threshold=0.5)
    a = engine.generate("hello", params, spec)
    b = engine.generate("hello", params, spec)
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize("free_final_token", [True, False])
def test_free_final_token_costs_no_draft_forward(tiny_pair, tokenizer, free_final_token):
    """A head that predicts rejection stops every round at the min bound (2). The draft makes
    the same forwards per round either way (the round's start, y_1, y_2); with the free final
    token the logits of the forward on y_2 propose y_3, so rounds hold 3 candidates."""
    target, draft = tiny_pair
    head = AcceptanceHead(HeadConfig(hidden_size=target.config.hidden_size, depth=1, draft_id="tiny"))
    with torch.no_grad():
        head.out.bias.copy_(torch.tensor([8.0, -8.0]))  # P(accepted) ~ 3e-7 whatever the input
    engine = LLMEngine(target, draft, tokenizer, head=head)
    calls = []
    hook = engine.draft.decoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        spec = SpecConfig(policy="specdec++", threshold=0.5, bounds=(2, 20), free_final_token=free_final_token)
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        out = engine.generate("hello world", params, spec)
    finally:
        hook.remove()
    reference = engine.generate("hello world", params, SpecConfig(policy="none"))
    assert out.token_ids == reference.token_ids
    # Replay each round's budget (max bound, and max_tokens - 1 left) to know what it allowed.
    remaining, expected_lengths, expected_calls = 40, [], 1  # 1: the prompt's prefill forward
    for accepted in out.stats["accepted_lengths"]:
        budget = min(20, remaining - 1)
        if budget >= 3:  # the head stopped the round at y_2, after the forward on y_2
            expected_lengths.append(3 if free_final_token else 2)
            expected_calls += 3  # the round's start, y_1, y_2
        else:  # cut by the budget: no forward on the last candidate
            expected_lengths.append(budget)
            expected_calls += budget
        remaining -= accepted + 1
    assert out.stats["candidate_lengths"] == expected_lengths
    assert len(calls) == expected_calls
