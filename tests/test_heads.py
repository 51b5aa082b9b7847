"""Acceptance head: training, metrics, storage and mismatch errors (synthetic data, seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from heads.evaluate import binary_kl, expected_calibration_error, predictor_metrics, soft_auc, unweight
from heads.model import DRAFT_FEATURES, AcceptanceHead, HeadConfig, HeadMismatchError, draft_stats, load_head
from heads.train import TrainConfig, split_by_sequence, train_head, weighted_bce


def synthetic(n_seq: int = 120, per_seq: int = 20, hidden: int = 16, seed: int = 0):
    """Hidden states whose acceptance probability depends non-linearly on two directions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_seq * per_seq, hidden, generator=g)
    logit = 2.5 * x[:, 0] - 1.5 * x[:, 1].abs() + 1.0
    p_acc = torch.sigmoid(logit).clamp(max=1.0)
    p_acc = torch.where(p_acc > 0.9, torch.ones_like(p_acc), p_acc)  # many exact 1s, as in real data
    keys = torch.arange(n_seq).repeat_interleave(per_seq)
    return x.to(torch.bfloat16), p_acc, keys


def test_weighted_bce_matches_formula():
    logits = torch.tensor([[0.3, -0.2], [1.0, 2.0]])
    p = torch.tensor([0.7, 0.1])
    a = logits.softmax(-1)[:, 1]
    expected = -(p * a.log() + 6 * (1 - p) * (1 - a).log()).mean()
    assert torch.allclose(weighted_bce(logits, p, 6.0), expected)


def test_training_lowers_loss_and_beats_constant():
    x, p, keys = synthetic()
    config = TrainConfig(depth=2, w_reject=3.0, lr=3e-3, batch_size=128, max_epochs=15, patience=5, features=())
    head, record = train_head(x, p, keys, config, draft_id="toy")
    history = record["history"]
    assert record["best_val_loss"] < history[0]["val_loss"]
    # Fresh data: the head beats the best constant under the same loss and ranks rejections.
    x2, p2, _ = synthetic(seed=1)
    with torch.no_grad():
        head_loss = float(weighted_bce(head(x2.float()), p2, 3.0))
    mean = float(p2.mean())
    a_const = mean / (mean + 3.0 * (1 - mean))  # minimiser of the weighted loss among constants
    const_logits = torch.tensor([math.log(1 - a_const), math.log(a_const)]).expand(len(p2), 2)
    const_loss = float(weighted_bce(const_logits, p2, 3.0))
    assert head_loss < 0.8 * const_loss
    a = head.accept_prob(x2)
    assert predictor_metrics(a, p2)["auc_reject"] > 0.8
    # Undoing the reject weighting brings the mean prediction back near the mean label.
    assert abs(float(unweight(a, 3.0).mean()) - mean) < abs(float(a.mean()) - mean)


def test_validation_split_keeps_sequences_whole():
    keys = torch.arange(50).repeat_interleave(7)
    val = split_by_sequence(keys, 0.2, seed=3)
    assert val.sum() == 10 * 7
    for k in torch.unique(keys):
        assert val[keys == k].all() or not val[keys == k].any()


def test_save_load_round_trip(tmp_path):
    x, p, keys = synthetic(n_seq=20, hidden=8)
    feats = torch.randn(len(p), 3)
    head, _ = train_head(x, p, keys, TrainConfig(max_epochs=2, batch_size=64), draft_id="toy-draft", features=feats)
    head.save(tmp_path)
    assert {f.name for f in tmp_path.iterdir()} == {"model.safetensors", "config.json"}
    loaded = load_head(tmp_path, hidden_size=8, draft_id="toy-draft")
    assert loaded.config.depth == 3 and loaded.config.training["args"]["w_reject"] == 6.0
    stats = dict(zip(DRAFT_FEATURES, feats.unbind(-1), strict=True))
    assert torch.allclose(loaded.accept_prob(x, stats), head.accept_prob(x, stats))
    assert torch.equal(loaded.input_scale, head.input_scale) and loaded.config.features == list(DRAFT_FEATURES)
    with pytest.raises(ValueError, match="log_draft_prob"):
        loaded.accept_prob(x)  # a head with features needs the draft's statistics
    # independent blocks: distinct parameters per block
    assert len({id(b.linear.weight) for b in loaded.blocks}) == 3


def test_mismatch_errors(tmp_path):
    AcceptanceHead(HeadConfig(hidden_size=8, depth=1, draft_id="draft-a")).save(tmp_path)
    with pytest.raises(HeadMismatchError, match="hidden size 8"):
        load_head(tmp_path, hidden_size=16, draft_id="draft-a")
    with pytest.raises(HeadMismatchError, match="draft-a"):
        load_head(tmp_path, hidden_size=8, draft_id="draft-b")
    with pytest.raises(FileNotFoundError):
        load_head(tmp_path / "missing")


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
    assert soft_auc(1 - const, 1 - p) == pytest.approx(0.5)


def test_shipped_head_config_is_valid():
    """Every shipped head names its draft and loads with its own hidden size."""
    from heads.shipped import SHIPPED_DIR, shipped_head_for

    for config in SHIPPED_DIR.glob("*/config.json"):
        raw = json.loads(config.read_text())
        assert raw["draft_id"], config
        head = load_head(config.parent, hidden_size=raw["hidden_size"], draft_id=raw["draft_id"])
        assert shipped_head_for(raw["draft_id"]) == config.parent
        assert head.config.training.get("data_hash")


def test_draft_stats_and_features_help():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    stats = draft_stats(logits, torch.tensor([0, 2]))
    probs = logits.softmax(-1)
    torch.testing.assert_close(stats["log_draft_prob"], probs[[0, 1], [0, 2]].log())
    torch.testing.assert_close(stats["draft_entropy"], -(probs * probs.log()).sum(-1))
    torch.testing.assert_close(stats["log_draft_max"], probs.max(-1).values.log())
    # Acceptance driven by the draft's confidence, invisible in the hidden state: features help.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 16, generator=g)
    feats = torch.randn(3000, 3, generator=g)
    p = torch.sigmoid(2.0 * feats[:, 0] + 0.5)
    keys = torch.arange(300).repeat_interleave(10)
    config = TrainConfig(depth=1, max_epochs=8, batch_size=128, w_reject=1.0, lr=1e-2)
    with_f, _ = train_head(x, p, keys, config, features=feats)
    without, _ = train_head(
        x, p, keys, TrainConfig(depth=1, max_epochs=8, batch_size=128, w_reject=1.0, lr=1e-2, features=())
    )
    test = keys >= 270
    stats = dict(zip(DRAFT_FEATURES, feats[test].unbind(-1), strict=True))
    auc_with = predictor_metrics(with_f.accept_prob(x[test], stats), p[test])["auc_reject"]
    auc_without = predictor_metrics(without.accept_prob(x[test]), p[test])["auc_reject"]
    assert auc_with > 0.75 > auc_without


def test_engine_feeds_draft_stats_to_a_head_with_features(tiny_pair, tokenizer):
    """The engine hands a features head the draft's view of each proposed token, as in training."""
    from engine.llm_engine import LLMEngine
    from engine.params import SamplingParams, SpecConfig

    target, draft = tiny_pair
    head = AcceptanceHead(HeadConfig(hidden_size=32, depth=1, draft_id="tiny", features=list(DRAFT_FEATURES)))
    seen: list[dict] = []
    original = head.accept_prob

    def spy(hidden, stats=None):
        seen.append(stats)
        return original(hidden, stats)

    head.accept_prob = spy
    engine = LLMEngine(target, draft, tokenizer, head=head)
    spec = SpecConfig(policy="specdec++", threshold=0.9, bounds=(2, 6))
    engine.generate("hello", SamplingParams(temperature=1.0, seed=0, max_tokens=12), spec)
    assert seen and all(s is not None and set(s) == set(DRAFT_FEATURES) for s in seen)
    assert all(bool((s["log_draft_prob"] <= 0).all()) for s in seen)


@pytest.mark.slow
def test_default_pair_picks_the_shipped_head():
    """With the default pair, the engine's default head is the shipped one, and it fits the draft."""
    from engine.config import EngineConfig
    from engine.factory import resolve_paths
    from engine.loader import model_identity
    from heads.shipped import SHIPPED_DIR

    _, draft, head = resolve_paths(EngineConfig())
    assert head is not None and head.startswith(str(SHIPPED_DIR))
    config = json.loads((Path(draft) / "config.json").read_text())
    load_head(head, hidden_size=config["hidden_size"], draft_id=model_identity(draft))
