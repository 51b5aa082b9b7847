"""Greedy speculative output is token-identical to the target alone, for every policy."""

from __future__ import annotations

import pytest
import torch
from conftest import CHEAP_DRAFT_COSTS, random_head

from engine.head import AcceptanceHead, HeadConfig
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
    SpecConfig(policy="specdec++", threshold=0.4, bounds=(1, 10), head="after"),
    SpecConfig(policy="specdec++", threshold=0.1, bounds=(1, 4), head="after"),
    SpecConfig(policy="specdec++", threshold="auto", bounds=(1, 10)),
    SpecConfig(policy="specdec++", threshold="auto", bounds=(1, 10), head="after"),
]
PROMPTS = ["hello world", "the quick brown fox", "a"]


@pytest.fixture(scope="module")
def engine(tiny_pair, tokenizer):
    target, draft = tiny_pair
    heads = {"default": random_head(target.config.hidden_size),
             "after": random_head(target.config.hidden_size, seed=1, timing="after")}
    return LLMEngine(target, draft, tokenizer, heads=heads, costs=CHEAP_DRAFT_COSTS)


@pytest.mark.parametrize("spec", SPECS,
                         ids=lambda s: f"{s.policy}-{s.k}-{s.threshold}-{s.p_min}-{s.head}")
def test_greedy_identical_to_target_alone(engine, spec):
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    proposed = 0
    for prompt in PROMPTS:
        # The deployment's acceptance estimate carries over from earlier tests; the tiny greedy pair agrees so
        # rarely that "auto" would stop proposing: start each request where speculation pays.
        engine.tuning.acceptance = 0.9
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


def rejecting_head(hidden: int, timing: str) -> AcceptanceHead:
    """A head whose calibrated P(accepted) is ~3e-7 whatever it reads: it stops every round it may."""
    head = AcceptanceHead(HeadConfig(hidden_size=hidden, depth=1, timing=timing, draft_id="tiny"))
    with torch.no_grad():
        head.out.bias.fill_(-15.0)
    return head.eval()


@pytest.mark.parametrize("timing,low", [("before", 1), ("before", 2), ("after", 1), ("after", 3)])
def test_every_candidate_judged_and_bounds_hold(tiny_pair, tokenizer, timing, low):
    """A head predicting rejection stops every round as early as the bounds allow, the first
    candidate included. A "before" head stops at y_low without a draft forward on it (forwards per
    round: the round's start and y_1..y_{low-1}). An "after" head judges y_s after the forward on it
    and submits y_{s+1} from that forward: rounds of max(2, low) candidates, as many forwards."""
    target, draft = tiny_pair
    engine = LLMEngine(target, draft, tokenizer, heads={"default": rejecting_head(target.config.hidden_size, timing)})
    calls = []
    hook = engine.draft.decoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        spec = SpecConfig(policy="specdec++", threshold=0.5, bounds=(low, 20))
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        out = engine.generate("hello world", params, spec)
    finally:
        hook.remove()
    reference = engine.generate("hello world", params, SpecConfig(policy="none"))
    assert out.token_ids == reference.token_ids
    shortest = max(2, low) if timing == "after" else low
    # Replay each round's budget (max bound, and max_tokens - 1 left) to know what it allowed.
    # The first round runs the target alone; the draft's prefill is the catch-up forward of the second.
    remaining, expected_lengths, expected_calls = 40, [], 1
    for i, accepted in enumerate(out.stats["accepted_lengths"]):
        length = min(shortest, 20, remaining - 1) if i > 0 else 0
        expected_lengths.append(length)
        expected_calls += length  # the round's start, then one forward per candidate but the last
        remaining -= accepted + 1
    assert out.stats["candidate_lengths"] == expected_lengths
    assert len(calls) == expected_calls
    if timing == "before" and low == 1:
        assert max(out.stats["candidate_lengths"]) == 1  # one-candidate rounds: y_1 itself was judged


def test_unknown_head_is_a_request_error(engine):
    from engine.llm_engine import RequestError

    with pytest.raises(RequestError, match="acceptance head 'nope'"):
        engine.add_request("x", "hi", SamplingParams(max_tokens=4), SpecConfig(policy="specdec++", head="nope"))


def test_an_engine_without_a_draft_defaults_to_the_target_alone(tiny_pair, tokenizer):
    """With no draft (and so no head) the default spec is the target alone, as the factory narrows a configured
    one; constant k would fail every request for want of a draft."""
    target, _ = tiny_pair
    engine = LLMEngine(target, None, tokenizer, costs=CHEAP_DRAFT_COSTS)
    assert engine.default_spec.policy == "none"
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    assert len(engine.generate("hello world", params).token_ids) == 6
