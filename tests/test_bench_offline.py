"""Offline benchmark on tiny random models: rows, resume, aggregation math, the transformers peer."""

from __future__ import annotations

import json

import pytest
from conftest import random_head

from engine.llm_engine import LLMEngine
from engine.params import SamplingParams
from heads.prompts import Prompt
from specdecpp.bench import offline
from specdecpp.bench.offline import BenchConfig, Checkpoint, Sweep, aggregate, run_offline
from specdecpp.bench.peers import hf_assisted_generate

REQUIRED = ("policy", "knob", "tokens_per_s", "speedup", "discard_rate", "verification_rate", "acceptance_rate",
            "mean_candidate_length", "prompts", "generated_tokens", "temperature")
PROMPTS = [Prompt(f"p{i}", text, "test") for i, text in enumerate(["hello there", "a cat sat"])]
SWEEP = Sweep(temperatures=(1.0, 0.0), ks=(2, 3), p_mins=(0.4,), thresholds=(0.3,), hf_ks=(2,))


@pytest.fixture(scope="module")
def engine(tiny_pair, tokenizer):
    target, draft = tiny_pair
    return LLMEngine(target, draft, tokenizer, head=random_head(32, seed=3))


def quiet(_: str) -> None:
    pass


def test_rows_have_every_field_and_none_is_the_baseline(engine, tmp_path):
    configs = SWEEP.configs()
    checkpoint = Checkpoint(tmp_path / "ck.jsonl", {"run": 1})
    records = run_offline(engine, PROMPTS, configs, 8, checkpoint, progress=quiet)
    rows = aggregate(records, configs)
    assert len(rows) == len(configs)
    policies = {r["policy"] for r in rows}
    assert policies == {"none", "constant", "heuristic", "confidence", "specdec++", "hf-constant", "hf-dynamic"}
    for row in rows:
        assert all(key in row for key in REQUIRED), row
        assert row["prompts"] == len(PROMPTS)
        assert row["generated_tokens"] > 0
        assert row["tokens_per_s"] > 0
    for none in (r for r in rows if r["policy"] == "none"):
        assert none["speedup"] == 1.0
        assert none["decode_tokens_per_s"] > 0 and none["decode_speedup"] == 1.0
        assert none["verification_rate"] == 1.0  # one target call per token
        assert none["discard_rate"] == 0.0
    for row in rows:  # speedup is relative to the none row of the same temperature
        base = next(r for r in rows if r["policy"] == "none" and r["temperature"] == row["temperature"])
        assert row["speedup"] == pytest.approx(row["tokens_per_s"] / base["tokens_per_s"])
    constant = next(r for r in rows if r["policy"] == "constant" and r["knob"] == 3 and r["temperature"] == 1.0)
    assert 0 < constant["mean_candidate_length"] <= 3


def test_resume_skips_finished_work(engine, tmp_path, monkeypatch):
    configs = Sweep(temperatures=(1.0,), ks=(2,), policies=("none", "constant")).configs()
    path = tmp_path / "ck.jsonl"
    run_offline(engine, PROMPTS, configs, 8, Checkpoint(path, {"run": 2}), progress=quiet)
    lines = path.read_text().splitlines()
    assert len(lines) == 1 + len(PROMPTS) * len(configs)  # header + one line per result
    path.write_text("\n".join(lines[:-2]) + "\n")  # as if killed two results before the end

    partial = run_offline(engine, PROMPTS, configs, 8, Checkpoint(path, {"run": 2}), run=False, progress=quiet)
    assert len(partial) == len(PROMPTS) * len(configs) - 2
    assert {r["prompts"] for r in aggregate(partial, configs)} == {len(PROMPTS) - 1}  # only complete prompts

    calls = []
    real = offline.run_one

    def counting(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(offline, "run_one", counting)
    records = run_offline(engine, PROMPTS, configs, 8, Checkpoint(path, {"run": 2}), warmup=False, progress=quiet)
    assert len(calls) == 2
    assert len(records) == len(PROMPTS) * len(configs)
    calls.clear()
    run_offline(engine, PROMPTS, configs, 8, Checkpoint(path, {"run": 2}), progress=quiet)
    assert calls == []  # nothing left, not even a warm-up
    with pytest.raises(ValueError, match="other settings"):
        Checkpoint(path, {"run": 3})
    assert Checkpoint(path, {"run": 3}, fresh=True).records == {}


def _record(config: BenchConfig, prompt_id: str, wall: float, **stats) -> dict:
    return {"prompt_id": prompt_id, "policy": config.policy, "knob": config.knob,
            "temperature": config.temperature, "wall_seconds": wall, "stats": stats}


def test_aggregation_is_ratio_of_sums():
    none, k4 = BenchConfig("none", None, 1.0), BenchConfig("constant", 4, 1.0)
    records = [
        _record(none, "a", 10.0, generated_tokens=30, proposed_tokens=0, accepted_tokens=0, target_calls=30, rounds=30),
        _record(none, "b", 2.0, generated_tokens=10, proposed_tokens=0, accepted_tokens=0, target_calls=10, rounds=10),
        _record(k4, "a", 4.0, generated_tokens=30, proposed_tokens=40, accepted_tokens=20, target_calls=10, rounds=10),
        _record(k4, "b", 2.0, generated_tokens=10, proposed_tokens=8, accepted_tokens=8, target_calls=2, rounds=2),
        _record(k4, "c", 1.0, generated_tokens=99, proposed_tokens=9, accepted_tokens=9, target_calls=9, rounds=9),
    ]
    rows = {r["policy"]: r for r in aggregate(records, [none, k4])}
    row = rows["constant"]
    assert row["prompts"] == 2  # prompt c is missing from the none row: left out of every row
    assert row["generated_tokens"] == 40
    assert row["discard_rate"] == pytest.approx((20 + 0) / 40)  # not the mean of 20/30 and 0/10
    assert row["verification_rate"] == pytest.approx(12 / 40)
    assert row["acceptance_rate"] == pytest.approx(28 / 48)
    assert row["mean_candidate_length"] == pytest.approx(48 / 12)
    assert row["tokens_per_s"] == pytest.approx(40 / 6.0)
    assert rows["none"]["tokens_per_s"] == pytest.approx(40 / 12.0)
    assert row["speedup"] == pytest.approx((40 / 6.0) / (40 / 12.0))
    assert rows["none"]["acceptance_rate"] is None


def test_decode_rate_leaves_the_first_round_out():
    none, k4 = BenchConfig("none", None, 1.0), BenchConfig("constant", 4, 1.0)
    records = [
        _record(none, "a", 10.0, generated_tokens=11, total_seconds=10.0, first_token_seconds=2.0,
                first_round_tokens=1, proposed_tokens=0, accepted_tokens=0, target_calls=11, rounds=11),
        _record(k4, "a", 5.0, generated_tokens=11, total_seconds=5.0, first_token_seconds=3.0,
                first_round_tokens=5, proposed_tokens=12, accepted_tokens=8, target_calls=3, rounds=3),
    ]
    base, row = aggregate(records, [none, k4])
    assert base["decode_tokens_per_s"] == pytest.approx(10 / 8.0)
    assert row["decode_tokens_per_s"] == pytest.approx(6 / 2.0)
    assert row["decode_speedup"] == pytest.approx(3.0 / 1.25)
    assert row["speedup"] == pytest.approx((11 / 5.0) / (11 / 10.0))


def test_unmeasured_counts_stay_null():
    none, peer = BenchConfig("none", None, 0.0), BenchConfig("hf-dynamic", 0.4, 0.0)
    records = [
        _record(none, "a", 1.0, generated_tokens=5, proposed_tokens=0, accepted_tokens=0, target_calls=5, rounds=5),
        _record(peer, "a", 1.0, generated_tokens=5, proposed_tokens=None, accepted_tokens=None, target_calls=None,
                rounds=None),
    ]
    row = aggregate(records, [none, peer])[1]
    assert row["discard_rate"] is None and row["verification_rate"] is None and row["acceptance_rate"] is None
    assert row["speedup"] == pytest.approx(1.0)


def test_greedy_sweep_can_be_smaller():
    sweep = Sweep(temperatures=(1.0, 0.0), ks=(2, 3, 4), hf_ks=(3, 5), policies=("none", "constant", "hf-constant"),
                  greedy_policies=("none", "constant", "hf-constant"), greedy_ks=(3,))
    greedy = [(c.policy, c.knob) for c in sweep.configs() if c.temperature == 0]
    assert greedy == [("none", None), ("constant", 3), ("hf-constant", 3)]
    assert len([c for c in sweep.configs() if c.temperature == 1]) == 6


def test_sweep_requires_the_baseline_and_known_policies():
    with pytest.raises(ValueError, match="none"):
        Sweep(policies=("constant",)).configs()
    with pytest.raises(ValueError, match="unknown"):
        Sweep(policies=("none", "magic")).configs()


def test_hf_peer_greedy_is_the_target_and_counts_add_up(engine):
    """transformers' assisted generation is lossless too: greedy output equals our target alone."""
    prompt = PROMPTS[0].messages
    ours = engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=16), None)
    ours_none = engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=16),
                                BenchConfig("none", None, 0.0).spec((2, 20)))
    ids = engine.encode(prompt)
    for policy, knob in (("hf-constant", 3), ("hf-dynamic", 0.4), ("hf-heuristic", 2)):
        stats = hf_assisted_generate(engine.target.model, engine.draft.model, ids, policy, knob, 0.0, 16, 0,
                                     engine.eos_token_ids)
        assert stats["token_ids"] == ours_none.token_ids, policy
        assert 0 < stats["first_token_seconds"] <= stats["total_seconds"]
        assert stats["first_round_tokens"] == min(stats["accepted_lengths"][0] + 1, stats["generated_tokens"])
        assert stats["generated_tokens"] == len(ours_none.token_ids)
        assert stats["target_calls"] == stats["rounds"] == len(stats["candidate_lengths"])
        assert stats["proposed_tokens"] == sum(stats["candidate_lengths"])
        assert stats["accepted_tokens"] + stats["rounds"] == stats["generated_tokens"]
        if policy == "hf-constant":
            assert max(stats["candidate_lengths"]) <= 3
    assert ours.token_ids == ours_none.token_ids
    json.dumps(stats)  # plain data: it goes into the checkpoint
