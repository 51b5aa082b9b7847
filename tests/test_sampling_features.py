"""Penalties, logit bias, min_tokens, stop_token_ids and logprobs, lossless under speculation.

Penalties, bias and min_tokens define a modified target distribution; the draft's q gets the
same modification with the same history (the candidates before a position included), so the
speculative output follows the modified target exactly. The tests check it three ways: greedy
identity with the target alone, the target alone against a plain-Python reference decoder, and
a chi-square test of the sampled distribution whose control (candidates left out of the
history) must fail. Logprobs come from the verification pass and must equal the target alone's.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from conftest import random_head
from test_engine_distribution import PAIR, chi_square_pvalue, exact_pair_distribution

import engine.sampling as sampling
from engine.events import TokenLogprob
from engine.llm_engine import LLMEngine, RequestError
from engine.params import SamplingParams, SpecConfig
from engine.sampling import processed_logits

EOS = 0
GREEDY = dict(temperature=0.0, max_tokens=40, ignore_eos=True)
SPECS = [
    SpecConfig(policy="constant", k=3),
    SpecConfig(policy="constant", k=8),
    SpecConfig(policy="specdec++", threshold=0.4, bounds=(1, 10)),
]
TARGET_ALONE = SpecConfig(policy="none")
TRANSFORMS = {
    "presence": dict(presence_penalty=1.5),
    "frequency": dict(frequency_penalty=1.0),
    "repetition": dict(repetition_penalty=1.8),
    "logit_bias": dict(logit_bias={3: 5.0, 7: -100.0}),
    "min_tokens": dict(min_tokens=30, ignore_eos=False, logit_bias={EOS: 8.0}),
    "all": dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.3, logit_bias={5: 2.0}),
}


@pytest.fixture(scope="module")
def engine(tiny_pair, tokenizer):
    target, draft = tiny_pair
    return LLMEngine(target, draft, tokenizer, heads={"default": random_head(target.config.hidden_size)})


def reference_adjust(logits: list[float], prompt: list[int], output: list[int], params: SamplingParams,
                     eos_ids: frozenset[int]) -> list[float]:
    """The adjustments written out token by token, independently of engine/sampling.py."""
    out = list(logits)
    for token, bias in params.logit_bias.items():
        out[token] += bias
    if len(output) < params.min_tokens:
        for token in set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids)):
            out[token] = -math.inf
    counts = Counter(output)
    for token in range(len(out)):
        if token in counts or token in prompt:
            rp = params.repetition_penalty
            out[token] = out[token] / rp if out[token] > 0 else out[token] * rp
        out[token] -= params.frequency_penalty * counts[token] + params.presence_penalty * (counts[token] > 0)
    return out


def reference_logits(engine: LLMEngine, ids: list[int], params: SamplingParams, prompt_len: int) -> torch.Tensor:
    """Adjusted logits [V] of the target after `ids`, from a full forward (no cache)."""
    with torch.no_grad():
        raw = engine.target.model(torch.tensor([ids], device=engine.target.device)).logits[0, -1].float()
    adjusted = reference_adjust(raw.tolist(), ids[:prompt_len], ids[prompt_len:], params, engine.eos_token_ids)
    return torch.tensor(adjusted)


def run(engine: LLMEngine, prompt, params: SamplingParams, spec: SpecConfig) -> tuple[list[int], list, str]:
    """(token ids, logprobs or None, finish reason) of one request, from its events."""
    engine.add_request("req", prompt, params, spec)
    tokens, logprobs = [], []
    while True:
        for event in engine.step():
            tokens += event.token_ids
            assert (event.logprobs is None) == (params.logprobs is None)
            if event.logprobs is not None:
                assert [lp.token_id for lp in event.logprobs] == event.token_ids
                logprobs += event.logprobs
            if event.finished:
                return tokens, logprobs if params.logprobs is not None else None, event.finish_reason


# ----- greedy identity ------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_greedy_identity_under_each_transformation(engine, name):
    params = SamplingParams(**{**GREEDY, **TRANSFORMS[name]})
    plain = engine.generate("hello world", SamplingParams(**GREEDY), TARGET_ALONE)
    reference = engine.generate("hello world", params, TARGET_ALONE)
    assert reference.token_ids != plain.token_ids  # the transformation matters here
    proposed = 0
    for spec in SPECS:
        out = engine.generate("hello world", params, spec)
        assert out.token_ids == reference.token_ids, spec
        assert out.text == reference.text
        proposed += out.stats["proposed_tokens"]
    assert proposed > 0


@pytest.mark.parametrize("name", ["all", "min_tokens"])
def test_target_alone_follows_the_reference_decoder(engine, name):
    """The engine's transformation is the one written out in `reference_adjust` (greedy, step by step)."""
    params = SamplingParams(**{**GREEDY, **TRANSFORMS[name]})
    prompt = engine.encode("hello world")
    out = engine.generate(prompt, params, TARGET_ALONE)
    ids = list(prompt)
    for _ in range(len(out.token_ids)):
        ids.append(int(reference_logits(engine, ids, params, len(prompt)).argmax()))
        if ids[-1] == EOS and not params.ignore_eos:
            break
    assert out.token_ids == ids[len(prompt) :]


def test_verification_rows_see_what_each_draft_step_saw():
    """The target's rows [K+1, V] in one call equal the draft's one-row calls made after y_1..y_{s-1}
    (and the reference), for every adjustment at once."""
    params = SamplingParams(presence_penalty=0.7, frequency_penalty=0.4, repetition_penalty=1.5, min_tokens=4,
                            logit_bias={2: 3.0}, stop_token_ids=[5], ignore_eos=False)
    prompt, output, eos = [1, 2, 3], [4, 4], frozenset({EOS})
    adjuster = sampling.LogitAdjuster(params, prompt, eos)
    candidates = [torch.tensor([4]), torch.tensor([6]), torch.tensor([4])]
    logits = torch.randn(len(candidates) + 1, 8, generator=torch.Generator().manual_seed(0))
    rows = adjuster.apply(logits, output, candidates)
    for s in range(len(candidates) + 1):
        one = adjuster.apply(logits[s : s + 1], output, candidates[:s])[0]
        drafted = [int(t) for t in candidates[:s]]
        reference = torch.tensor(reference_adjust(logits[s].tolist(), prompt, output + drafted, params, eos))
        assert torch.equal(rows[s], one)
        assert torch.allclose(rows[s], reference, atol=1e-6), s
    assert rows[0, 5] == rows[1, 5] == -math.inf and rows[2, 5] > -math.inf  # min_tokens 4: 2 + 2 generated


# ----- the sampled distribution ---------------------------------------------------------------
PROMPT = [1, 2, 3]
SAMPLES = 1000
PENALISED = SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True, frequency_penalty=2.0,
                           repetition_penalty=3.0, logit_bias={4: 1.0})


def exact_penalised_distribution(engine: LLMEngine, params: SamplingParams) -> dict[tuple[int, int], float]:
    """The modified target's exact distribution of the `PAIR` tokens: penalties see the output so far."""
    return exact_pair_distribution(
        lambda output: reference_logits(engine, PROMPT + output, params, len(PROMPT)).softmax(-1))


def sample_two_tokens(engine: LLMEngine, params: SamplingParams, spec: SpecConfig) -> Counter:
    counts: Counter = Counter()
    for seed in range(SAMPLES):
        counts[tuple(engine.generate(PROMPT, params.model_copy(update={"seed": seed}), spec).token_ids[PAIR])] += 1
    return counts


@pytest.mark.parametrize("spec", [TARGET_ALONE, SpecConfig(policy="constant", k=3),
                                  SpecConfig(policy="specdec++", threshold=0.4, bounds=(1, 6))],
                         ids=lambda s: s.policy)
def test_penalised_distribution_matches_the_modified_target(distribution_engine, spec):
    counts = sample_two_tokens(distribution_engine, PENALISED, spec)
    pvalue = chi_square_pvalue(counts, exact_penalised_distribution(distribution_engine, PENALISED), SAMPLES)
    assert pvalue > 1e-3, f"{spec.policy}: chi-square p={pvalue:.2e}"


def test_candidates_left_out_of_the_history_is_detected(distribution_engine, monkeypatch):
    """Control: penalising q and p with the output alone, not the candidates before the position, changes
    the distribution (a candidate repeated is not penalised), and the same test sees it."""
    original = sampling.history_counts
    monkeypatch.setattr(sampling, "history_counts", lambda counts, drafted, rows: original(counts, [], rows))
    counts = sample_two_tokens(distribution_engine, PENALISED, SpecConfig(policy="constant", k=3))
    pvalue = chi_square_pvalue(counts, exact_penalised_distribution(distribution_engine, PENALISED), SAMPLES)
    assert pvalue < 1e-6


# ----- stop_token_ids and min_tokens, exact inside a block -------------------------------------
@pytest.fixture(scope="module")
def plain_run(engine) -> tuple[list[int], int]:
    """The greedy output ignoring EOS, and a position i >= 5 where a token occurs for the first time."""
    tokens = engine.generate("hello world", SamplingParams(**GREEDY), TARGET_ALONE).token_ids
    i = next(i for i in range(5, len(tokens)) if tokens[i] not in tokens[:i])
    return tokens, i


@pytest.mark.parametrize("spec", [TARGET_ALONE, *SPECS], ids=lambda s: f"{s.policy}-{s.k}")
def test_stop_token_ids_end_exactly_inside_a_block(engine, tokenizer, plain_run, spec):
    tokens, i = plain_run
    params = SamplingParams(**{**GREEDY, "stop_token_ids": [tokens[i]]})  # a stop even with ignore_eos
    out = engine.generate("hello world", params, spec)
    assert out.token_ids == tokens[: i + 1] and out.finish_reason == "stop"
    assert out.text == tokenizer.decode(tokens[:i])  # the stop token's text is not returned


@pytest.mark.parametrize("spec", [TARGET_ALONE, *SPECS], ids=lambda s: f"{s.policy}-{s.k}")
def test_min_tokens_masks_stop_token_ids(engine, plain_run, spec):
    tokens, i = plain_run
    params = SamplingParams(**{**GREEDY, "stop_token_ids": [tokens[i]], "min_tokens": i + 3})
    reference = engine.generate("hello world", params, TARGET_ALONE)
    out = engine.generate("hello world", params, spec)
    assert out.token_ids == reference.token_ids
    assert tokens[i] not in out.token_ids[: i + 3] and len(out.token_ids) > i + 3


@pytest.mark.parametrize("spec", [TARGET_ALONE, *SPECS], ids=lambda s: f"{s.policy}-{s.k}")
@pytest.mark.parametrize("min_tokens", [1, 6, 13])
def test_min_tokens_exact_when_sampling(engine, spec, min_tokens):
    """EOS biased to near-certainty: the completion is exactly min_tokens tokens, then EOS, whatever the seed."""
    for seed in range(3):
        params = SamplingParams(temperature=1.0, max_tokens=40, min_tokens=min_tokens, logit_bias={EOS: 100.0},
                                seed=seed)
        out = engine.generate("hello", params, spec)
        assert len(out.token_ids) == min_tokens + 1 and out.token_ids[-1] == EOS, out.token_ids
        assert EOS not in out.token_ids[:-1] and out.finish_reason == "stop"


def test_out_of_vocabulary_ids_are_request_errors(engine):
    for fields, name in (({"logit_bias": {10_000: 1.0}}, "logit_bias"), ({"stop_token_ids": [10_000]},
                                                                           "stop_token_ids")):
        with pytest.raises(RequestError) as info:
            engine.add_request("bad", "hi", SamplingParams(max_tokens=4, **fields))
        assert info.value.param == name


# ----- logprobs -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["none", "all"])
def test_greedy_logprobs_equal_the_target_alone(engine, tokenizer, name):
    """Greedy: the log-softmax of the (adjusted) target logits, temperature 1; identical with speculation,
    and equal to a full forward's."""
    extra = TRANSFORMS.get(name, {})
    params = SamplingParams(**{**GREEDY, **extra, "logprobs": 5})
    prompt = engine.encode("the quick brown fox")
    tokens, reference, _ = run(engine, prompt, params, TARGET_ALONE)
    assert len(reference) == len(tokens) == 40
    for spec in SPECS:
        out_tokens, logprobs, _ = run(engine, prompt, params, spec)
        assert out_tokens == tokens
        for ours, theirs in zip(logprobs, reference, strict=True):
            assert ours.logprob == pytest.approx(theirs.logprob, abs=1e-4)
            assert [t.token_id for t in ours.top] == [t.token_id for t in theirs.top]
            assert [t.logprob for t in ours.top] == pytest.approx([t.logprob for t in theirs.top], abs=1e-4)
    for position, entry in enumerate(reference):
        expected = reference_logits(engine, prompt + tokens[:position], params, len(prompt)).log_softmax(-1)
        assert entry.logprob == pytest.approx(float(expected[entry.token_id]), abs=1e-4)
        assert entry.top[0].token_id == entry.token_id  # greedy: the chosen token is the most likely
        assert [t.logprob for t in entry.top] == pytest.approx(expected.topk(5).values.tolist(), abs=1e-4)
        assert entry.token == tokenizer.decode([entry.token_id])


def test_sampled_logprobs_are_of_the_processed_distribution(engine):
    """Sampling: log p of the distribution each token was drawn from (temperature and top-k applied);
    tokens filtered out have logprob -inf."""
    params = SamplingParams(temperature=0.7, top_k=5, max_tokens=30, ignore_eos=True, seed=3, logprobs=8)
    prompt = engine.encode("hello")
    tokens, logprobs, _ = run(engine, prompt, params, SpecConfig(policy="constant", k=4))
    for position, entry in enumerate(logprobs):
        expected = processed_logits(reference_logits(engine, prompt + tokens[:position], params, len(prompt)),
                                    params).log_softmax(-1)
        assert entry.logprob == pytest.approx(float(expected[entry.token_id]), abs=1e-4)
        assert [t.logprob for t in entry.top[:5]] == pytest.approx(expected.topk(5).values.tolist(), abs=1e-4)
        assert all(t.logprob == -math.inf for t in entry.top[5:])


def test_logprobs_zero_reports_the_sampled_token_only(engine):
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=0, logprobs=0)
    tokens, logprobs, _ = run(engine, "hello", params, SpecConfig(policy="constant", k=3))
    assert [lp.token_id for lp in logprobs] == tokens
    assert all(isinstance(lp, TokenLogprob) and lp.top == [] and lp.logprob <= 0.0 for lp in logprobs)


def test_logprobs_stop_with_the_completion(engine, plain_run):
    """A stop inside a block: one logprob per returned token, the stop token's included."""
    tokens, i = plain_run
    params = SamplingParams(**{**GREEDY, "stop_token_ids": [tokens[i]], "logprobs": 1})
    out_tokens, logprobs, reason = run(engine, engine.encode("hello world"), params, SpecConfig(policy="constant", k=8))
    assert out_tokens == tokens[: i + 1] and reason == "stop"
    assert [lp.token_id for lp in logprobs] == out_tokens
