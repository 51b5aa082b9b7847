"""The acceptance prediction head and its safetensors + JSON storage.

Architecture (paper's best): `depth` independent residual blocks x + SiLU(W x), then
Linear(hidden, 2). Class 1 is "accepted"; `accept_prob` returns P(accepted).
Inputs are standardised with per-dimension statistics of the training data (buffers saved
with the weights), which keeps training stable at the draft's raw hidden-state scale.

Optionally (`features`), the head also sees the draft's own view of the token it judges,
`draft_stats`: its log-probability, the entropy and the log of the top probability of the
distribution it was sampled from (temperature 1, unfiltered). They enter through a second
linear map added to the logits. The hidden state at y_s describes the context after y_s;
these describe how sure the draft was of y_s itself, which the hidden state only hints at.
A head is only ever read from safetensors and a JSON config: never unpickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
DRAFT_FEATURES = ("log_draft_prob", "draft_entropy", "log_draft_max")


def draft_stats(logits: torch.Tensor, token: torch.Tensor) -> dict[str, torch.Tensor]:
    """The draft's view of `token` from the logits [..., V] it was sampled from: [...] each.

    Temperature 1 and no filtering, whatever the request's sampling, so a head sees the same
    quantities in training and in serving. One definition for data generation and the engine.
    """
    logp = logits.float().log_softmax(-1)
    return {
        "log_draft_prob": logp.gather(-1, token.unsqueeze(-1)).squeeze(-1),
        "draft_entropy": -(logp.exp() * logp.clamp_min(-1e4)).sum(-1),
        "log_draft_max": logp.max(-1).values,
    }


@dataclass
class HeadConfig:
    hidden_size: int
    depth: int = 3
    draft_id: str = ""  # identity of the draft model the head was trained on
    features: list[str] = field(default_factory=list)  # names from DRAFT_FEATURES; [] = hidden state only
    training: dict = field(default_factory=dict)


class ResidualBlock(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)  # starts as identity, as in Medusa/SpecDec++
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


class AcceptanceHead(nn.Module):
    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        unknown = set(config.features) - set(DRAFT_FEATURES)
        if unknown:
            raise ValueError(f"unknown head features {sorted(unknown)}; known: {', '.join(DRAFT_FEATURES)}")
        self.config = config
        h, f = config.hidden_size, len(config.features)
        self.register_buffer("input_mean", torch.zeros(h))
        self.register_buffer("input_scale", torch.ones(h))
        self.blocks = nn.ModuleList(ResidualBlock(h) for _ in range(config.depth))
        self.out = nn.Linear(h, 2)
        nn.init.zeros_(self.out.weight)  # starts as a constant predictor; training adds what the input tells
        if f:
            self.register_buffer("feature_mean", torch.zeros(f))
            self.register_buffer("feature_scale", torch.ones(f))
            self.feature_out = nn.Linear(f, 2)
            nn.init.zeros_(self.feature_out.weight)  # starts as the hidden-state-only head
            nn.init.zeros_(self.feature_out.bias)

    def feature_tensor(self, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        """[..., F] in the config's order, from a `draft_stats` dict."""
        return torch.stack([stats[name].float() for name in self.config.features], dim=-1)

    def forward(self, hidden: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [..., H] (and features [..., F] if the head uses them) -> logits [..., 2] (1: accepted)."""
        x = (hidden.to(self.out.weight.dtype) - self.input_mean) * self.input_scale
        for block in self.blocks:
            x = block(x)
        logits = self.out(x)
        if self.config.features:
            if features is None:
                raise ValueError(f"this head also needs the draft's {', '.join(self.config.features)}")
            f = (features.to(self.feature_out.weight.dtype) - self.feature_mean) * self.feature_scale
            logits = logits + self.feature_out(f)
        return logits

    @torch.inference_mode()
    def accept_prob(self, hidden: torch.Tensor, stats: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """P(accepted) [...] from hidden [..., H] and, for heads with features, `draft_stats(...)`."""
        features = self.feature_tensor(stats) if self.config.features and stats is not None else None
        return self.forward(hidden, features).float().softmax(-1)[..., 1]

    @property
    def uses_draft_stats(self) -> bool:
        return bool(self.config.features)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu().float() for k, v in self.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_NAME))
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")


class HeadMismatchError(ValueError):
    """The head was trained for a different draft model."""


def load_head(
    directory: str | Path,
    hidden_size: int | None = None,
    draft_id: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AcceptanceHead:
    """Load a head from `directory` (model.safetensors + config.json) and check it fits the draft."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{directory}: a head needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    raw = json.loads(config_path.read_text())
    config = HeadConfig(**{k: raw[k] for k in HeadConfig.__dataclass_fields__ if k in raw})
    if hidden_size is not None and config.hidden_size != hidden_size:
        raise HeadMismatchError(
            f"head {directory} expects hidden size {config.hidden_size}, the draft has {hidden_size}"
        )
    if draft_id and config.draft_id and config.draft_id != draft_id:
        raise HeadMismatchError(f"head {directory} was trained for draft {config.draft_id!r}, not {draft_id!r}")
    head = AcceptanceHead(config)
    head.load_state_dict(load_file(str(weights_path)))
    return head.to(device=device, dtype=dtype).eval()
