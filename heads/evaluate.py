"""How well does a predictor of acceptance match the soft labels p_acc?

Figures, for any predictor a (the head, or the draft's own token probability q(d) as the
`confidence` policy uses it), over the trained (unmixed) positions of held-out data:

- binary KL: mean over tokens of KL(Bern(p_acc) || Bern(a));
- AUC for predicting rejection with the score 1 - a. Labels are soft: each token counts as
  a rejected example with weight 1 - p_acc and as an accepted one with weight p_acc, so the
  AUC is the probability that a random rejected example outscores a random accepted one
  (ties count half) -- the expected AUC of Bernoulli(p_acc) labels, without sampling noise;
- ECE: 10 equal-width bins of a; sum over bins of (share of tokens) * |mean a - mean p_acc|;
- Brier: mean (a - p_acc)^2.

A head trained with reject weight w learns a ~ p / (p + w (1 - p)) rather than p. That
scaling is what makes the stop rule conservative, so the engine uses the raw output; the
figures are given for it (`head`) and for the head with the weighting undone
(`head_unweighted`, same AUC, the calibration a w = 1 head would have).
"""

from __future__ import annotations

from pathlib import Path

import torch

from heads.data import load_shards, read_manifest
from heads.model import AcceptanceHead

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


def expected_calibration_error(a: torch.Tensor, p: torch.Tensor, bins: int = 10) -> float:
    a, p = a.double(), p.double()
    index = (a * bins).long().clamp(0, bins - 1)
    sum_a = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, a)
    sum_p = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, p)
    return float(((sum_a - sum_p).abs()).sum() / a.numel())


def predictor_metrics(a: torch.Tensor, p_acc: torch.Tensor) -> dict[str, float]:
    """All figures for predictions `a` = P(accepted) against soft labels `p_acc`."""
    return {
        "binary_kl": round(binary_kl(p_acc, a), 5),
        "auc_reject": round(soft_auc(1 - a.double(), 1 - p_acc.double()), 5),
        "ece": round(expected_calibration_error(a, p_acc), 5),
        "brier": round(float(((a.double() - p_acc.double()) ** 2).mean()), 5),
        "mean_prediction": round(float(a.double().mean()), 5),
    }


def unweight(a: torch.Tensor, w_reject: float) -> torch.Tensor:
    """Invert a = p / (p + w (1 - p)): p = w a / (1 - a + w a)."""
    a = a.double()
    return (w_reject * a / (1 - a + w_reject * a)).clamp(0, 1)


@torch.inference_mode()
def head_predictions(head: AcceptanceHead, data: dict[str, torch.Tensor], batch: int = 4096) -> torch.Tensor:
    """The head's P(accepted) for every row of a data dict (hidden states and draft statistics)."""
    hidden = data["hidden"]
    out = []
    for s in range(0, len(hidden), batch):
        stats = {name: data[name][s : s + batch] for name in head.config.features}
        out.append(head.accept_prob(hidden[s : s + batch], stats).float().cpu())
    return torch.cat(out)


def evaluate(head: AcceptanceHead, data_dir: str | Path) -> dict:
    """Figures of the head, the head without its reject weighting, the draft's confidence q(d)
    and the best constant (the data's mean p_acc) on the trained positions of `data_dir`."""
    manifest = read_manifest(data_dir)
    data = load_shards(data_dir)
    keep = data["mask"].bool()
    p_acc = data["p_acc"][keep]
    a = head_predictions(head, {k: v[keep] for k, v in data.items()})
    w = float(head.config.training.get("args", {}).get("w_reject", 1.0))
    predictors = {
        "head": a,
        "head_unweighted": unweight(a, w),
        "confidence": data["q_tok"][keep],
        "constant": torch.full_like(p_acc, float(p_acc.mean())),
    }
    return {
        "data": str(data_dir),
        "sources": manifest.get("sources"),
        "prompts": sum(s["prompts"] for s in manifest["shards"]),
        "tokens": int(keep.sum()),
        "mean_p_acc": round(float(p_acc.mean()), 5),
        "mean_overlap": round(float(data["overlap"][keep].mean()), 5),
        "predictors": {name: predictor_metrics(pred, p_acc) for name, pred in predictors.items()},
    }


def format_table(result: dict) -> str:
    """A plain-text table of one `evaluate` result."""
    lines = [
        f"{result['data']}: {result['prompts']} prompts, {result['tokens']} tokens, "
        f"mean p_acc {result['mean_p_acc']:.3f}",
        f"{'predictor':<16} {'AUC(reject)':>11} {'binary KL':>10} {'ECE':>7} {'Brier':>7} {'mean a':>7}",
    ]
    for name, m in result["predictors"].items():
        lines.append(
            f"{name:<16} {m['auc_reject']:>11.4f} {m['binary_kl']:>10.4f} {m['ece']:>7.4f} "
            f"{m['brier']:>7.4f} {m['mean_prediction']:>7.3f}"
        )
    return "\n".join(lines)
