"""Structured output (a JSON schema enforced by a grammar), lossless under speculation.

The grammar masks q and p alike with the candidates before each position in the history, so the
speculative output follows the constrained target exactly. Checked as the penalties are: greedy
identity with the constrained target alone, a chi-square test of the sampled distribution against
the exact constrained distribution (written out independently, with a regular expression) whose
control (masks that ignore the candidates) must fail, caches equal to a fresh prefill after every
round, and max_tokens and stop strings exact inside a block. Every finished output parses and
follows its schema.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch
from conftest import perturbed, random_head, step_checking_caches
from test_engine_distribution import chi_square_pvalue
from tiny import CHEAP_DRAFT_COSTS, char_tokenizer, tiny_model

import engine.grammar as grammar
from engine.llm_engine import LLMEngine, RequestError
from engine.params import SamplingParams, SpecConfig

JSON_CHARS = '{}[]":,-0123456789abcdefghijklmnopqrstuvwxyz'  # no whitespace: a random model cannot pad
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["ab", "cd"]}, "maxItems": 3},
    },
    "required": ["name", "ok", "n", "tags"],
    "additionalProperties": False,
}
SCHEMA_TEXT = json.dumps(SCHEMA)
TARGET_ALONE = SpecConfig(policy="none")
SPECS = {
    "constant-3": SpecConfig(policy="constant", k=3),
    "constant-8": SpecConfig(policy="constant", k=8),
    "specdec++": SpecConfig(policy="specdec++", threshold=0.4, bounds=(1, 10)),
    "specdec++-auto": SpecConfig(policy="specdec++"),
    "two-drafts": SpecConfig(policy="constant", k=4, num_drafts=2),
}


def follows_schema(doc: object) -> bool:
    """SCHEMA, checked by hand."""
    return (isinstance(doc, dict) and set(doc) == {"name", "ok", "n", "tags"}
            and isinstance(doc["name"], str) and len(doc["name"]) <= 6
            and isinstance(doc["ok"], bool)
            and type(doc["n"]) is int and 0 <= doc["n"] <= 99
            and isinstance(doc["tags"], list) and len(doc["tags"]) <= 3 and set(doc["tags"]) <= {"ab", "cd"})


@pytest.fixture(scope="module")
def engine():
    tokenizer = char_tokenizer(JSON_CHARS)
    target = tiny_model(20, vocab_size=len(tokenizer), scale=4.0)
    draft = perturbed(target, 0.05, seed=21)
    return LLMEngine(target, draft, tokenizer, heads={"default": random_head(target.config.hidden_size)},
                     costs=CHEAP_DRAFT_COSTS)


def structured(**fields) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "max_tokens": 120, "json_schema": SCHEMA_TEXT, **fields})


# ----- greedy identity, valid output ------------------------------------------------------------
def test_the_grammar_changes_the_greedy_output(engine):
    plain = engine.generate("ab", SamplingParams(temperature=0.0, max_tokens=40), TARGET_ALONE)
    constrained = engine.generate("ab", structured(), TARGET_ALONE)
    assert constrained.token_ids != plain.token_ids
    assert constrained.finish_reason == "stop"
    assert follows_schema(json.loads(constrained.text)), constrained.text


@pytest.mark.parametrize("name", list(SPECS))
def test_greedy_identity_with_a_schema(engine, name):
    reference = engine.generate("ab", structured(), TARGET_ALONE)
    out = engine.generate("ab", structured(), SPECS[name])
    assert out.token_ids == reference.token_ids
    assert out.stats["proposed_tokens"] > 0


@pytest.mark.parametrize("name", ["constant-3", "specdec++"])
def test_sampled_outputs_follow_the_schema(engine, name):
    finished = 0
    for seed in range(12):
        out = engine.generate("ab", structured(temperature=1.0, seed=seed), SPECS[name])
        if out.finish_reason == "stop":
            finished += 1
            assert follows_schema(json.loads(out.text)), out.text
        else:  # cut by max_tokens: still a prefix of a valid document
            assert out.finish_reason == "length"
    assert finished >= 6


def test_json_object_gives_any_object(engine):
    out = engine.generate("ab", structured(json_schema=grammar_any_object(), max_tokens=200), SPECS["constant-3"])
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)
    assert out.text.startswith("{")


def grammar_any_object() -> str:
    from server.schemas import ANY_JSON_OBJECT
    return ANY_JSON_OBJECT


# ----- caches, max_tokens, stop strings ---------------------------------------------------------
def test_caches_equal_a_fresh_prefill_after_every_round(engine):
    engine.add_request("cache", "ab", structured(temperature=1.0, seed=3), SPECS["constant-8"])
    rounds, rejected = step_checking_caches(engine, engine.requests["cache"])
    assert rounds > 2 and rejected > 0


@pytest.mark.parametrize("max_tokens", [1, 7, 13])
def test_max_tokens_exact_inside_a_block(engine, max_tokens):
    reference = engine.generate("ab", structured(), TARGET_ALONE)
    out = engine.generate("ab", structured(max_tokens=max_tokens), SPECS["constant-8"])
    assert out.token_ids == reference.token_ids[:max_tokens] and out.finish_reason == "length"


def test_stop_string_exact_inside_a_block(engine):
    reference = engine.generate("ab", structured(), TARGET_ALONE)
    stop = reference.text[5:8]
    out = engine.generate("ab", structured(stop=[stop]), SPECS["constant-8"])
    assert out.text == reference.text[: reference.text.index(stop)] and out.finish_reason == "stop"


# ----- the matcher follows rollback ------------------------------------------------------------
def test_masks_after_rollback_equal_a_fresh_matcher(engine):
    """Ask about histories that part and rejoin, as rounds do; every mask must equal a fresh matcher's."""
    doc = engine.tokenizer.encode('{"name":"ab","ok":true,"n":7,"tags":["cd"]}', add_special_tokens=False)
    other = engine.tokenizer.encode('{"name":"zz","ok":false', add_special_tokens=False)
    follow = engine.grammars.constraint(SCHEMA_TEXT)
    histories = [(doc[:4], doc[4:9]), (doc[:4], other[4:12]), (doc[:6], doc[6:20]), (doc[:6], other[6:9]),
                 (doc[:20], doc[20:30]), (doc[:21], doc[21:])]
    for output, candidates in histories:
        for j in range(len(candidates) + 1):
            fresh = engine.grammars.constraint(SCHEMA_TEXT)
            expected = fresh.allowed(output + candidates[:j], [])
            assert torch.equal(follow.allowed(output, candidates[:j]), expected), (output, candidates[:j])
    assert torch.equal(follow.allowed(doc, []), follow.eos_only)  # the document is complete: EOS only


# ----- requests the grammar cannot serve -------------------------------------------------------
def test_bad_schemas_and_combinations_are_request_errors(engine):
    with pytest.raises(RequestError) as err:
        engine.add_request("bad", "ab", structured(json_schema='{"type": "nonsense"}'))
    assert err.value.param == "response_format"
    with pytest.raises(RequestError) as err:
        engine.add_request("bad", "ab", structured(ignore_eos=True))
    assert err.value.param == "ignore_eos"
    engine.max_over_acceptance = 0.2
    try:
        with pytest.raises(RequestError) as err:
            engine.add_request("bad", "ab", structured(), SpecConfig(policy="constant", over_acceptance=0.1))
        assert err.value.param == "specdec.over_acceptance"
    finally:
        engine.max_over_acceptance = 0.0
    with pytest.raises(ValueError):
        SamplingParams(json_schema="[1, 2]")
    assert not engine.requests


# ----- the sampled distribution ----------------------------------------------------------------
INTEGER_CHARS = "012-a"  # ids: EOS 0, "0" 1, "1" 2, "2" 3, "-" 4, "a" 5 (never allowed)
INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")
INTEGER_PREFIX = re.compile(r"-?(0|[1-9][0-9]*)?")
SAMPLES = 1000
LENGTH = 3


@pytest.fixture(scope="module")
def integer_engine():
    tokenizer = char_tokenizer(INTEGER_CHARS)
    target = tiny_model(10, vocab_size=len(tokenizer), hidden=16, layers=1, scale=10.0)
    draft = tiny_model(11, vocab_size=len(tokenizer), hidden=16, layers=1, scale=10.0)
    return LLMEngine(target, draft, tokenizer, heads={"default": random_head(16, seed=3)}, costs=CHEAP_DRAFT_COSTS)


def reference_allowed(text: str, vocab: list[str]) -> list[bool]:
    """Which tokens may follow `text` under the JSON integer grammar, from a regular expression."""
    return [bool(INTEGER.fullmatch(text)) if i == 0 else bool(INTEGER_PREFIX.fullmatch(text + vocab[i]))
            for i in range(len(vocab))]


def exact_integer_distribution(engine: LLMEngine, prompt: list[int]) -> dict[tuple[int, ...], float]:
    """P(first LENGTH tokens) of the constrained target (an output ends early at EOS)."""
    vocab = ["<eos>"] + list(INTEGER_CHARS)
    out: dict[tuple[int, ...], float] = {}

    def walk(prefix: tuple[int, ...], prob: float) -> None:
        if len(prefix) == LENGTH or (prefix and prefix[-1] == 0):
            out[prefix] = out.get(prefix, 0.0) + prob
            return
        with torch.no_grad():
            logits = engine.target.model(torch.tensor([prompt + list(prefix)])).logits[0, -1].float()
        allowed = torch.tensor(reference_allowed("".join(vocab[t] for t in prefix), vocab))
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
        for token in allowed.nonzero().flatten().tolist():
            walk(prefix + (token,), prob * float(probs[token]))

    walk((), 1.0)
    return out


def sample_integers(engine: LLMEngine, prompt: list[int], spec: SpecConfig) -> Counter:
    counts: Counter = Counter()
    for seed in range(SAMPLES):
        params = SamplingParams(temperature=1.0, max_tokens=LENGTH, seed=seed, json_schema='{"type": "integer"}')
        counts[tuple(engine.generate(prompt, params, spec).token_ids)] += 1
    return counts


INTEGER_PROMPT = [2, 3, 1]


@pytest.mark.parametrize("spec", [TARGET_ALONE, SpecConfig(policy="constant", k=3),
                                  SpecConfig(policy="specdec++", threshold=0.4, bounds=(1, 6))],
                         ids=lambda s: s.policy)
def test_constrained_distribution_matches_the_constrained_target(integer_engine, spec):
    expected = exact_integer_distribution(integer_engine, INTEGER_PROMPT)
    counts = sample_integers(integer_engine, INTEGER_PROMPT, spec)
    pvalue = chi_square_pvalue(counts, expected, SAMPLES)
    assert pvalue > 1e-3, f"{spec.policy}: chi-square p={pvalue:.2e}"


def test_masks_that_ignore_the_candidates_are_detected(integer_engine, monkeypatch):
    """Control: masking every position as if no candidate preceded it changes the distribution (a digit may
    follow a leading "0"), and the same test sees it."""
    original = grammar.GrammarConstraint.apply
    monkeypatch.setattr(grammar.GrammarConstraint, "apply",
                        lambda self, logits, output_ids, drafted: original(self, logits, output_ids, []))
    expected = exact_integer_distribution(integer_engine, INTEGER_PROMPT)
    counts = sample_integers(integer_engine, INTEGER_PROMPT, SpecConfig(policy="constant", k=3))
    impossible = set(counts) - {k for k, v in expected.items() if v > 0}
    assert impossible or chi_square_pvalue(counts, expected, SAMPLES) < 1e-6
