"""Offline benchmark on tiny random models: rows, resume, aggregation math, the transformers peer."""

from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
from conftest import random_head

from engine.llm_engine import LLMEngine
from engine.params import SamplingParams
from specdecpp.bench import offline
from specdecpp.bench.offline import (
    BenchConfig,
    Sweep,
    aggregate,
    compare,
    paired_bootstrap_ratio,
    run_offline,
)
from specdecpp.bench.offline_run import rows_with_heads
from specdecpp.bench.peers import hf_assisted_generate
from specdecpp.bench.runs import Checkpoint
from specdecpp.cli import build_parser
from specdecpp.datasets import Prompt

REQUIRED = ("label", "policy", "knob", "tokens_per_s", "speedup", "discard_rate", "verification_rate",
            "acceptance_rate", "mean_candidate_length", "prompts", "generated_tokens", "temperature")
COMPARISON = ("temperature", "a", "b", "ratio", "ci_low", "ci_high", "a_knob_interior", "b_knob_interior", "prompts")
PROMPTS = [Prompt(f"p{i}", text, "test") for i, text in enumerate(["hello there", "a cat sat"])]
SWEEP = Sweep(temperatures=(1.0, 0.0), ks=(2, 3), p_mins=(0.4,), thresholds=(0.3, "auto"), hf_ks=(2,),
              policies=(*Sweep().policies, "specdec++-post"))


@pytest.fixture(scope="module")
def engine(tiny_pair, tokenizer):
    target, draft = tiny_pair
    heads = {"default": random_head(32, seed=3), "post": random_head(32, seed=4, timing="after")}
    return LLMEngine(target, draft, tokenizer, heads=heads)


def quiet(_: str) -> None:
    pass


def test_rows_have_every_field_and_none_is_the_baseline(engine, tmp_path):
    configs = SWEEP.configs()
    checkpoint = Checkpoint(tmp_path / "ck.jsonl", {"run": 1})
    records = run_offline(engine, PROMPTS, configs, 8, checkpoint, progress=quiet)
    rows = aggregate(records, configs)
    assert len(rows) == len(configs)
    policies = {r["policy"] for r in rows}
    assert policies == {"none", "constant", "heuristic", "confidence", "specdec++", "specdec++-post", "hf-constant",
                        "hf-dynamic"}
    for row, config in zip(rows, configs, strict=True):
        assert all(key in row for key in REQUIRED), row
        assert row["label"] == config.label
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

    comparisons = compare(records, rows, configs, resamples=200)
    labels = {r["label"]: r for r in rows}
    pairs = [(c["a"], c["b"], c["temperature"]) for c in comparisons]
    assert len(pairs) == len(set(pairs)) and all(a != b for a, b, _ in pairs)  # auto may also be the best threshold
    policy_pairs = {(labels[c["a"]]["policy"], labels[c["b"]]["policy"], c["temperature"]) for c in comparisons}
    assert policy_pairs == {(a.partition(":")[0], b.partition(":")[0], t) for t in (1.0, 0.0)
                            for a, b in offline.COMPARISONS}
    for t in (1.0, 0.0):  # "specdec++:auto" compares the auto row, "specdec++:fixed" a numeric one
        at_t = [c for c in comparisons if c["temperature"] == t]
        assert any(c["a"].endswith("threshold=auto") and labels[c["b"]]["policy"] == "constant" for c in at_t)
        assert any(c["a"].endswith("threshold=auto") and labels[c["b"]]["policy"] == "specdec++" for c in at_t)
    for c in comparisons:
        assert all(key in c for key in COMPARISON), c
        assert c["ratio"] == pytest.approx(labels[c["a"]]["tokens_per_s"] / labels[c["b"]]["tokens_per_s"])
        assert c["ci_low"] <= c["ratio"] <= c["ci_high"]
        assert c["prompts"] == len(PROMPTS)
    json.dumps(comparisons)


def test_head_rows_name_their_engine_head():
    assert BenchConfig("specdec++", 0.3, 1.0).spec((1, 20)).head is None  # the engine's default head
    post = BenchConfig("specdec++-post", 0.3, 1.0).spec((1, 20))
    assert (post.policy, post.head, post.threshold, post.bounds) == ("specdec++", "post", 0.3, (1, 20))
    assert BenchConfig("specdec++-post", 0.5, 0.0).label == "T=0 specdec++-post threshold=0.5"


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


# ----- comparisons -----------------------------------------------------------------------------
def test_bootstrap_interval_contains_the_ratio_of_sums():
    rng = random.Random(1)
    a_tokens, b_tokens = [rng.randint(20, 200) for _ in range(30)], [rng.randint(20, 200) for _ in range(30)]
    a_seconds, b_seconds = [t / rng.uniform(4, 8) for t in a_tokens], [t / rng.uniform(2, 6) for t in b_tokens]
    ratio, low, high = paired_bootstrap_ratio(a_tokens, a_seconds, b_tokens, b_seconds)
    assert ratio == pytest.approx((sum(a_tokens) / sum(a_seconds)) / (sum(b_tokens) / sum(b_seconds)))
    assert low < ratio < high
    assert paired_bootstrap_ratio(a_tokens, a_seconds, b_tokens, b_seconds) == (ratio, low, high)  # fixed seed
    assert paired_bootstrap_ratio([0], [1.0], [0], [1.0]) == (None, None, None)  # b made no tokens: no ratio
    with pytest.raises(ValueError, match="same prompts"):
        paired_bootstrap_ratio(a_tokens, a_seconds, b_tokens[:-1], b_seconds[:-1])


def test_identical_prompt_ratios_give_a_narrow_interval():
    tokens = [10, 300, 40, 128, 7, 90]
    ratio, low, high = paired_bootstrap_ratio(tokens, [t / 6.0 for t in tokens], tokens, [t / 4.0 for t in tokens])
    assert ratio == pytest.approx(1.5)
    assert low == pytest.approx(1.5) and high == pytest.approx(1.5)


def test_pairing_removes_the_variance_the_rows_share():
    """Prompts of very different speed, each 20% faster under a: paired, the interval is a point;
    resampling each row on its own sees the prompt mix as noise."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(10, 400, size=24).astype(float)
    b_seconds = tokens / rng.uniform(1.0, 20.0, size=24)  # per-prompt rates vary twentyfold
    a_seconds = b_seconds / 1.2
    ratio, low, high = paired_bootstrap_ratio(tokens, a_seconds, tokens, b_seconds)
    assert ratio == pytest.approx(1.2) and high - low < 1e-9

    ia, ib = rng.integers(0, 24, size=(2000, 24)), rng.integers(0, 24, size=(2000, 24))
    unpaired = (tokens[ia].sum(1) / a_seconds[ia].sum(1)) / (tokens[ib].sum(1) / b_seconds[ib].sum(1))
    unpaired_low, unpaired_high = np.percentile(unpaired, [2.5, 97.5])
    assert unpaired_high - unpaired_low > 0.2


def _timed(config: BenchConfig, prompt_id: str, tokens: int, wall: float) -> dict:
    return _record(config, prompt_id, wall, generated_tokens=tokens, proposed_tokens=0, accepted_tokens=0,
                   target_calls=tokens, rounds=tokens)


def test_comparisons_pair_the_best_knobs_and_flag_edge_knobs():
    none = BenchConfig("none", None, 1.0)
    ks = [BenchConfig("constant", k, 1.0) for k in (2, 4, 6)]
    thresholds = [BenchConfig("specdec++", t, 1.0) for t in (0.1, 0.3)]
    p_min = BenchConfig("confidence", 0.4, 1.0)
    configs = [none, *ks, *thresholds, p_min]
    speed = {none: 1.0, ks[0]: 1.5, ks[1]: 2.0, ks[2]: 1.8, thresholds[0]: 2.1, thresholds[1]: 2.4, p_min: 1.6}
    lengths = {"a": 100, "b": 20, "c": 60}
    records = [_timed(c, pid, n, n / (10 * speed[c])) for c in configs for pid, n in lengths.items()]
    records.append(_timed(ks[0], "d", 50, 1.0))  # a prompt not every row finished: left out
    rows = aggregate(records, configs)
    comparisons = compare(records, rows, configs, resamples=500)
    by_pair = {(c["a"], c["b"]): c for c in comparisons}
    assert list(by_pair) == [
        ("T=1 specdec++ threshold=0.3", "T=1 constant k=4"),
        ("T=1 specdec++ threshold=0.3", "T=1 confidence p_min=0.4"),
        ("T=1 specdec++ threshold=0.3", "T=1 none"),
        ("T=1 constant k=4", "T=1 none"),
        ("T=1 confidence p_min=0.4", "T=1 none"),
    ]  # no specdec++-post row: its comparison is left out
    first = by_pair[("T=1 specdec++ threshold=0.3", "T=1 constant k=4")]
    assert first["ratio"] == pytest.approx(2.4 / 2.0)
    assert first["ci_low"] == pytest.approx(1.2) and first["ci_high"] == pytest.approx(1.2)  # same ratio everywhere
    assert first["a_knob_interior"] is False  # 0.3 is the largest threshold swept
    assert first["b_knob_interior"] is True  # k=4 between 2 and 6
    assert first["prompts"] == 3
    single = by_pair[("T=1 confidence p_min=0.4", "T=1 none")]
    assert single["a_knob_interior"] is False and single["b_knob_interior"] is False


def test_each_pair_is_compared_once_when_auto_is_the_only_threshold():
    configs = [BenchConfig("none", None, 1.0), BenchConfig("constant", 7, 1.0), BenchConfig("specdec++", "auto", 1.0)]
    speed = dict(zip(configs, (1.0, 1.3, 1.4), strict=True))
    records = [_timed(c, pid, 50, 50 / (10 * speed[c])) for c in configs for pid in "abc"]
    comparisons = compare(records, aggregate(records, configs), configs, resamples=100)
    assert [(c["a"], c["b"]) for c in comparisons] == [
        ("T=1 specdec++ threshold=auto", "T=1 constant k=7"),
        ("T=1 specdec++ threshold=auto", "T=1 none"),
        ("T=1 constant k=7", "T=1 none"),
    ]


def _offline_args(*flags: str):
    return build_parser().parse_args(["bench", "offline", "--draft", "d", "--target", "t", *flags])


def test_post_rows_without_a_post_head_fail_before_loading_models():
    args = _offline_args("--policies", "specdec++-post")
    with pytest.raises(ValueError, match="--post-head"):
        args.func(args)
    args = _offline_args("--post-head", "x", "--extra-head", "post=y")
    with pytest.raises(ValueError, match="give one"):
        args.func(args)


def test_rows_follow_the_engine_heads(caplog):
    policies = ("none", "constant", "specdec++", "specdec++-post")
    assert rows_with_heads(policies, None, set(), {"default", "post"}) == (policies, None)
    with caplog.at_level(logging.WARNING):
        kept, greedy = rows_with_heads(policies, ["constant", "specdec++"], set(), set())
    assert kept == ("none", "constant") and greedy == ("none", "constant")
    assert "specdec++, specdec++-post" in caplog.text
    with pytest.raises(ValueError, match="'post' is not loaded"):
        rows_with_heads(policies, None, {"specdec++-post"}, {"default"})
    with pytest.raises(ValueError, match="--head DIR"):
        rows_with_heads(policies, ["specdec++"], {"specdec++"}, {"post"})


def test_cli_offline_sweeps_auto_beside_fixed_thresholds(tiny_pair, tokenizer, tmp_path):
    """`bench offline --thresholds auto 0.3 0.5` end to end on saved tiny models and the mixed prompt set:
    one specdec++ row per knob, auto as the string "auto", reported next to the target alone."""
    from live_server import save_tiny_pair
    from tiny import CHEAP_DRAFT_COSTS

    from specdecpp.cli import main

    paths = save_tiny_pair(tmp_path / "models", *tiny_pair, tokenizer, random_head(32, seed=3))
    costs = tmp_path / "costs.json"
    CHEAP_DRAFT_COSTS.save(costs)
    out = tmp_path / "offline.json"
    argv = ["bench", "offline", "--target", str(paths["target"]), "--draft", str(paths["draft"]),
            "--head", str(paths["head"]), "--dtype", "fp32", "--cost-model", str(costs), "--dataset", "mixed",
            "--num-prompts", "2", "--max-tokens", "6", "--temperatures", "1", "--policies", "none", "specdec++",
            "--thresholds", "auto", "0.3", "0.5", "--output", str(out)]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert [(r["policy"], r["knob"]) for r in data["rows"]] == [
        ("none", None), ("specdec++", "auto"), ("specdec++", 0.3), ("specdec++", 0.5)]
    assert all(r["prompts"] == 2 and r["generated_tokens"] > 0 and r["speedup"] > 0 for r in data["rows"])
    assert data["meta"]["sweep"]["thresholds"] == ["auto", 0.3, 0.5] and data["meta"]["dataset"] == "mixed"
    assert "threshold=auto" in out.with_suffix(".md").read_text()
    assert data["meta"]["cost_model_at_start"]["draft_step"] == CHEAP_DRAFT_COSTS.draft_step  # as the engine started


def test_stop_strings_end_every_engine_row_alike(engine, tmp_path):
    rows = ("none", "constant", "specdec++")
    configs = Sweep(temperatures=(0.0,), ks=(3,), thresholds=(0.3,), policies=rows).configs()
    free = run_offline(engine, PROMPTS[:1], configs, 12, Checkpoint(tmp_path / "a.jsonl", {}), progress=quiet)
    text = engine.tokenizer.decode(free[0]["stats"]["token_ids"])
    stop = text[len(text) // 2:][:2]  # a string the greedy reply reaches mid-way
    assert stop.strip(), text
    cut = run_offline(engine, PROMPTS[:1], configs, 12, Checkpoint(tmp_path / "b.jsonl", {}), progress=quiet,
                      stop=(stop,))
    for record in cut:
        assert record["stats"]["finish_reason"] == "stop"
        assert engine.tokenizer.decode(record["stats"]["token_ids"]) != text
    with pytest.raises(ValueError, match="engine's rows only"):
        peers = Sweep(temperatures=(0.0,), hf_ks=(2,), policies=("none", "hf-constant")).configs()
        run_offline(engine, PROMPTS[:1], peers, 4, Checkpoint(tmp_path / "c.jsonl", {}), progress=quiet, stop=("x",))
