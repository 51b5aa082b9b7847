"""Train the acceptance head on shards from `heads gen-data`.

Loss (per trained position, i.e. mask 1; mixed positions are skipped):
    l = -(p_acc * log a + w_reject * (1 - p_acc) * log(1 - a)),   a = softmax(logits)[1]
averaged over the positions of a batch (divided by the token count, not by the weights, so
the figure does not move with the label mix of a batch). With w_reject > 1 the minimiser is
a = p / (p + w (1 - p)): the head errs towards predicting rejection, which stops rounds
earlier (the paper's best w_reject is 6).

Validation: a fixed fraction of *sequences* (not tokens: neighbouring tokens are correlated)
is held out; the epoch with the lowest validation loss is kept, and training stops after
`patience` epochs without improvement. AdamW (the feature weights with their own, larger
learning rate), linear warmup then cosine decay.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from heads.data import finished_shards, load_shards, read_manifest
from heads.model import DRAFT_FEATURES, AcceptanceHead, HeadConfig

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    depth: int = 3
    w_reject: float = 6.0
    lr: float = 1e-3
    feature_lr: float = 1e-2  # the few feature weights need larger steps than the H-wide hidden path
    weight_decay: float = 0.01
    batch_size: int = 128
    max_epochs: int = 30
    warmup: float = 0.05  # share of all steps
    val_fraction: float = 0.1
    patience: int = 4
    seed: int = 0
    features: tuple[str, ...] = DRAFT_FEATURES  # () = the paper's hidden-state-only head


def weighted_bce(logits: torch.Tensor, p_acc: torch.Tensor, w_reject: float) -> torch.Tensor:
    """Mean soft-label BCE with the reject class weighted by `w_reject` (see module doc)."""
    logp = logits.float().log_softmax(-1)
    return -(p_acc * logp[..., 1] + w_reject * (1 - p_acc) * logp[..., 0]).mean()


def data_hash(directories: list[str | Path]) -> str:
    """sha256 over the finished shard files, in order: ties a head to the exact data it saw."""
    h = hashlib.sha256()
    for directory in directories:
        for path in finished_shards(directory):
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
    return h.hexdigest()


def load_training_data(
    directories: list[str | Path], features: tuple[str, ...] = DRAFT_FEATURES
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """(hidden [N, H], features [N, F], p_acc [N], sequence key [N], summary) over the trained positions.

    Refuses evaluation-only data (HumanEval) and data from different drafts.
    """
    hiddens, feats, labels, keys = [], [], [], []
    summary: dict = {"data": [], "prompts": 0, "tokens": 0, "draft_id": None, "hidden_size": None}
    for i, directory in enumerate(directories):
        manifest = read_manifest(directory)
        if manifest.get("eval_only"):
            raise ValueError(f"{directory} holds evaluation-only data (HumanEval); it must not be trained on")
        for key in ("draft_id", "hidden_size"):
            value = manifest.get(key)
            if summary[key] is not None and value != summary[key]:
                raise ValueError(f"{directory}: {key} {value!r} differs from the other data ({summary[key]!r})")
            summary[key] = value
        data = load_shards(directory)
        keep = data["mask"].bool()
        hiddens.append(data["hidden"][keep])
        missing = [f for f in features if f not in data]
        if missing:
            raise ValueError(f"{directory} lacks the columns {missing}; regenerate it or train with fewer --features")
        feats.append(torch.stack([data[f][keep].float() for f in features], dim=-1) if features else None)
        labels.append(data["p_acc"][keep].float())
        keys.append(data["seq"][keep].long() + i * 1_000_000_000)
        summary["data"].append(str(directory))
        summary["prompts"] += sum(s["prompts"] for s in manifest["shards"])
        summary["tokens"] += int(keep.sum())
    features_all = torch.cat(feats) if features else torch.empty(sum(len(x) for x in labels), 0)
    return torch.cat(hiddens), features_all, torch.cat(labels), torch.cat(keys), summary


def split_by_sequence(keys: torch.Tensor, val_fraction: float, seed: int) -> torch.Tensor:
    """Boolean mask of validation positions: whole sequences, about `val_fraction` of them."""
    unique = torch.unique(keys)
    g = torch.Generator().manual_seed(seed)
    n_val = max(1, round(len(unique) * val_fraction)) if val_fraction > 0 and len(unique) > 1 else 0
    val_keys = unique[torch.randperm(len(unique), generator=g)[:n_val]]
    return torch.isin(keys, val_keys)


def lr_scale(step: int, total: int, warmup: float) -> float:
    """Learning-rate multiplier: linear warmup over `warmup` of the steps, then cosine to 0."""
    warm = max(1, int(total * warmup))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def mean_loss(
    head: AcceptanceHead, hidden: torch.Tensor, feats: torch.Tensor, p_acc: torch.Tensor, w: float, batch: int = 4096
) -> float:
    total = 0.0
    for s in range(0, len(hidden), batch):
        logits = head(hidden[s : s + batch].float(), feats[s : s + batch])
        total += float(weighted_bce(logits, p_acc[s : s + batch], w)) * len(logits)
    return total / max(1, len(hidden))


def _standardise(head: AcceptanceHead, x: torch.Tensor, f: torch.Tensor) -> None:
    """Set the head's input statistics from the training inputs."""
    x = x.float()
    head.input_mean.copy_(x.mean(0))
    head.input_scale.copy_(1.0 / (x.std(0) + 1e-3))
    if head.config.features:
        head.feature_mean.copy_(f.mean(0))
        head.feature_scale.copy_(1.0 / (f.std(0) + 1e-3))


def train_head(
    hidden: torch.Tensor,
    p_acc: torch.Tensor,
    keys: torch.Tensor,
    config: TrainConfig,
    draft_id: str = "",
    extra: dict | None = None,
    features: torch.Tensor | None = None,
) -> tuple[AcceptanceHead, dict]:
    """Fit a head; return it (best validation epoch) and the training record for config.json.

    `features` [N, F] holds the columns `config.features` (see `heads.model.draft_stats`).
    """
    torch.manual_seed(config.seed)
    if features is None:
        features = torch.empty(len(hidden), 0)
    if features.shape[-1] != len(config.features):
        raise ValueError(f"{features.shape[-1]} feature columns for features {list(config.features)}")
    val = split_by_sequence(keys, config.val_fraction, config.seed)
    x_tr, f_tr, y_tr = hidden[~val], features[~val], p_acc[~val]
    x_va, f_va, y_va = hidden[val], features[val], p_acc[val]
    if len(x_va) == 0:  # too little data to hold any out: validate on the training set
        x_va, f_va, y_va = x_tr, f_tr, y_tr
    head_config = HeadConfig(
        hidden_size=hidden.shape[-1], depth=config.depth, draft_id=draft_id, features=list(config.features)
    )
    head = AcceptanceHead(head_config)
    _standardise(head, x_tr, f_tr)
    head.train()
    feature_params = list(head.feature_out.parameters()) if config.features else []
    hidden_params = [p for p in head.parameters() if all(p is not q for q in feature_params)]
    groups = [{"params": hidden_params, "base_lr": config.lr}]
    if feature_params:
        groups.append({"params": feature_params, "base_lr": config.feature_lr})
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(x_tr) / config.batch_size))
    total_steps = steps_per_epoch * config.max_epochs
    g = torch.Generator().manual_seed(config.seed)
    best = {"val_loss": mean_loss(head, x_va, f_va, y_va, config.w_reject), "epoch": 0}
    best_state = {k: v.clone() for k, v in head.state_dict().items()}
    history = [{"epoch": 0, "val_loss": round(best["val_loss"], 5)}]
    log.info("training on %d tokens, validating on %d; initial val loss %.4f", len(x_tr), len(x_va), best["val_loss"])
    step, started = 0, time.perf_counter()
    for epoch in range(1, config.max_epochs + 1):
        order = torch.randperm(len(x_tr), generator=g)
        running = 0.0
        for s in range(0, len(order), config.batch_size):
            idx = order[s : s + config.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_scale(step, total_steps, config.warmup)
            loss = weighted_bce(head(x_tr[idx].float(), f_tr[idx]), y_tr[idx], config.w_reject)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += float(loss.detach()) * len(idx)
            step += 1
        head.eval()
        val_loss = mean_loss(head, x_va, f_va, y_va, config.w_reject)
        head.train()
        train_loss = running / len(x_tr)
        history.append({"epoch": epoch, "train_loss": round(train_loss, 5), "val_loss": round(val_loss, 5)})
        log.info(
            "epoch %d: train loss %.4f, val loss %.4f (%.0fs)",
            epoch,
            train_loss,
            val_loss,
            time.perf_counter() - started,
        )
        if val_loss < best["val_loss"] - 1e-5:
            best = {"val_loss": val_loss, "epoch": epoch}
            best_state = {k: v.clone() for k, v in head.state_dict().items()}
        elif epoch - best["epoch"] >= config.patience:
            log.info("early stop: no improvement for %d epochs", config.patience)
            break
    head.load_state_dict(best_state)
    head.eval()
    record = {
        "args": asdict(config),
        "train_tokens": int(len(x_tr)),
        "val_tokens": int(len(x_va)),
        "best_epoch": best["epoch"],
        "best_val_loss": round(best["val_loss"], 5),
        "epochs_run": history[-1]["epoch"],
        "seconds": round(time.perf_counter() - started, 1),
        "history": history,
        **(extra or {}),
    }
    head.config.training = record
    return head, record


def train_from_dirs(directories: list[str | Path], out_dir: str | Path, config: TrainConfig) -> AcceptanceHead:
    """Load shards, train, save model.safetensors + config.json into `out_dir`."""
    hidden, features, p_acc, keys, summary = load_training_data(directories, config.features)
    sources = sorted({s for d in directories for s in read_manifest(d).get("sources", [])})
    extra = {
        "data": summary["data"],
        "data_hash": data_hash(directories),
        "prompts": summary["prompts"],
        "tokens": summary["tokens"],
        "sources": sources,
        "target_id": read_manifest(directories[0]).get("target_id"),
    }
    head, _ = train_head(
        hidden, p_acc, keys, config, draft_id=summary["draft_id"] or "", extra=extra, features=features
    )
    head.save(out_dir)
    log.info("saved head to %s", out_dir)
    return head
