"""Offline stop-rule evaluator (specdecpp/bench/stop_rules.py) on hand-built rounds, and its stop
lengths against the engine's own on a tiny pair (seconds)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import random_head
from safetensors.torch import save_file

from engine.costs import LiveCosts
from engine.head import CANDIDATE_FEATURES
from engine.policies import ProposalStep, SpecDecPP
from engine.speculate import RoundRecord
from engine.tuning import SelfTuning
from heads.data import records_to_rows
from specdecpp.bench.stop_rules import (
    CostModel,
    Rounds,
    add_headroom_heads,
    auto_round,
    bootstrap_speedups,
    headroom_summary,
    load_rounds,
    predict,
    round_outcomes,
    stop_lengths,
    summarise,
)

NAN = float("nan")
F = {name: i for i, name in enumerate(CANDIDATE_FEATURES)}


def hand_rounds() -> Rounds:
    """Two rounds logged with k = 4; the second has 3 candidates (padding: accept 0, head nan)."""
    d = torch.float64
    return Rounds(
        accept=torch.tensor([[0.9, 0.8, 0.5, 0.2], [0.3, 0.9, 0.9, 0.0]], dtype=d),
        length=torch.tensor([4, 3]),
        seq=torch.tensor([0, 1]),
        draft_prob=torch.tensor([[0.9, 0.6, 0.3, 0.8], [0.2, 0.9, 0.5, 0.0]], dtype=d),
        temperature=torch.tensor([1.0, 0.0], dtype=d),
        head={
            "pre": torch.tensor([[0.9, 0.9, 0.5, 0.9], [0.4, 0.9, 0.9, NAN]], dtype=d),
            # an "after" head judges all but each round's last candidate
            "post": torch.tensor([[0.9, 0.9, 0.5, NAN], [0.4, 0.9, NAN, NAN]], dtype=d),
        },
        head_timing={"pre": "before", "post": "after"},
    )


def test_constant_and_confidence_lengths():
    r = hand_rounds()
    assert stop_lengths(r, ("none",)).tolist() == [0, 0]
    assert stop_lengths(r, ("constant", 2)).tolist() == [2, 2]
    assert stop_lengths(r, ("constant", 10)).tolist() == [4, 3]  # capped at what was logged
    # confidence: stop at the first s >= low with q(y_s) < p_min; else run to min(logged, high)
    assert stop_lengths(r, ("confidence", 0.5, 1, 4)).tolist() == [3, 1]
    assert stop_lengths(r, ("confidence", 0.5, 2, 4)).tolist() == [3, 3]  # 0.5 is not below 0.5
    assert stop_lengths(r, ("confidence", 0.5, 1, 2)).tolist() == [2, 1]
    assert stop_lengths(r, ("confidence", 0.95, 1, 4)).tolist() == [1, 1]
    assert stop_lengths(r, ("confidence", 0.1, 1, 4)).tolist() == [4, 3]
    with pytest.raises(ValueError, match="unknown rule"):
        stop_lengths(r, ("clairvoyant", 1))


def test_specdecpp_lengths_before_and_after():
    r = hand_rounds()
    # pre: P(some rejected) = 0.1, 0.19, 0.595, ... | 0.6, 0.64, 0.676
    assert stop_lengths(r, ("specdec++", "pre", 0.3, 1, 4)).tolist() == [3, 1]
    assert stop_lengths(r, ("specdec++", "pre", 0.3, 2, 4)).tolist() == [3, 2]
    assert stop_lengths(r, ("specdec++", "pre", 0.3, 4, 4)).tolist() == [4, 3]
    assert stop_lengths(r, ("specdec++", "pre", 0.3, 1, 2)).tolist() == [2, 1]
    assert stop_lengths(r, ("specdec++", "pre", 0.7, 1, 4)).tolist() == [4, 3]
    assert stop_lengths(r, ("specdec++", "pre", 0.05, 1, 4)).tolist() == [1, 1]
    # post: a stop at y_s submits y_{s+1} too (s + 1 candidates); the bound counts that one
    assert stop_lengths(r, ("specdec++", "post", 0.3, 1, 4)).tolist() == [4, 2]
    assert stop_lengths(r, ("specdec++", "post", 0.3, 1, 3)).tolist() == [3, 2]
    assert stop_lengths(r, ("specdec++", "post", 0.3, 3, 4)).tolist() == [4, 3]
    assert stop_lengths(r, ("specdec++", "post", 0.05, 1, 4)).tolist() == [2, 2]
    assert stop_lengths(r, ("specdec++", "post", 0.7, 1, 4)).tolist() == [4, 3]  # never judged past the last


def test_round_outcomes_expected_accepted_and_cost():
    r = hand_rounds()
    costs = CostModel(draft_step=0.1, draw=0.0, features=0.004, head=0.006, target={1: 1.0, 5: 1.4})
    out = round_outcomes(r, torch.tensor([2, 3]), costs, features=True, head_calls=1)
    assert out["accepted"].tolist() == pytest.approx([0.9 + 0.9 * 0.8, 0.3 + 0.3 * 0.9 + 0.3 * 0.9 * 0.9])
    assert out["tokens"].tolist() == pytest.approx([2.62, 1.813])
    assert out["proposed"].tolist() == [2.0, 3.0]
    assert out["seconds"].tolist() == pytest.approx([1.2 + 2 * 0.11, 1.3 + 3 * 0.11])
    unjudged = round_outcomes(r, torch.tensor([2, 3]), costs)
    assert unjudged["seconds"].tolist() == pytest.approx([1.2 + 0.2, 1.3 + 0.3])
    after = round_outcomes(r, torch.tensor([2, 3]), costs, features=True, head_calls=-1)  # last one not judged
    assert after["seconds"].tolist() == pytest.approx([1.2 + 2 * 0.104 + 0.006, 1.3 + 3 * 0.104 + 2 * 0.006])
    # Against the definition sum_j prod_{i<=j} a_i on random rounds and lengths.
    g = torch.Generator().manual_seed(0)
    accept = torch.rand(50, 6, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, 7, (50,), generator=g)
    rounds = Rounds(accept, torch.full((50,), 6), torch.zeros(50, dtype=torch.long), accept, torch.ones(50))
    got = round_outcomes(rounds, lengths, costs)["accepted"]
    for row, n, value in zip(accept.tolist(), lengths.tolist(), got.tolist(), strict=True):
        assert value == pytest.approx(sum(math.prod(row[: j + 1]) for j in range(n)))
    summary = summarise(out, costs)
    assert summary["speedup"] == pytest.approx(1.0 * (2.62 + 1.813) / (1.42 + 1.63))
    assert summary["tokens_per_round"] == pytest.approx((2.62 + 1.813) / 2)
    assert summary["discard_rate"] == pytest.approx((5 - 1.62 - 0.813) / 4.433)
    assert summary["verification_rate"] == pytest.approx(2 / 4.433)


def test_cost_model_interpolates_and_round_trips(tmp_path):
    costs = CostModel(draft_step=0.01, draw=0.001, features=0.001, head=0.0005, target={1: 1.0, 3: 2.0, 5: 2.5},
                      machine={"cpu": "x"})
    got = costs.target_cost(torch.tensor([0, 1, 2, 3, 4, 5, 7]))
    assert got.tolist() == pytest.approx([1.0, 1.0, 1.5, 2.0, 2.25, 2.5, 3.0])  # clamped below, extrapolated above
    costs.save(tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text())["target"] == {"1": 1.0, "3": 2.0, "5": 2.5}
    assert CostModel.load(tmp_path / "c.json") == costs


def correlated_rounds(n: int = 400, k: int = 8, seed: int = 0) -> Rounds:
    """Easy rounds (every candidate accepted with 0.95) and hard ones (0.2), mixed: acceptance is
    correlated within a round, so a rule that knows the round beats any constant k."""
    g = torch.Generator().manual_seed(seed)
    easy = torch.rand(n, generator=g) < 0.5
    accept = torch.where(easy, 0.95, 0.2).double().unsqueeze(1).expand(n, k).clone()
    return Rounds(
        accept=accept,
        length=torch.full((n,), k),
        seq=torch.arange(n) // 10,
        draft_prob=torch.full((n, k), 0.5, dtype=torch.float64),  # uninformative confidence
        temperature=torch.ones(n, dtype=torch.float64),
        head={"default": accept.clone()},  # perfect knowledge of each candidate's a_s
        head_timing={"default": "before"},
    )


def test_a_rule_that_knows_acceptance_beats_constant_k():
    rounds = correlated_rounds()
    costs = CostModel(draft_step=0.05, draw=0.0, features=0.0005, head=0.0005, target={1: 1.0, 9: 1.2})
    result = predict(rounds, costs, (1, 8), resamples=100)
    best = result["best"]
    assert result["rounds"] == 400 and result["prompts"] == 40 and result["logged_k"] == 8
    assert best["none"]["speedup"] == pytest.approx(1.0)
    assert best["specdec++"]["speedup"] > 1.1 * best["constant"]["speedup"] > 1.1
    # The oracle stops hard rounds at once and lets easy ones run long.
    oracle = stop_lengths(rounds, ("specdec++", "default", best["specdec++"]["knob"], 1, 8))
    easy = rounds.accept[:, 0] > 0.5
    assert oracle[~easy].eq(1).all() and oracle[easy].float().mean() > 3
    comparison = next(c for c in result["comparisons"] if c["b"].startswith("constant"))
    assert comparison["ratio"] > 1.1 and comparison["ci_low"] > 1.0
    # Every constant row matches a hand computation of its speedup.
    for row in (r for r in result["rows"] if r["policy"] == "constant"):
        k = row["knob"]
        tokens = sum(1 + sum(a**j for j in range(1, k + 1)) for a in rounds.accept[:, 0].tolist())
        seconds = 400 * (1.0 + 0.2 * k / 8 + 0.05 * k)
        assert row["speedup"] == pytest.approx(tokens / seconds, abs=1e-4)
    # The bootstrap resamples prompts: identical outcomes give identical speedups in every resample.
    out = round_outcomes(rounds, stop_lengths(rounds, ("constant", 3)), costs)
    boot = bootstrap_speedups([out, out], rounds.seq, costs, resamples=20)
    assert boot.shape == (20, 2) and torch.equal(boot[:, 0], boot[:, 1]) and boot[:, 0].std() > 0


def write_shard(directory, records: list[tuple[int, RoundRecord]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(records_to_rows(records, 0, torch.float32), str(directory / "shard-00000.safetensors"))
    (directory / "manifest.json").write_text(json.dumps({"shards": [{"name": "shard-00000", "prompts": 2}]}))


def record(k: int, seed: int, temperature: float) -> RoundRecord:
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(k, len(CANDIDATE_FEATURES), generator=g)
    features[:, F["log_q"]] = -torch.rand(k, generator=g)
    features[:, F["temperature"]] = temperature
    return RoundRecord("r", 0, torch.randn(k, 32, generator=g), features, torch.rand(k, generator=g),
                       torch.rand(k, generator=g), 0)


def test_load_rounds_lays_out_logged_rows(tmp_path):
    records = [(0, record(3, 0, 1.0)), (0, record(2, 1, 1.0)), (1, record(3, 2, 0.0))]
    write_shard(tmp_path / "d", records)
    heads = {"default": random_head(32, seed=1), "post": random_head(32, seed=2, timing="after")}
    r = load_rounds([tmp_path / "d"], heads)
    assert r.length.tolist() == [3, 2, 3] and r.seq.tolist() == [0, 0, 1] and r.temperature.tolist() == [1, 1, 0]
    assert r.head_timing == {"default": "before", "post": "after"}
    for i, (_, rec) in enumerate(records):
        k = len(rec.accept_prob)
        torch.testing.assert_close(r.accept[i, :k], rec.accept_prob.double())
        torch.testing.assert_close(r.draft_prob[i, :k], rec.features[:, F["log_q"]].exp().double())
        assert r.accept[i, k:].eq(0).all()
        before = heads["default"].accept_prob(rec.states, rec.features).double()
        # float32 heads: a batch of other rows may round differently in the last bits (AVX-512 hosts differ)
        torch.testing.assert_close(r.head["default"][i, :k], before, atol=1e-6, rtol=1e-5)
        after = heads["post"].accept_prob(rec.states[1:], rec.features[:-1]).double()  # state after y_s
        torch.testing.assert_close(r.head["post"][i, : k - 1], after, atol=1e-6, rtol=1e-5)
        assert r.head["post"][i, k - 1 :].isnan().all() and r.head["default"][i, k:].isnan().all()
    greedy = r.only(r.temperature == 0)
    assert greedy.length.tolist() == [3] and set(greedy.head) == {"default", "post"}
    # Several directories: prompts stay apart.
    both = load_rounds([tmp_path / "d", tmp_path / "d"])
    assert len(both.length) == 6 and len(torch.unique(both.seq)) == 4


@pytest.mark.parametrize(("timing", "low", "expected"), [("before", 1, 4), ("after", 1, 5), ("before", 5, 5)])
def test_engine_stops_where_the_evaluator_says(tiny_pair, tokenizer, timing, low, expected):
    """A head predicting a = 0.8 everywhere with threshold 0.5: 1 - 0.8^s passes 0.5 at s = 4.
    The engine's rounds have the length stop_lengths gives (a round's budget aside)."""
    from engine.llm_engine import LLMEngine
    from engine.params import SamplingParams, SpecConfig

    target, draft = tiny_pair
    head = random_head(32, seed=0, timing=timing)
    head.config.calibration = {"scale": 0.0, "bias": math.log(4.0)}  # sigmoid(log 4) = 0.8
    rule = ("specdec++", "h", 0.5, low, 8)
    rounds = Rounds(torch.zeros(1, 8), torch.tensor([8]), torch.zeros(1), torch.zeros(1, 8), torch.ones(1),
                    {"h": torch.full((1, 8), 0.8, dtype=torch.float64)}, {"h": timing})
    if timing == "after":
        rounds.head["h"][0, -1] = NAN
    assert stop_lengths(rounds, rule).tolist() == [expected]
    engine = LLMEngine(target, draft, tokenizer, heads={"default": head})
    logged: list[tuple[int, int]] = []
    engine.recorder = lambda rec: logged.append((len(rec.accept_prob), rec.accepted))
    spec = SpecConfig(policy="specdec++", threshold=0.5, bounds=(low, 8))
    max_tokens = 40
    engine.generate("hello", SamplingParams(temperature=1.0, seed=1, max_tokens=max_tokens, ignore_eos=True), spec)
    assert len(logged) >= 4
    generated = 1  # the first round runs the target alone: one token, no candidate, not logged
    for length, accepted in logged:
        budget = min(8, max_tokens - generated - 1)  # the last token of a request goes to the target alone
        assert length == min(expected, budget)
        generated += accepted + 1
    assert logged[0][0] == expected


def test_oracle_rule_reads_the_true_acceptance():
    """`oracle` is the product rule on the logged a_s themselves: the bound a perfect head reaches."""
    rounds = correlated_rounds()
    head_fed_truth = stop_lengths(rounds, ("specdec++", "default", 0.5, 1, 8))  # that head *is* the truth
    assert torch.equal(stop_lengths(rounds, ("oracle", None, 0.5, 1, 8)), head_fed_truth)


def test_headroom_heads_lie_between_the_head_and_the_truth():
    """A head that knows nothing (0.6 everywhere): mixing in the true a_s raises its AUC step by step, the full
    weight is the truth itself, and the better heads' auto rows buy what knowing the round is worth."""
    rounds = correlated_rounds()
    rounds.head["default"] = torch.full_like(rounds.accept, 0.6)
    room = add_headroom_heads(rounds, (0.1, 0.5, 1.0))
    assert room["default"] == {"weight": 0.0, "auc": 0.5}
    aucs = [room[f"headroom{w}"]["auc"] for w in (0.1, 0.5, 1.0)]
    assert 0.5 < aucs[0] and aucs == sorted(aucs)
    assert torch.allclose(rounds.head["headroom1.0"], rounds.accept.clamp(1e-3, 1 - 1e-3))
    assert rounds.head_timing["headroom0.5"] == "before"
    costs = CostModel(draft_step=0.05, draw=0.0, features=0.0005, head=0.0005, target={1: 1.0, 9: 1.2})
    result = predict(rounds, costs, (1, 8), resamples=50)
    rows = {r["head"]: r for r in headroom_summary(result, room)}
    assert rows["default"]["auto_over_constant"] <= 1.0 + 1e-9 < 1.1 < rows["headroom1.0"]["auto_over_constant"]
    low, high = rows["headroom1.0"]["auto_over_constant_ci95"]
    assert low <= rows["headroom1.0"]["auto_over_constant"] <= high


@pytest.mark.parametrize("timing", ["before", "after"])
def test_auto_replay_stops_where_the_engine_policy_does(timing):
    """The evaluator's "auto" round (`auto_round`) against the engine's SpecDecPP given the same plan, on random
    head estimates and acceptances: an "after" head's unjudged last candidate is priced alike in both."""
    costs = CostModel(draft_step=0.02, draw=0.0, features=0.0, head=0.0,
                      target={1: 0.1, 6: 0.1, 9: 0.12, 16: 0.2})
    g = torch.Generator().manual_seed(0)
    lengths = []
    for _ in range(200):
        tuning = SelfTuning(LiveCosts(costs))
        tuning.acceptance = 0.3 + 0.6 * float(torch.rand(1, generator=g))
        pred = torch.rand(8, generator=g, dtype=torch.float64) ** 0.1
        plan = copy.deepcopy(tuning).plan([8])
        policy = SpecDecPP("auto", (1, 8), timing=timing)
        policy.set_levels(plan.levels[0], plan.depth_levels[0], tuning.acceptance)
        policy.start_round()
        length = plan.budgets[0]  # the engine: y_s is judged only while s < budget
        for s in range(1, plan.budgets[0]):
            if policy.should_stop(ProposalStep(index=s, when=timing, accept_prob=float(pred[s - 1]))):
                length = s + (timing == "after")
                break
        assert auto_round(tuning, pred, 8, (1, 8), timing == "after") == length
        lengths.append(length)
    assert len(set(lengths)) >= 4  # the cases differ: stops early, late and at the budget
