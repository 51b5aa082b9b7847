"""Acceptance head: candidate features, training, calibration, metrics, storage and mismatch errors
(synthetic data, seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import random_head

from engine.head import (
    CANDIDATE_FEATURES,
    FORMAT_VERSION,
    AcceptanceHead,
    HeadConfig,
    HeadMismatchError,
    candidate_features,
    load_head,
)
from heads.evaluate import binary_kl, expected_calibration_error, predictor_metrics, soft_auc
from heads.train import (
    TrainConfig,
    fit_platt,
    head_inputs,
    head_logits,
    lr_scale,
    split_by_sequence,
    train_head,
    weighted_bce,
)

F = {name: i for i, name in enumerate(CANDIDATE_FEATURES)}


def synthetic(n_seq: int = 300, per_seq: int = 20, hidden: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """`head_inputs`-like rows whose label is a known function of log_q and one hidden direction."""
    g = torch.Generator().manual_seed(seed)
    n = n_seq * per_seq
    x = torch.randn(n, hidden, generator=g)
    feats = torch.zeros(n, len(CANDIDATE_FEATURES))
    log_q = -4.0 * torch.rand(n, generator=g)
    feats[:, F["log_q"]] = log_q
    feats[:, F["log_q_max"]] = torch.maximum(log_q, -torch.rand(n, generator=g))
    feats[:, F["entropy"]] = 3.0 * torch.rand(n, generator=g)
    feats[:, F["margin"]] = torch.rand(n, generator=g)
    feats[:, F["is_argmax"]] = (feats[:, F["log_q"]] >= feats[:, F["log_q_max"]]).float()
    feats[:, F["position"]] = torch.randint(1, 9, (n,), generator=g).float()
    feats[:, F["temperature"]] = torch.tensor([0.0, 0.7, 1.0])[torch.randint(3, (n,), generator=g)]
    feats[:, F["top_p"]] = torch.tensor([0.9, 1.0])[torch.randint(2, (n,), generator=g)]
    label = torch.sigmoid(2.0 * log_q + 2.5 * x[:, 0] + 2.0)
    return {"hidden": x.to(torch.bfloat16), "features": feats, "label": label,
            "seq": torch.arange(n_seq).repeat_interleave(per_seq)}


def auc(a: torch.Tensor, label: torch.Tensor) -> float:
    """AUC of 1 - a for predicting rejection, with soft labels (as heads/evaluate.py reports it)."""
    return soft_auc(1 - a.double(), 1 - label.double())


def test_candidate_features_match_hand_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.0]])
    tokens = torch.tensor([0, 2, 0])
    f = candidate_features(logits, tokens, torch.tensor([1, 3, 5]), torch.tensor([1.0, 0.0, 0.7]),
                           torch.tensor([1.0, 1.0, 0.9]))
    assert f.shape == (3, len(CANDIDATE_FEATURES))
    probs = logits.softmax(-1)
    top = probs.sort(-1, descending=True).values
    torch.testing.assert_close(f[:, F["log_q"]], probs[[0, 1, 2], tokens].log())
    torch.testing.assert_close(f[:, F["entropy"]], -(probs * probs.log()).sum(-1))
    torch.testing.assert_close(f[:, F["log_q_max"]], top[:, 0].log())
    torch.testing.assert_close(f[:, F["margin"]], top[:, 0] - top[:, 1])
    assert f[:, F["is_argmax"]].tolist() == [1.0, 1.0, 0.0]  # ties count as the argmax
    assert f[:, F["position"]].tolist() == [1.0, 3.0, 5.0]
    torch.testing.assert_close(f[:, F["temperature"]], torch.tensor([1.0, 0.0, 0.7]))
    torch.testing.assert_close(f[:, F["top_p"]], torch.tensor([1.0, 1.0, 0.9]))
    # A one-hot draft (probability 0 elsewhere) has a finite entropy of 0.
    sharp = candidate_features(torch.tensor([[0.0, -torch.inf, -torch.inf]]), torch.tensor([0]), torch.ones(1),
                               torch.ones(1), torch.ones(1))
    assert sharp[0, F["entropy"]] == 0.0 and sharp[0, F["log_q"]] == 0.0 and sharp[0, F["margin"]] == 1.0


def test_weighted_bce_matches_formula():
    z = torch.tensor([0.3, -1.2, 2.0])
    p = torch.tensor([0.7, 0.1, 1.0])
    a = torch.sigmoid(z)
    expected = -(p * a.log() + 6 * (1 - p) * (1 - a).log()).mean()
    torch.testing.assert_close(weighted_bce(z, p, 6.0), expected)
    # w_reject = 1 is a proper scoring rule: over constants the loss is lowest at the label itself.
    label = torch.full((5,), 0.3)
    losses = {c: float(weighted_bce(torch.full((5,), math.log(c / (1 - c))), label)) for c in (0.2, 0.3, 0.4)}
    assert min(losses, key=losses.get) == 0.3


def test_fit_platt_recovers_a_known_map():
    g = torch.Generator().manual_seed(0)
    z = 2.0 * torch.randn(20_000, generator=g)
    soft = torch.sigmoid(1.7 * z - 0.4)
    fit = fit_platt(z, soft)
    assert fit["scale"] == pytest.approx(1.7, abs=1e-3) and fit["bias"] == pytest.approx(-0.4, abs=1e-3)
    hard = torch.bernoulli(soft, generator=g)  # sampled labels: the same map up to noise
    fit = fit_platt(z, hard)
    assert fit["scale"] == pytest.approx(1.7, abs=0.1) and fit["bias"] == pytest.approx(-0.4, abs=0.1)


def test_training_beats_constant_and_confidence_and_is_calibrated():
    data = synthetic()
    head, record = train_head(data, TrainConfig(depth=2, lr=3e-3, batch_size=128, max_epochs=10, patience=3),
                              draft_id="toy")
    assert record["best_val_loss"] < record["history"][0]["val_loss"]
    assert record["train_tokens"] + record["val_tokens"] == len(data["label"]) and record["val_tokens"] > 0
    assert head.config.training is record and head.config.draft_id == "toy" and head.timing == "before"
    test = synthetic(n_seq=100, seed=1)
    a = head.accept_prob(test["hidden"], test["features"])
    label = test["label"]
    confidence = test["features"][:, F["log_q"]].exp()
    oracle = auc(label, label)
    assert auc(torch.full_like(label, float(label.mean())), label) == pytest.approx(0.5)
    assert auc(a, label) > oracle - 0.03  # near the best possible ranking
    assert auc(a, label) > auc(confidence, label) + 0.05  # it reads the hidden state too
    assert expected_calibration_error(a, label) < 0.03
    metrics = predictor_metrics(a, label)
    assert metrics["brier"] < predictor_metrics(torch.full_like(label, float(label.mean())), label)["brier"] / 2


def test_calibration_undoes_the_reject_weighting():
    data = synthetic(n_seq=200)
    config = TrainConfig(depth=1, w_reject=6.0, lr=3e-3, batch_size=128, max_epochs=6, val_fraction=0.3)
    head, _ = train_head(data, config)
    test = synthetic(n_seq=100, seed=2)
    raw = torch.sigmoid(head_logits(head, test["hidden"].float(), test["features"]))
    calibrated = head.accept_prob(test["hidden"], test["features"])
    mean = float(test["label"].mean())
    assert mean - float(raw.mean()) > 0.05  # the weighted loss pushes towards rejection ...
    assert abs(float(calibrated.mean()) - mean) < 0.02  # ... and the Platt map brings it back
    assert expected_calibration_error(calibrated, test["label"]) < 0.03 < expected_calibration_error(raw, test["label"])
    assert auc(calibrated, test["label"]) == pytest.approx(auc(raw, test["label"]), abs=1e-6)  # monotone map


def rounds_data(lengths: list[int], hidden: int = 2) -> dict[str, torch.Tensor]:
    """Rows as heads/data.py lays them out, row i's hidden state and features filled with i."""
    n = sum(lengths)
    rows = torch.arange(n, dtype=torch.float32)
    return {
        "hidden": rows.unsqueeze(1).repeat(1, hidden),
        "features": rows.unsqueeze(1).repeat(1, len(CANDIDATE_FEATURES)),
        "accept_prob": rows / n,
        "position": torch.cat([torch.arange(1, k + 1) for k in lengths]).int(),
        "round": torch.cat([torch.full((k,), r) for r, k in enumerate(lengths)]),
        "seq": torch.cat([torch.full((k,), r // 2) for r, k in enumerate(lengths)]).int(),
        "has_next": torch.cat([(torch.arange(k) < k - 1) for k in lengths]).to(torch.uint8),
    }


def test_head_inputs_timings():
    data = rounds_data([3, 1, 2])
    before = head_inputs(data, "before")
    assert before["hidden"][:, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert before["label"].tolist() == data["accept_prob"].tolist()
    after = head_inputs(data, "after")  # the state after the forward on y_s: the next row's, same round
    assert after["features"][:, 0].tolist() == [0, 1, 4]
    assert after["hidden"][:, 0].tolist() == [1, 2, 5]
    assert after["label"].tolist() == data["accept_prob"][[0, 1, 4]].tolist()
    assert after["seq"].tolist() == [0, 0, 1] and after["position"].tolist() == [1, 2, 1]
    with pytest.raises(ValueError, match="timing"):
        head_inputs(data, "during")


def test_an_after_head_learns_from_the_state_after_the_candidate():
    """Acceptance readable only in the state after y_s: an "after" head learns it, a "before" head cannot."""
    g = torch.Generator().manual_seed(0)
    data = rounds_data([4] * 1500, hidden=8)
    data["hidden"] = torch.randn(len(data["round"]), 8, generator=g)
    data["features"] = torch.zeros(len(data["round"]), len(CANDIDATE_FEATURES))
    nxt = torch.cat([data["hidden"][1:, 0], torch.zeros(1)])
    noise = torch.rand(len(nxt), generator=g)  # labels of each round's last candidate: unrelated
    data["accept_prob"] = torch.where(data["has_next"].bool(), torch.sigmoid(4 * nxt), noise)
    judged = data["has_next"].bool()
    aucs = {}
    for timing in ("before", "after"):
        rows = head_inputs(data, timing)
        head, _ = train_head(rows, TrainConfig(timing=timing, depth=1, lr=2e-2, batch_size=128, max_epochs=5))
        a = head.accept_prob(rows["hidden"], rows["features"])
        aucs[timing] = auc(a[judged] if timing == "before" else a, data["accept_prob"][judged])
    assert aucs["after"] > 0.9 and aucs["before"] < 0.6


def test_validation_split_keeps_sequences_whole():
    keys = torch.arange(50).repeat_interleave(7)
    val = split_by_sequence(keys, 0.2, seed=3)
    assert val.sum() == 10 * 7
    for k in torch.unique(keys):
        assert val[keys == k].all() or not val[keys == k].any()
    assert not split_by_sequence(torch.zeros(5, dtype=torch.long), 0.2, seed=0).any()  # one sequence: no split


def test_lr_schedule_warms_up_then_decays_to_zero():
    scales = [lr_scale(s, 100, 0.1) for s in range(100)]
    assert scales[0] == pytest.approx(0.1) and scales[9] == pytest.approx(1.0) and scales[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(scales[9:], scales[10:], strict=False)) and scales[-1] < 0.01


def test_accept_prob_applies_the_calibration():
    head = random_head(8, seed=1)
    x, f = torch.randn(20, 8), torch.randn(20, len(CANDIDATE_FEATURES))
    z = head(x, f)
    head.config.calibration = {"scale": 2.0, "bias": -1.0}
    torch.testing.assert_close(head.accept_prob(x, f), torch.sigmoid(2.0 * z - 1.0))
    head.config.calibration = {"scale": 0.0, "bias": math.log(4.0)}
    torch.testing.assert_close(head.accept_prob(x, f), torch.full((20,), 0.8))


def test_save_load_round_trip(tmp_path):
    data = synthetic(n_seq=20, hidden=8)
    head, _ = train_head(data, TrainConfig(timing="after", max_epochs=2, batch_size=64), draft_id="toy-draft")
    assert head.config.calibration != {"scale": 1.0, "bias": 0.0}  # fitted after training
    head.save(tmp_path)
    assert {f.name for f in tmp_path.iterdir()} == {"model.safetensors", "config.json"}
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["version"] == FORMAT_VERSION == 2 and raw["features"] == list(CANDIDATE_FEATURES)
    loaded = load_head(tmp_path, hidden_size=8, draft_id="toy-draft")
    assert loaded.timing == "after" and loaded.config.depth == 3
    assert loaded.config.calibration == head.config.calibration
    assert loaded.config.training["args"]["timing"] == "after"
    x, f = data["hidden"][:50], data["features"][:50]
    torch.testing.assert_close(loaded.accept_prob(x, f), head.accept_prob(x, f))
    for name in ("input_mean", "input_scale", "feature_mean", "feature_scale"):
        assert torch.equal(getattr(loaded, name), getattr(head, name)), name
    assert not torch.equal(loaded.feature_scale, torch.ones(len(CANDIDATE_FEATURES)))  # standardised on the data
    assert len({id(b.linear.weight) for b in loaded.blocks}) == 3  # independent blocks


def test_mismatch_errors(tmp_path):
    AcceptanceHead(HeadConfig(hidden_size=8, depth=1, draft_id="draft-a")).save(tmp_path)
    with pytest.raises(HeadMismatchError, match="hidden size 8"):
        load_head(tmp_path, hidden_size=16, draft_id="draft-a")
    with pytest.raises(HeadMismatchError, match="draft-a"):
        load_head(tmp_path, hidden_size=8, draft_id="draft-b")
    with pytest.raises(FileNotFoundError):
        load_head(tmp_path / "missing")
    assert load_head(tmp_path, hidden_size=8).config.draft_id == "draft-a"


@pytest.mark.parametrize("version", [1, None])
def test_load_head_refuses_version_1_heads(tmp_path, version):
    AcceptanceHead(HeadConfig(hidden_size=8, depth=1)).save(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("version")
    if version is not None:
        raw["version"] = version
    raw["features"] = ["log_draft_prob", "draft_entropy", "log_draft_max"]  # what a version-1 head stored
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(HeadMismatchError, match=r"format version 1.*version 2.*heads train"):
        load_head(tmp_path, hidden_size=8)


def test_head_config_is_validated():
    with pytest.raises(ValueError, match="timing"):
        AcceptanceHead(HeadConfig(hidden_size=4, timing="during"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="features"):
        AcceptanceHead(HeadConfig(hidden_size=4, features=["log_q", "entropy"]))


def test_head_loads_only_from_safetensors(tmp_path):
    head = AcceptanceHead(HeadConfig(hidden_size=4, depth=1))
    head.save(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(head.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_head(tmp_path)


def test_soft_auc_matches_pairwise_definition():
    g = torch.Generator().manual_seed(0)
    score = torch.randint(0, 5, (60,), generator=g).double()  # many ties
    pos = torch.rand(60, generator=g).double()
    num = den = 0.0
    for i in range(60):
        for j in range(60):
            w = float(pos[i] * (1 - pos[j]))
            den += w
            num += w * (1.0 if score[i] > score[j] else 0.5 if score[i] == score[j] else 0.0)
    assert soft_auc(score, pos) == pytest.approx(num / den, abs=1e-9)


def test_calibration_and_kl_of_perfect_and_constant_predictors():
    p = torch.rand(1000, generator=torch.Generator().manual_seed(1))
    assert binary_kl(p, p) == pytest.approx(0.0, abs=1e-6)
    assert expected_calibration_error(p, p) == pytest.approx(0.0, abs=1e-9)
    const = torch.full_like(p, float(p.mean()))
    assert binary_kl(p, const) > 0.05
    assert expected_calibration_error(const, p) == pytest.approx(0.0, abs=1e-6)  # calibrated, yet uninformative
    assert soft_auc(1 - const, 1 - p) == pytest.approx(0.5)
    assert expected_calibration_error(p * 0.5, p) == pytest.approx(float(p.mean()) * 0.5, abs=1e-6)


def test_shipped_head_config_is_valid():
    """Every shipped head names its draft, is of the current format and loads with its own hidden size."""
    from heads.shipped import SHIPPED_DIR, shipped_head_for

    for config in SHIPPED_DIR.glob("*/config.json"):
        raw = json.loads(config.read_text())
        assert raw["draft_id"], config
        head = load_head(config.parent, hidden_size=raw["hidden_size"], draft_id=raw["draft_id"])
        assert shipped_head_for(raw["draft_id"]) == config.parent
        assert head.config.training.get("data_hash")


@pytest.mark.parametrize("timing", ["before", "after"])
def test_engine_feeds_the_head_what_gen_data_logs(tiny_pair, tokenizer, timing):
    """At serving time a head sees exactly the (hidden state, features) rows `head_inputs` trains it on:
    "before" the state that produced q_s, "after" the state of the draft's forward on y_s."""
    from engine.llm_engine import LLMEngine
    from engine.params import SamplingParams, SpecConfig

    target, draft = tiny_pair
    head = random_head(32, seed=4, timing=timing)
    head.config.calibration = {"scale": 0.0, "bias": 30.0}  # a = 1: never stops, every round runs to its budget
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = head.forward

    def spy(hidden, features):
        calls.append((hidden.clone(), features.clone()))
        return original(hidden, features)

    head.forward = spy  # what the head reads, whichever calibration turns its logit into P(accepted)
    engine = LLMEngine(target, draft, tokenizer, heads={"default": head})
    calls.clear()  # the engine timed its head while measuring its costs
    rounds: list[tuple] = []

    def recorder(rec):
        rounds.append((rec, list(calls)))
        calls.clear()

    engine.recorder = recorder
    spec = SpecConfig(policy="specdec++", threshold=0.5, bounds=(1, 5))
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=3, max_tokens=20, ignore_eos=True)
    engine.generate("hello", params, spec)
    assert len(rounds) >= 3
    for rec, seen in rounds:
        k = len(rec.accept_prob)
        data = rounds_data([k], hidden=32)
        data["hidden"], data["features"] = rec.states, rec.features
        rows = head_inputs(data, timing)
        assert len(seen) == k - 1  # every candidate but the last of a full round is judged
        if k == 1:
            continue
        assert all(h.shape == (1, 32) and f.shape == (1, len(CANDIDATE_FEATURES)) for h, f in seen)
        torch.testing.assert_close(torch.cat([h for h, _ in seen]), rows["hidden"][: k - 1].float())
        torch.testing.assert_close(torch.cat([f for _, f in seen]), rows["features"][: k - 1])
        assert rec.features[:, F["temperature"]].sub(0.8).abs().max() < 1e-6
        assert rec.features[:, F["position"]].tolist() == list(range(1, k + 1))


@pytest.mark.slow
def test_default_pair_picks_the_shipped_head():
    """With the default pair, the engine's default head is the shipped one, and it fits the draft."""
    from engine.config import EngineConfig
    from engine.factory import resolve_paths
    from engine.loading.loader import model_identity
    from heads.shipped import SHIPPED_DIR

    _, draft, head = resolve_paths(EngineConfig())
    assert head is not None and head.startswith(str(SHIPPED_DIR))
    config = json.loads((Path(draft) / "config.json").read_text())
    load_head(head, hidden_size=config["hidden_size"], draft_id=model_identity(draft))
