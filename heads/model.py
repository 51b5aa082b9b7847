"""The acceptance prediction head and its safetensors + JSON storage.

Architecture (paper's best): `depth` independent residual blocks x + SiLU(W x), then
Linear(hidden, 2). Class 1 is "accepted"; `accept_prob` returns P(accepted).
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


@dataclass
class HeadConfig:
    hidden_size: int
    depth: int = 3
    draft_id: str = ""  # identity of the draft model the head was trained on
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
        self.config = config
        self.blocks = nn.ModuleList(ResidualBlock(config.hidden_size) for _ in range(config.depth))
        self.out = nn.Linear(config.hidden_size, 2)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> logits [..., 2] (index 1: accepted)."""
        x = hidden.to(self.out.weight.dtype)
        for block in self.blocks:
            x = block(x)
        return self.out(x)

    @torch.inference_mode()
    def accept_prob(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.forward(hidden).float().softmax(-1)[..., 1]

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
