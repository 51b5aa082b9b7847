"""KV-cache rollback, stop conditions inside a candidate block, and input validation."""

from __future__ import annotations

import pytest
import torch
from conftest import fresh_prefill, perturbed, random_head, step_checking_caches
from pydantic import ValidationError
from tiny import char_tokenizer, tiny_model

from engine.llm_engine import LLMEngine, RequestError
from engine.loading.loader import VocabularyMismatchError
from engine.params import SamplingParams, SpecConfig
from engine.runner import ModelRunner
from engine.scheduler import SchedulerConfig


@pytest.mark.parametrize(
    "spec",
    [SpecConfig(policy="constant", k=4), SpecConfig(policy="specdec++", threshold=0.5, bounds=(1, 8)),
     SpecConfig(policy="confidence", p_min=0.6, bounds=(1, 8))],
    ids=lambda s: s.policy,
)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_caches_equal_fresh_prefill_after_every_round(tiny_pair, tokenizer, spec, temperature):
    target, draft = tiny_pair
    engine = LLMEngine(target, draft, tokenizer, heads={"default": random_head(target.config.hidden_size)})
    engine.add_request("r", "hello world", SamplingParams(temperature=temperature, seed=7, max_tokens=40,
                                                          ignore_eos=True), spec)
    seq = engine.requests["r"]
    rounds, rejected_rounds = step_checking_caches(engine, seq)
    assert rounds > 3 and rejected_rounds > 0  # rollback really happened
    assert seq.target_kv.cache is None and seq.draft_kv.cache is None  # freed when finished


@pytest.fixture(scope="module")
def exact_engine(tokenizer):
    """Draft == target: under greedy decoding every candidate is accepted, blocks are k+1 long."""
    target = tiny_model(0, scale=8.0)
    return LLMEngine(target, perturbed(target, 0.0, seed=0), tokenizer)


GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
K4 = SpecConfig(policy="constant", k=4)


def test_max_tokens_exact(exact_engine):
    reference = exact_engine.generate("abc", GREEDY, SpecConfig(policy="none"))
    for max_tokens in (1, 2, 6, 7, 13):
        out = exact_engine.generate("abc", GREEDY.model_copy(update={"max_tokens": max_tokens}), K4)
        assert out.token_ids == reference.token_ids[:max_tokens]
        assert out.finish_reason == "length"
        assert out.stats["generated_tokens"] == max_tokens


def test_eos_inside_candidate_block(exact_engine):
    reference = exact_engine.generate("abc", GREEDY, SpecConfig(policy="none")).token_ids
    # Make a token that first appears mid-block (block = 4 candidates + 1) the EOS.
    position = next(i for i, t in enumerate(reference) if i % 5 not in (0, 4) and t not in reference[:i])
    eos = reference[position]
    exact_engine.eos_token_ids = frozenset({eos})
    try:
        out = exact_engine.generate("abc", GREEDY.model_copy(update={"ignore_eos": False}), K4)
    finally:
        exact_engine.eos_token_ids = frozenset({0})
    assert out.token_ids == reference[: position + 1]
    assert out.finish_reason == "stop"
    assert out.stats["discarded_tokens"] > 0  # candidates after the EOS were thrown away
    assert out.text == exact_engine.tokenizer.decode(reference[:position], skip_special_tokens=True)


def test_stop_string_inside_candidate_block(exact_engine):
    reference = exact_engine.generate("abc", GREEDY, SpecConfig(policy="none"))
    text = reference.text  # one character per token with the char tokenizer
    start = next(i for i in range(2, len(text) - 2) if i % 5 not in (0, 4) and text.find(text[i : i + 2]) == i)
    stop = text[start : start + 2]
    out = exact_engine.generate("abc", GREEDY.model_copy(update={"stop": (stop,)}), K4)
    assert out.text == text[:start]
    assert out.finish_reason == "stop"
    assert out.token_ids == reference.token_ids[: start + 2]  # up to the token completing the stop string


def test_stop_string_never_streamed(exact_engine):
    reference = exact_engine.generate("abc", GREEDY, SpecConfig(policy="none")).text
    stop = reference[10:13]
    engine = exact_engine
    engine.add_request("s", "abc", GREEDY.model_copy(update={"stop": (stop,)}), SpecConfig(policy="constant", k=2))
    streamed = ""
    while "s" in engine.requests:
        for event in engine.step():
            streamed += event.text
            if not event.finished:
                assert stop not in streamed
    assert streamed == reference[: reference.find(stop)]


def test_abort_frees_caches(tiny_pair, tokenizer):
    engine = LLMEngine(*tiny_pair, tokenizer)
    engine.add_request("x", "hello", GREEDY, K4)
    engine.step()
    seq = engine.requests["x"]
    event = engine.abort("x")
    assert event.finished and event.finish_reason == "abort"
    assert seq.target_kv.cache is None and seq.draft_kv.cache is None and not engine.has_unfinished()


# ----- validation ----------------------------------------------------------------------

def test_mismatched_vocabularies(tokenizer):
    target = tiny_model(0)
    with pytest.raises(VocabularyMismatchError, match="vocabulary sizes differ"):
        LLMEngine(target, tiny_model(1, vocab_size=40), tokenizer)
    other = char_tokenizer("zyxwvutsrqponmlkjihgfedcba .,\n")
    with pytest.raises(VocabularyMismatchError, match="tokenizers differ"):
        LLMEngine(target, tiny_model(1), tokenizer, draft_tokenizer=other)


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"k": 0}, "greater than or equal to 1"), ({"threshold": 0.0}, r"\"auto\" or a number in \(0, 1\)"),
     ({"threshold": 1.0}, r"\"auto\" or a number in \(0, 1\)"), ({"bounds": (5, 2)}, "must be <= max"),
     ({"policy": "fastest"}, "Input should be")],
)
def test_spec_config_errors(fields, message):
    with pytest.raises(ValidationError, match=message):
        SpecConfig(**fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"temperature": -0.1}, "greater than or equal to 0"), ({"top_p": 0.0}, "greater than 0"),
     ({"top_p": 1.5}, "less than or equal to 1"), ({"max_tokens": 0}, "greater than or equal to 1"),
     ({"stop": [""]}, "non-empty")],
)
def test_sampling_params_errors(fields, message):
    with pytest.raises(ValidationError, match=message):
        SamplingParams(**fields)


def test_request_errors(tiny_pair, tokenizer):
    engine = LLMEngine(*tiny_pair, tokenizer)  # no head
    with pytest.raises(RequestError, match="needs an acceptance head"):
        engine.add_request("a", "hi", GREEDY, SpecConfig(policy="specdec++"))
    with pytest.raises(RequestError, match="exceeds the model's context") as info:
        engine.add_request("b", "hi", GREEDY.model_copy(update={"max_tokens": 10_000}), K4)
    assert info.value.param == "max_tokens"
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("c", [], GREEDY, K4)
    with pytest.raises(RequestError, match="token ids"):
        engine.add_request("d", [1, 99999], GREEDY, K4)
    assert not engine.has_unfinished()
    target_only = LLMEngine(tiny_pair[0], None, tokenizer)
    with pytest.raises(RequestError, match="needs a draft"):
        target_only.add_request("e", "hi", GREEDY, K4)


# ----- n choices: one prefill, forked --------------------------------------------------

def run_to_end(engine: LLMEngine) -> dict[str, list[int]]:
    """Step until every request finished; each request's output tokens."""
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for event in engine.step():
            out.setdefault(event.request_id, []).extend(event.token_ids)
    return out


def count_calls(monkeypatch, runner: ModelRunner) -> list[int]:
    """Count `runner.forward` calls (the prefill's; rounds use forward_batch): one entry per call."""
    calls: list[int] = []
    forward = runner.forward

    def counted(input_ids, cache, num_logits=1):
        calls.append(input_ids.shape[-1])
        return forward(input_ids, cache, num_logits)

    monkeypatch.setattr(runner, "forward", counted)
    return calls


def test_forked_caches_equal_a_fresh_prefill(tiny_pair, tokenizer, monkeypatch):
    engine = LLMEngine(*tiny_pair, tokenizer)
    prefills = count_calls(monkeypatch, engine.target)
    admitted = engine.add_request("r", "hello world", SamplingParams(temperature=1.0, seed=3, max_tokens=8), K4, n=3)
    assert [a.request_id for a in admitted] == ["r.0", "r.1", "r.2"]
    seqs = [engine.requests[a.request_id] for a in admitted]
    engine.scheduler.admit()
    leader = seqs[0]
    leader.prefilled = engine_prefill(engine, leader)
    engine._share_prefill(leader)
    assert prefills == [len("hello world") - 1]  # the prompt went through the target once
    prompt = leader.prompt_ids[:-1]
    for seq in seqs[1:]:
        assert seq.prefilled
        assert seq.draft_kv.cached == leader.draft_kv.cached == 0  # the draft's prefill waits for the first token
        for runner, kv, lead in ((engine.target, seq.target_kv, leader.target_kv),):
            assert kv.cached == len(prompt) == kv.cache.get_seq_length()
            reference = fresh_prefill(runner, prompt)
            for layer, fresh, lead_layer in zip(kv.cache.layers, reference.layers, lead.cache.layers, strict=True):
                torch.testing.assert_close(layer.keys, fresh.keys, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(layer.values, fresh.values, atol=1e-5, rtol=1e-4)
                assert layer.keys.data_ptr() != lead_layer.keys.data_ptr()  # its own copy: rollbacks stay apart
    run_to_end(engine)


def engine_prefill(engine: LLMEngine, seq) -> bool:
    from engine.speculate import prefill_chunk

    return prefill_chunk(seq, engine.target, engine.scheduler.config.max_num_batched_tokens)


def test_n_choices_prefill_once_and_match_n_1(tiny_pair, tokenizer, monkeypatch):
    engine = LLMEngine(*tiny_pair, tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    single = run_to_end_one(engine, "g1", params, 1)
    prefills = count_calls(monkeypatch, engine.target)
    greedy = run_to_end_one(engine, "g3", params, 3)
    assert len(prefills) == 1
    assert greedy == [single[0]] * 3  # greedy choices are identical, and the n=1 answer
    sampled = SamplingParams(temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    alone = run_to_end_one(engine, "s1", sampled, 1)
    three = run_to_end_one(engine, "s3", sampled, 3)
    assert three[0] == alone[0]  # choice 0 is the n=1 answer of the same seed
    assert run_to_end_one(engine, "s3-again", sampled, 3) == three  # reproducible
    assert len({tuple(t) for t in three}) > 1  # and the choices are independent draws


def run_to_end_one(engine: LLMEngine, request_id: str, params: SamplingParams, n: int) -> list[list[int]]:
    engine.add_request(request_id, "the quick", params, K4, n=n)
    out = run_to_end(engine)
    return [out[i] for i in ([request_id] if n == 1 else [f"{request_id}.{j}" for j in range(n)])]


def test_n_choices_share_the_kv_budget(tiny_pair, tokenizer):
    engine = LLMEngine(*tiny_pair, tokenizer, scheduler_config=SchedulerConfig(kv_cache_tokens=300))
    with pytest.raises(RequestError, match="choices") as info:
        engine.add_request("a", "hello", GREEDY.model_copy(update={"max_tokens": 100}), K4, n=3)
    assert (info.value.param, info.value.code) == ("n", "context_length_exceeded")
    with pytest.raises(RequestError) as info:
        engine.add_request("b", "hello", GREEDY, K4, n=17)
    assert info.value.param == "n"
    admitted = engine.add_request("c", "hello", GREEDY.model_copy(update={"max_tokens": None}), K4, n=3)
    seqs = [engine.requests[a.request_id] for a in admitted]
    assert {s.params.max_tokens for s in seqs} == {300 // 3 - len(seqs[0].prompt_ids)}  # the room, shared
    for a in admitted:
        engine.abort(a.request_id)
