"""The acceptance prediction head, the candidate features it reads, and its safetensors + JSON storage.

A head estimates a_s = P(candidate y_s is accepted | every earlier candidate was), the factor
the SpecDec++ stop rule multiplies. It reads a draft hidden state and the draft's own view of
y_s (`candidate_features`), mixed inside the network: the features are projected into the
hidden space and added to the standardised hidden state before the residual blocks
(x + SiLU(W x), the paper's architecture), so the blocks can combine them.

`timing` says which hidden state:
- "before": the state that produced q_s (the draft's forward on y_{s-1}). The round's stop
  decision on y_s is then taken before the draft runs on y_s: a round that stops never pays
  a forward it does not use, and the first candidate is judged like every other.
- "after": the state of the draft's forward on y_s (the paper's reference timing). That
  forward is paid for, so a round stopped at y_s also submits y_{s+1}, sampled from it.

Probabilities: the network's logit goes through a Platt calibrator (`calibration`, fitted on
held-out data after training), so `accept_prob` is a probability the stop rule may multiply.
A head is only ever read from safetensors and a JSON config: never unpickled.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engine.loading.quantize import QuantizedLinear

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 2
HeadTiming = Literal["before", "after"]
HEAD_TIMINGS: tuple[str, ...] = ("before", "after")
# The draft's view of a candidate (temperature 1, unfiltered logits), its position and the request's sampling.
CANDIDATE_FEATURES = (
    "log_q", "entropy", "log_q_max", "margin", "is_argmax", "position", "temperature", "top_p",
)


def candidate_features(
    logits: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, temperature: torch.Tensor,
    top_p: torch.Tensor,
) -> torch.Tensor:
    """[B, F] in `CANDIDATE_FEATURES` order from the draft logits [B, V] each candidate was sampled from.

    The q-statistics use temperature 1 and no filtering whatever the request's sampling (that enters
    as its own features), so data generation and serving see the same quantities. One definition
    for both.
    """
    logp = logits.float().log_softmax(-1)
    top2 = logp.topk(2, dim=-1).values
    log_q = logp.gather(-1, tokens.view(-1, 1)).squeeze(-1)
    return torch.stack(
        [
            log_q,
            -(logp.exp() * logp.clamp_min(-1e4)).sum(-1),
            top2[:, 0],
            top2[:, 0].exp() - top2[:, 1].exp(),
            (log_q >= top2[:, 0]).float(),
            positions.float(),
            temperature.float(),
            top_p.float(),
        ],
        dim=-1,
    )


@dataclass
class HeadConfig:
    hidden_size: int
    depth: int = 3
    timing: HeadTiming = "before"
    draft_id: str = ""  # identity of the draft model the head was trained on
    features: list[str] = field(default_factory=lambda: list(CANDIDATE_FEATURES))
    calibration: dict = field(default_factory=lambda: {"scale": 1.0, "bias": 0.0})  # Platt: sigmoid(scale z + bias)
    max_position: int = 0  # the longest round position seen in training; later ones read as it (0: no limit)
    hidden_dropout: float = 0.0  # training only: dropout on the standardised hidden state (regularises its path)
    version: int = FORMAT_VERSION
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
        if config.timing not in HEAD_TIMINGS:
            raise ValueError(f"head timing must be one of {HEAD_TIMINGS}, not {config.timing!r}")
        if list(config.features) != list(CANDIDATE_FEATURES):
            raise ValueError(f"head features {config.features} differ from this version's {list(CANDIDATE_FEATURES)}")
        self.config = config
        h, f = config.hidden_size, len(config.features)
        self.register_buffer("input_mean", torch.zeros(h))
        self.register_buffer("input_scale", torch.ones(h))
        self.register_buffer("feature_mean", torch.zeros(f))
        self.register_buffer("feature_scale", torch.ones(f))
        self.feature_in = nn.Linear(f, h)
        self.hidden_dropout = nn.Dropout(config.hidden_dropout)
        self.blocks = nn.ModuleList(ResidualBlock(h) for _ in range(config.depth))
        self.out = nn.Linear(h, 1)

    @property
    def timing(self) -> str:
        return self.config.timing

    def forward(self, hidden: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """hidden [..., H], features [..., F] -> uncalibrated logit [...] of acceptance."""
        dtype = self.out.weight.dtype
        if self.config.max_position:  # positions past the training data's read as the last one seen
            at = CANDIDATE_FEATURES.index("position")
            features = features.clone()
            features[..., at] = features[..., at].clamp(max=self.config.max_position)
        x = self.hidden_dropout((hidden.to(dtype) - self.input_mean) * self.input_scale)
        x = x + self.feature_in((features.to(dtype) - self.feature_mean) * self.feature_scale)
        for block in self.blocks:
            x = block(x)
        return self.out(x).squeeze(-1)

    def calibrated(self, logit: torch.Tensor) -> torch.Tensor:
        cal = self.config.calibration
        return torch.sigmoid(logit.float() * cal["scale"] + cal["bias"])

    @torch.inference_mode()
    def accept_prob(self, hidden: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Calibrated P(accepted) [...]."""
        return self.calibrated(self.forward(hidden, features))

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu().float() for k, v in self.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_NAME))
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")


def w8a8_head(head: AcceptanceHead) -> AcceptanceHead:
    """A copy of a CPU head whose residual blocks hold int8 weights and quantize their activations per call (w8a8):
    a quarter of the bytes a judgement reads, and in a round they come from memory, a draft step having pushed
    them out of the cache. The small input and output layers stay as trained. As with a w8a8 draft, a row's result
    depends slightly on the other rows of its call."""
    quantized = copy.deepcopy(head)
    for block in quantized.blocks:
        block.linear = QuantizedLinear(block.linear, 8, activations=True)
    return quantized.eval()


class HeadMismatchError(ValueError):
    """The head was trained for a different draft model (or by an incompatible version)."""


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
    if raw.get("version") != FORMAT_VERSION:
        raise HeadMismatchError(
            f"head {directory} has format version {raw.get('version', 1)}; this engine reads version "
            f"{FORMAT_VERSION}: retrain it with `specdecpp heads train`"
        )
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
