"""Train the acceptance head on rounds logged by `heads gen-data`, then calibrate it.

Loss: soft-label binary cross-entropy with the exact labels a_s,
    l = -(a_s log sigma(z) + w_reject (1 - a_s) log(1 - sigma(z))),
averaged over candidates. With w_reject = 1 (the default) this is a proper scoring rule: the
minimiser is a_s itself, what the stop rule multiplies. w_reject > 1 (the paper's 6) biases
the output towards rejection; the calibration step below undoes whatever bias remains.

Calibration: after training, a Platt map sigmoid(scale z + bias) is fitted on the validation
candidates and stored in the head's config, so `accept_prob` is calibrated by construction.

Validation: a fixed fraction of *sequences* (neighbouring candidates are correlated) is held
out; the epoch with the lowest validation loss is kept, and training stops after `patience`
epochs without improvement. AdamW, linear warmup then cosine decay.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine.head import CANDIDATE_FEATURES, HEAD_TIMINGS, AcceptanceHead, HeadConfig
from heads.data import finished_shards, load_shards, read_manifest

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    timing: str = "before"  # which draft state the head reads (engine/head.py)
    depth: int = 3
    hidden_dropout: float = 0.0
    w_reject: float = 1.0
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 256
    max_epochs: int = 20
    warmup: float = 0.05  # share of all steps
    val_fraction: float = 0.1
    patience: int = 3
    seed: int = 0


def weighted_bce(logits: torch.Tensor, label: torch.Tensor, w_reject: float = 1.0) -> torch.Tensor:
    """Mean soft-label BCE on logits [N] with the reject class weighted by `w_reject` (see module doc)."""
    z = logits.float()
    logsig = torch.nn.functional.logsigmoid
    return -(label * logsig(z) + w_reject * (1 - label) * logsig(-z)).mean()


def data_hash(directories: list[str | Path]) -> str:
    """sha256 over the finished shard files, in order: ties a head to the exact data it saw."""
    h = hashlib.sha256()
    for directory in directories:
        for path in finished_shards(directory):
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
    return h.hexdigest()


def head_inputs(data: dict[str, torch.Tensor], timing: str) -> dict[str, torch.Tensor]:
    """The rows a head of `timing` learns from: its hidden state, features, label, sequence and round.

    "before" reads the state that produced q_s (every candidate); "after" the state of the
    forward on y_s, which is the next candidate's state in the same round (all but each round's last).
    """
    if timing not in HEAD_TIMINGS:
        raise ValueError(f"timing must be one of {HEAD_TIMINGS}")
    rows = torch.arange(len(data["accept_prob"]))
    hidden_rows = rows
    if timing == "after":
        rows = rows[data["has_next"].bool()]
        hidden_rows = rows + 1
    return {
        "hidden": data["hidden"][hidden_rows],
        "features": data["features"][rows].float(),
        "label": data["accept_prob"][rows].float(),
        "seq": data["seq"][rows].long(),
        "round": data["round"][rows],
        "position": data["position"][rows],
    }


def load_training_data(directories: list[str | Path], timing: str) -> tuple[dict[str, torch.Tensor], dict]:
    """`head_inputs` over every directory (sequence keys made dataset-wide) and a summary.

    Refuses evaluation-only data (HumanEval, the mixed set) and data from different drafts.
    """
    parts = []
    summary: dict = {"data": [], "prompts": 0, "tokens": 0, "draft_id": None, "hidden_size": None}
    for i, directory in enumerate(directories):
        manifest = read_manifest(directory)
        if manifest.get("eval_only"):
            raise ValueError(f"{directory} holds evaluation-only data (HumanEval or the mixed set); it must not be "
                             "trained on")
        for key in ("draft_id", "hidden_size"):
            value = manifest.get(key)
            if summary[key] is not None and value != summary[key]:
                raise ValueError(f"{directory}: {key} {value!r} differs from the other data ({summary[key]!r})")
            summary[key] = value
        inputs = head_inputs(load_shards(directory), timing)
        inputs["seq"] = inputs["seq"] + i * 1_000_000_000
        parts.append(inputs)
        summary["data"].append(str(directory))
        summary["prompts"] += sum(s["prompts"] for s in manifest["shards"])
        summary["tokens"] += len(inputs["label"])
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, summary


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
def head_logits(head: AcceptanceHead, hidden: torch.Tensor, features: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    return torch.cat([head(hidden[s : s + batch].float(), features[s : s + batch])
                      for s in range(0, len(hidden), batch)]) if len(hidden) else torch.empty(0)


def _standardise(head: AcceptanceHead, x: torch.Tensor, f: torch.Tensor) -> None:
    """Set the head's input statistics from the training inputs."""
    x = x.float()
    head.input_mean.copy_(x.mean(0))
    head.input_scale.copy_(1.0 / (x.std(0) + 1e-3))
    head.feature_mean.copy_(f.mean(0))
    head.feature_scale.copy_(1.0 / (f.std(0) + 1e-3))


def fit_platt(logits: torch.Tensor, label: torch.Tensor, steps: int = 200) -> dict:
    """Platt scaling: (scale, bias) minimising the soft-label BCE of sigmoid(scale z + bias)."""
    params = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    z, y = logits.double(), label.double()
    optimizer = torch.optim.LBFGS([params], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = weighted_bce(params[0] * z + params[1], y)
        loss.backward()
        return loss

    optimizer.step(closure)
    scale, bias = params.detach().tolist()
    return {"scale": round(scale, 6), "bias": round(bias, 6)}


def train_head(data: dict[str, torch.Tensor], config: TrainConfig, draft_id: str = "",
               extra: dict | None = None) -> tuple[AcceptanceHead, dict]:
    """Fit and calibrate a head on `head_inputs` rows; return it (best validation epoch) and its record."""
    torch.manual_seed(config.seed)
    hidden, features, label = data["hidden"], data["features"], data["label"]
    val = split_by_sequence(data["seq"], config.val_fraction, config.seed)
    x_tr, f_tr, y_tr = hidden[~val], features[~val], label[~val]
    x_va, f_va, y_va = hidden[val], features[val], label[val]
    if len(x_va) == 0:  # too little data to hold any out: validate on the training set
        x_va, f_va, y_va = x_tr, f_tr, y_tr
    max_position = int(features[:, CANDIDATE_FEATURES.index("position")].max()) if len(features) else 0
    head = AcceptanceHead(HeadConfig(hidden_size=hidden.shape[-1], depth=config.depth, timing=config.timing,
                                     draft_id=draft_id, max_position=max_position,
                                     hidden_dropout=config.hidden_dropout))
    _standardise(head, x_tr, f_tr)
    head.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(x_tr) / config.batch_size))
    total_steps = steps_per_epoch * config.max_epochs
    g = torch.Generator().manual_seed(config.seed)

    def val_loss() -> float:
        return float(weighted_bce(head_logits(head, x_va, f_va), y_va, config.w_reject))

    best = {"val_loss": val_loss(), "epoch": 0}
    best_state = {k: v.clone() for k, v in head.state_dict().items()}
    history = [{"epoch": 0, "val_loss": round(best["val_loss"], 5)}]
    log.info("training a %r head on %d candidates, validating on %d; initial val loss %.4f", config.timing,
             len(x_tr), len(x_va), best["val_loss"])
    step, started = 0, time.perf_counter()
    for epoch in range(1, config.max_epochs + 1):
        order = torch.randperm(len(x_tr), generator=g)
        running = 0.0
        for s in range(0, len(order), config.batch_size):
            idx = order[s : s + config.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = config.lr * lr_scale(step, total_steps, config.warmup)
            loss = weighted_bce(head(x_tr[idx].float(), f_tr[idx]), y_tr[idx], config.w_reject)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += float(loss.detach()) * len(idx)
            step += 1
        head.eval()
        loss_va = val_loss()
        head.train()
        history.append({"epoch": epoch, "train_loss": round(running / len(x_tr), 5), "val_loss": round(loss_va, 5)})
        log.info("epoch %d: train loss %.4f, val loss %.4f (%.0fs)", epoch, running / len(x_tr), loss_va,
                 time.perf_counter() - started)
        if loss_va < best["val_loss"] - 1e-5:
            best = {"val_loss": loss_va, "epoch": epoch}
            best_state = {k: v.clone() for k, v in head.state_dict().items()}
        elif epoch - best["epoch"] >= config.patience:
            log.info("early stop: no improvement for %d epochs", config.patience)
            break
    head.load_state_dict(best_state)
    head.eval()
    head.config.calibration = fit_platt(head_logits(head, x_va, f_va), y_va)
    log.info("calibration on the validation candidates: %s", head.config.calibration)
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
    """`specdecpp heads train`: load shards, train, calibrate, save model.safetensors + config.json
    into `out_dir`; print a summary."""
    data, summary = load_training_data(directories, config.timing)
    sources = sorted({s for d in directories for s in read_manifest(d).get("sources", [])})
    extra = {
        "data": summary["data"],
        "data_hash": data_hash(directories),
        "prompts": summary["prompts"],
        "tokens": summary["tokens"],
        "sources": sources,
        "target_id": read_manifest(directories[0]).get("target_id"),
    }
    head, _ = train_head(data, config, draft_id=summary["draft_id"] or "", extra=extra)
    head.save(out_dir)
    log.info("saved head to %s", out_dir)
    record = head.config.training
    print(
        f"{out_dir}: best epoch {record['best_epoch']}/{record['epochs_run']}, val loss {record['best_val_loss']:.4f} "
        f"({record['train_tokens']} train / {record['val_tokens']} val tokens)"
    )
    return head
