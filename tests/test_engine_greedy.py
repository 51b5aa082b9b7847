"""Greedy speculative output is token-identical to the target alone, for every policy."""

from __future__ import annotations

import pytest
from conftest import random_head

from engine.llm_engine import LLMEngine
from engine.params import SamplingParams, SpecConfig

SPECS = [
    SpecConfig(policy="constant", k=1),
    SpecConfig(policy="constant", k=3),
    SpecConfig(policy="constant", k=8),
    SpecConfig(policy="heuristic", k=2, bounds=(1, 10)),
    SpecConfig(policy="confidence", p_min=0.3, bounds=(1, 8)),
    SpecConfig(policy="confidence", p_min=0.8, bounds=(2, 6)),
    SpecConfig(policy="specdec++", threshold=0.2, bounds=(1, 10)),
    SpecConfig(policy="specdec++", threshold=0.7, bounds=(2, 20)),
]
PROMPTS = ["hello world", "the quick brown fox", "a"]


@pytest.fixture(scope="module")
def engine(tiny_pair, tokenizer):
    target, draft = tiny_pair
    return LLMEngine(target, draft, tokenizer, head=random_head(target.config.hidden_size))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.policy}-{s.k}-{s.threshold}-{s.p_min}")
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
