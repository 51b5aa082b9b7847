"""Online calibration of the acceptance head (engine/calibration.py): convergence on a synthetic shift,
bounded memory, the reliability table, and the engine feeding it (losslessness unchanged)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CHEAP_DRAFT_COSTS, random_head

from engine.calibration import (
    MIN_LABELS,
    Calibrators,
    OnlineCalibrator,
    expected_calibration_error,
    refit_platt,
    reliability_table,
)
from engine.llm_engine import LLMEngine
from engine.params import SamplingParams, SpecConfig


def feed(calibrator: OnlineCalibrator, z: torch.Tensor, truth: torch.Tensor, round_size: int = 8) -> list[float]:
    """Stream (z, label) pairs through the calibrator a round at a time, as the engine does: each round is
    predicted with the fit of the rounds before it. Returns the predictions used."""
    used = []
    for start in range(0, len(z), round_size):
        logits = z[start : start + round_size]
        predicted = calibrator.probabilities(logits).tolist()
        calibrator.observe(logits.tolist(), predicted, truth[start : start + round_size].tolist())
        used += predicted
    return used


def synthetic_stream(n: int, scale: float, bias: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Head logits z and exact labels a = sigmoid(scale z + bias): a head miscalibrated by a known transform."""
    z = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2.0
    return z, torch.sigmoid(scale * z + bias)


def test_calibrator_converges_on_a_synthetic_shift():
    """The shipped calibration (identity) is right at first; then the head's logits shift (the truth becomes
    sigmoid(2.5 z - 1)). After enough labels the calibrator finds A, B of the new transform and the
    calibration error of its predictions drops; the frozen control keeps the error."""
    learning, frozen = OnlineCalibrator(1.0, 0.0), OnlineCalibrator(1.0, 0.0, learning=False)
    z0, a0 = synthetic_stream(1000, 1.0, 0.0, seed=0)
    z1, a1 = synthetic_stream(6000, 2.5, -1.0, seed=1)
    for calibrator in (learning, frozen):
        feed(calibrator, z0, a0)
    assert learning.scale == pytest.approx(1.0, abs=0.05) and learning.bias == pytest.approx(0.0, abs=0.05)
    used = torch.tensor(feed(learning, z1, a1))
    used_frozen = torch.tensor(feed(frozen, z1, a1))
    early, late = slice(0, 1000), slice(-2000, None)
    assert expected_calibration_error(used[early], a1[early]) > 0.05
    assert expected_calibration_error(used[late], a1[late]) < 0.02
    assert expected_calibration_error(used_frozen[late], a1[late]) > 0.05  # control: without refits it stays off
    assert learning.scale == pytest.approx(2.5, abs=0.1) and learning.bias == pytest.approx(-1.0, abs=0.1)
    assert (frozen.scale, frozen.bias) == (1.0, 0.0)
    assert learning.snapshot("h", "b").calibration_error < 0.02 < frozen.snapshot("h", "b").calibration_error


def test_binary_labels_converge_too():
    """Greedy rounds give 0/1 labels: the refit is a logistic regression on them."""
    calibrator = OnlineCalibrator(1.0, 0.0)
    z, truth = synthetic_stream(8000, 0.5, 1.0, seed=2)
    labels = torch.bernoulli(truth, generator=torch.Generator().manual_seed(3))
    feed(calibrator, z, labels)
    assert calibrator.scale == pytest.approx(0.5, abs=0.12) and calibrator.bias == pytest.approx(1.0, abs=0.2)


def test_shipped_calibration_until_enough_labels():
    calibrator = OnlineCalibrator(2.0, -1.0)
    z, a = synthetic_stream(MIN_LABELS - 8, 0.1, 3.0, seed=4)
    feed(calibrator, z, a)
    assert (calibrator.scale, calibrator.bias) == (2.0, -1.0)
    torch.testing.assert_close(calibrator.probabilities(torch.tensor([0.5])), torch.sigmoid(torch.tensor([0.0])))


def test_memory_is_bounded():
    """The ring buffers never grow past the window, however many labels arrive."""
    calibrator = OnlineCalibrator(1.0, 0.0, window=64, refit_every=16, min_labels=32)
    z, a = synthetic_stream(1000, 1.5, 0.5, seed=5)
    feed(calibrator, z, a, round_size=7)
    assert calibrator.labels_seen == 1000 and calibrator.size == 64
    assert len(calibrator._logits) == len(calibrator._predicted) == len(calibrator._realized) == 64
    assert sum(count for count, _, _ in calibrator.snapshot("h", "greedy").bins) == 64
    assert calibrator.scale == pytest.approx(1.5, abs=0.3)  # fitted on the window alone


def test_refit_survives_saturated_logits():
    """Logits far out in the sigmoid's tails make a full Newton step overshoot; the halved steps do not."""
    z = torch.linspace(-40, 40, 500, dtype=torch.float64)
    scale, bias = refit_platt(z, torch.sigmoid(0.1 * z), start=(1.0, 0.0), prior=(1.0, 0.0), steps=30)
    assert scale == pytest.approx(0.1, abs=0.01) and abs(bias) < 0.05


def test_reliability_table_and_error():
    predicted = torch.tensor([0.05, 0.15, 0.15, 0.95])
    realized = torch.tensor([0.0, 0.2, 0.3, 1.0])
    counts, sum_predicted, sum_realized = reliability_table(predicted, realized)
    assert counts.tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 0, 1]
    assert sum_realized[1].item() == pytest.approx(0.5)
    assert expected_calibration_error(predicted, realized) == pytest.approx((0.05 + 0.2 + 0.05) / 4)
    calibrator = OnlineCalibrator(1.0, 0.0)
    assert calibrator.snapshot("h", "greedy").calibration_error is None  # nothing seen yet
    calibrator.observe([0.0] * 4, predicted.tolist(), realized.tolist())
    snapshot = calibrator.snapshot("h", "greedy")
    assert snapshot.calibration_error == pytest.approx((0.05 + 0.2 + 0.05) / 4)
    assert snapshot.bins[1] == (2, pytest.approx(0.15), pytest.approx(0.25)) and snapshot.labels == 4


@pytest.fixture(scope="module")
def engine(tiny_pair, tokenizer):
    """A deliberately miscalibrated head (its shipped calibration says a = 0.97 everywhere)."""
    target, draft = tiny_pair
    head = random_head(target.config.hidden_size, seed=7)
    head.config.calibration = {"scale": 0.0, "bias": math.log(0.97 / 0.03)}
    engine = LLMEngine(target, draft, tokenizer, heads={"default": head}, costs=CHEAP_DRAFT_COSTS)
    return engine


def test_engine_feeds_the_calibrator_of_the_request_band(engine):
    """Every judged candidate reaches its head's calibrator for the request's temperature band, and the
    request's stats carry its mean predicted and realized acceptance."""
    before = {key: c.labels_seen for key, c in engine.calibration.calibrators.items()}
    spec = SpecConfig(policy="specdec++", threshold=0.5, bounds=(1, 6))
    out = engine.generate("hello", SamplingParams(temperature=1.0, seed=0, max_tokens=24, ignore_eos=True), spec)
    stats = out.stats
    sampled = engine.calibration.calibrators[("default", "sampled")]
    assert stats["judged_candidates"] > 0
    assert sampled.labels_seen - before[("default", "sampled")] == stats["judged_candidates"]
    assert engine.calibration.calibrators[("default", "greedy")].labels_seen == before[("default", "greedy")]
    assert 0.0 <= stats["mean_realized_acceptance"] <= 1.0
    assert stats["mean_predicted_acceptance"] == pytest.approx(0.97, abs=1e-3)  # too few labels to refit yet
    constant = engine.generate("hello", SamplingParams(temperature=0.0, max_tokens=8), SpecConfig(policy="constant"))
    assert constant.stats["judged_candidates"] == 0 and constant.stats["mean_predicted_acceptance"] is None


def test_greedy_identical_with_auto_and_calibration_learning(engine):
    """Losslessness with threshold auto and the calibrator refitting between rounds: greedy output stays the
    target's, while the calibrator departs from the head's (wrong) shipped calibration and its error drops."""
    greedy = engine.calibration.calibrators[("default", "greedy")]
    greedy.min_labels, greedy.refit_every = 32, 16  # refit within a few requests (the tiny pair's rounds are short)
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    first_error, proposed, refits = None, 0, set()
    for prompt in ["hello world", "the quick brown fox", "a", "jumps over", "lazy dog", "zzz"] * 2:
        reference = engine.generate(prompt, params, SpecConfig(policy="none"))
        out = engine.generate(prompt, params, SpecConfig(policy="specdec++", threshold="auto", bounds=(1, 8)))
        assert out.token_ids == reference.token_ids
        proposed += out.stats["proposed_tokens"]
        refits.add((greedy.scale, greedy.bias))
        if first_error is None and greedy.size >= 32:
            first_error = greedy.snapshot("default", "greedy").calibration_error
    assert proposed > 0 and len(refits) > 2  # it refitted between requests, and every output stayed the target's
    recent = greedy.size - 64, greedy.size
    late_error = expected_calibration_error(torch.tensor(greedy._predicted[slice(*recent)]),
                                            torch.tensor(greedy._realized[slice(*recent)]))
    assert first_error is not None and late_error < first_error / 2


def test_calibration_off_keeps_the_shipped_calibration(tiny_pair, tokenizer):
    target, draft = tiny_pair
    head = random_head(target.config.hidden_size, seed=8)
    engine = LLMEngine(target, draft, tokenizer, heads={"default": head}, costs=CHEAP_DRAFT_COSTS,
                       online_calibration=False)
    calibrator = engine.calibration.calibrators[("default", "sampled")]
    calibrator.min_labels = calibrator.refit_every = 1  # it would refit after every round if it learned
    spec = SpecConfig(policy="specdec++", threshold=0.5, bounds=(1, 6))
    engine.generate("hello", SamplingParams(temperature=1.0, seed=0, max_tokens=32, ignore_eos=True), spec)
    assert calibrator.labels_seen > 0 and (calibrator.scale, calibrator.bias) == (1.0, 0.0)
    assert calibrator.snapshot("default", "sampled").calibration_error is not None  # measured all the same


def test_calibrators_per_head_and_band():
    heads = {"default": random_head(8), "after": random_head(8, timing="after")}
    heads["after"].config.calibration = {"scale": 2.0, "bias": 0.5}
    calibration = Calibrators(heads)
    assert set(calibration.calibrators) == {(h, b) for h in heads for b in ("greedy", "sampled")}
    chosen = calibration.for_request("after", SamplingParams(temperature=0.0))
    assert chosen is calibration.calibrators[("after", "greedy")] and (chosen.scale, chosen.bias) == (2.0, 0.5)
    assert calibration.for_request("after", SamplingParams(temperature=0.7)) is not chosen
    assert [(s.head, s.band) for s in calibration.snapshots()] == list(calibration.calibrators)


def test_offline_replay_reports_error_by_half():
    """`specdecpp heads eval` replays the online calibrator over logged rows: on data the shipped calibration
    misjudges, the second half's error is below the first half's and below the shipped calibration's."""
    from heads.evaluate import calibration_halves, online_predictions

    z, truth = synthetic_stream(4000, 0.4, 1.5, seed=9)
    greedy = torch.arange(4000) % 4 == 2  # as gen-data cycles sampling settings by prompt
    labels = torch.where(greedy, torch.bernoulli(truth, generator=torch.Generator().manual_seed(1)), truth).float()
    figures = calibration_halves(z.float(), labels, greedy, {"scale": 1.0, "bias": 0.0})
    assert figures["ece_online_second_half"] < figures["ece_online_first_half"]
    assert figures["ece_online_second_half"] < 0.05 < figures["ece_shipped_second_half"]
    # The first rows of each band are predicted with the shipped calibration, as a fresh engine does.
    online = online_predictions(z.float(), labels, greedy, {"scale": 1.0, "bias": 0.0})
    torch.testing.assert_close(online[:8], torch.sigmoid(z[:8].float()))


def test_prompts_shuffled_keeps_each_prompt_whole_and_in_order():
    from heads.evaluate import prompts_shuffled

    seq = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    order = prompts_shuffled(seq, seed=1)
    assert sorted(order.tolist()) == list(range(10))  # a permutation of the rows
    shuffled = seq[order].tolist()
    starts = [i for i in range(len(shuffled)) if i == 0 or shuffled[i] != shuffled[i - 1]]
    assert len(starts) == 4  # each prompt's rows stay together ...
    for s in range(4):
        rows = order[seq[order] == s]
        assert rows.tolist() == sorted(rows.tolist())  # ... and in logged order
    assert any(not torch.equal(prompts_shuffled(seq, seed=0), prompts_shuffled(seq, seed=k)) for k in range(1, 5))
