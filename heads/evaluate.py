"""How well does a predictor of acceptance match the exact labels a_s of logged rounds?

Figures, for any predictor a (the head, or the draft's own token probability q(y_s) as the
`confidence` policy uses it), on the same candidates of held-out rounds logged by the engine:

- binary KL: mean over tokens of KL(Bern(p_acc) || Bern(a));
- AUC for predicting rejection with the score 1 - a. Labels are soft: each token counts as
  a rejected example with weight 1 - p_acc and as an accepted one with weight p_acc, so the
  AUC is the probability that a random rejected example outscores a random accepted one
  (ties count half) -- the expected AUC of Bernoulli(p_acc) labels, without sampling noise;
- ECE: 10 equal-width bins of a; sum over bins of (share of tokens) * |mean a - mean p_acc|;
- Brier: mean (a - p_acc)^2.

The head's `accept_prob` is calibrated (heads/train.py), so its figures are those the stop
rule works with. `online_calibration` replays the engine's online calibrator over the rows in
logged order (engine/calibration.py), and again with whole prompts in a seeded random order (logged
order may run through a set grouped by kind, so that its halves differ): on prompts unlike the head's
training data its ECE over the second half should be below the first half's, and below the shipped
calibration's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.calibration import BANDS, OnlineCalibrator, expected_calibration_error
from engine.head import CANDIDATE_FEATURES, AcceptanceHead, load_head
from heads.data import load_shards, read_manifest
from heads.report import write_report
from heads.train import head_inputs, head_logits

EPS = 1e-6


def binary_kl(p: torch.Tensor, a: torch.Tensor) -> float:
    p, a = p.double(), a.double().clamp(EPS, 1 - EPS)
    pc = p.clamp(EPS, 1 - EPS)
    kl = p * (pc / a).log() + (1 - p) * ((1 - pc) / (1 - a)).log()
    return float(kl.mean())


def soft_auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """AUC of `score` for soft labels: each example is positive with weight `positive` and
    negative with weight 1 - positive. Ties between scores count half."""
    score, pos = score.double(), positive.double()
    neg = 1 - pos
    order = torch.argsort(score)
    score, pos, neg = score[order], pos[order], neg[order]
    # Group equal scores: within a group, pairs count half.
    _, counts = torch.unique_consecutive(score, return_counts=True)
    group = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    pos_g = torch.zeros(counts.numel(), dtype=torch.float64).index_add_(0, group, pos)
    neg_g = torch.zeros(counts.numel(), dtype=torch.float64).index_add_(0, group, neg)
    neg_below = torch.cumsum(neg_g, 0) - neg_g
    total = float(pos_g.sum() * neg_g.sum())
    if total == 0.0:
        return float("nan")
    return float((pos_g * (neg_below + 0.5 * neg_g)).sum() / total)


def predictor_metrics(a: torch.Tensor, p_acc: torch.Tensor) -> dict[str, float]:
    """All figures for predictions `a` = P(accepted) against soft labels `p_acc`."""
    return {
        "binary_kl": round(binary_kl(p_acc, a), 5),
        "auc_reject": round(soft_auc(1 - a.double(), 1 - p_acc.double()), 5),
        "ece": round(expected_calibration_error(a, p_acc), 5),
        "brier": round(float(((a.double() - p_acc.double()) ** 2).mean()), 5),
        "mean_prediction": round(float(a.double().mean()), 5),
    }


def head_predictions(head: AcceptanceHead, hidden: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The head's calibrated P(accepted) for every row."""
    return head.calibrated(head_logits(head, hidden, features)).cpu()


def online_predictions(logits: torch.Tensor, label: torch.Tensor, greedy: torch.Tensor, calibration: dict,
                       round_size: int = 8) -> torch.Tensor:
    """P(accepted) of every row as the engine's online calibration would have given it, rows in logged order:
    each block of `round_size` rows is predicted with its band's fit of the rows before it, then learned from."""
    calibrators = {band: OnlineCalibrator(calibration["scale"], calibration["bias"]) for band in BANDS}
    out = torch.empty(len(logits))
    for start in range(0, len(logits), round_size):
        block = torch.arange(start, min(start + round_size, len(logits)))
        for band, rows in (("greedy", block[greedy[block]]), ("sampled", block[~greedy[block]])):
            if len(rows):
                out[rows] = calibrators[band].probabilities(logits[rows])
                calibrators[band].observe(logits[rows].tolist(), out[rows].tolist(), label[rows].tolist())
    return out


def prompts_shuffled(seq: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Row order with whole prompts in a seeded random order (each prompt's rows kept in order): a stream
    whose two halves draw from the same mix of prompts, where logged order may run through a prompt set
    grouped by kind (the mixed set: math, prose, translations, languages), so that its halves differ."""
    prompts = torch.unique(seq)
    order = prompts[torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))]
    return torch.cat([torch.nonzero(seq == s).squeeze(-1) for s in order])


def calibration_halves(logits: torch.Tensor, label: torch.Tensor, greedy: torch.Tensor, calibration: dict) -> dict:
    """ECE over the first and second half of the rows (logged order) of the online-calibrated predictions
    and, for comparison, of the shipped calibration's."""
    shipped = torch.sigmoid(logits.float() * calibration["scale"] + calibration["bias"])
    online = online_predictions(logits, label, greedy, calibration)
    half = len(label) // 2
    figures = {}
    for name, predictions in (("online", online), ("shipped", shipped)):
        for part, rows in (("first_half", slice(0, half)), ("second_half", slice(half, None))):
            figures[f"ece_{name}_{part}"] = round(expected_calibration_error(predictions[rows], label[rows]), 5)
    return figures


def auc_gap_interval(
    a: torch.Tensor, b: torch.Tensor, label: torch.Tensor, seq: torch.Tensor, resamples: int = 200, seed: int = 0
) -> tuple[float, float]:
    """95% bootstrap interval (by sequence: neighbouring candidates are correlated) of
    AUC(a) - AUC(b) for predicting rejection."""
    groups = [torch.nonzero(seq == s).squeeze(-1) for s in torch.unique(seq)]
    g = torch.Generator().manual_seed(seed)
    gaps = []
    for _ in range(resamples):
        rows = torch.cat([groups[i] for i in torch.randint(len(groups), (len(groups),), generator=g).tolist()])
        gaps.append(soft_auc(1 - a[rows].double(), 1 - label[rows].double())
                    - soft_auc(1 - b[rows].double(), 1 - label[rows].double()))
    gaps_t = torch.tensor(gaps)
    return round(float(gaps_t.quantile(0.025)), 5), round(float(gaps_t.quantile(0.975)), 5)


def evaluate(head: AcceptanceHead, data_dir: str | Path) -> dict:
    """Figures of the head, the draft's confidence q(y_s) and the best constant (the mean label)
    on the candidates of `data_dir` the head can judge (an "after" head: all but each round's last)."""
    manifest = read_manifest(data_dir)
    rows = head_inputs(load_shards(data_dir), head.timing)
    label = rows["label"]
    logits = head_logits(head, rows["hidden"], rows["features"]).cpu()
    a = head.calibrated(logits)
    greedy = rows["features"][:, CANDIDATE_FEATURES.index("temperature")] == 0
    shuffled = prompts_shuffled(rows["seq"])
    confidence = rows["features"][:, CANDIDATE_FEATURES.index("log_q")].exp()
    predictors = {
        "head": a,
        "confidence": confidence,
        "constant": torch.full_like(label, float(label.mean())),
    }
    metrics = {name: predictor_metrics(pred, label) for name, pred in predictors.items()}
    return {
        "data": str(data_dir),
        "sources": manifest.get("sources"),
        "head_timing": head.timing,
        "prompts": sum(s["prompts"] for s in manifest["shards"]),
        "tokens": int(len(label)),
        "mean_accept_prob": round(float(label.mean()), 5),
        "auc_head": metrics["head"]["auc_reject"],
        "auc_confidence": metrics["confidence"]["auc_reject"],
        "ece_head": metrics["head"]["ece"],
        "brier_head": metrics["head"]["brier"],
        "auc_gap_ci95": auc_gap_interval(a, confidence, label, rows["seq"]),
        "predictors": metrics,
        "online_calibration": calibration_halves(logits, label, greedy, head.config.calibration),
        "online_calibration_prompts_shuffled": calibration_halves(
            *(t[shuffled] for t in (logits, label, greedy)), head.config.calibration),
    }


def format_table(result: dict) -> str:
    """A plain-text table of one `evaluate` result."""
    lines = [
        f"{result['data']}: {result['prompts']} prompts, {result['tokens']} tokens, "
        f"mean a {result['mean_accept_prob']:.3f} ({result['head_timing']} head)",
        f"{'predictor':<16} {'AUC(reject)':>11} {'binary KL':>10} {'ECE':>7} {'Brier':>7} {'mean a':>7}",
    ]
    for name, m in result["predictors"].items():
        lines.append(
            f"{name:<16} {m['auc_reject']:>11.4f} {m['binary_kl']:>10.4f} {m['ece']:>7.4f} "
            f"{m['brier']:>7.4f} {m['mean_prediction']:>7.3f}"
        )
    c = result["online_calibration"]
    lines.append(f"ECE by half of the rows in logged order: online calibration {c['ece_online_first_half']:.4f} "
                 f"-> {c['ece_online_second_half']:.4f}, shipped {c['ece_shipped_first_half']:.4f} -> "
                 f"{c['ece_shipped_second_half']:.4f}")
    c = result["online_calibration_prompts_shuffled"]
    lines.append(f"ECE by half, prompts in a seeded random order: online calibration "
                 f"{c['ece_online_first_half']:.4f} -> {c['ece_online_second_half']:.4f}, shipped "
                 f"{c['ece_shipped_first_half']:.4f} -> {c['ece_shipped_second_half']:.4f}")
    return "\n".join(lines)


def evaluate_dirs(
    head_dir: str | Path, data_dirs: list[str | Path], json_path: str | None = None, report: bool = False
) -> list[dict]:
    """`specdecpp heads eval`: `evaluate` the head on each data directory and print its table.
    `json_path` gets every figure ('-': stdout); `report` also writes report.json and REPORT.md
    into the head directory."""
    head = load_head(head_dir)
    results = [evaluate(head, d) for d in data_dirs]
    for result in results:
        print(format_table(result) + "\n")
    if json_path == "-":
        print(json.dumps(results, indent=2))
    elif json_path:
        Path(json_path).write_text(json.dumps(results, indent=2) + "\n")
    if report:
        write_report(head_dir, results)
        print(f"wrote {Path(head_dir) / 'REPORT.md'} and report.json")
    return results
