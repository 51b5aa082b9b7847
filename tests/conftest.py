"""Shared fixtures: tiny random target/draft pairs and heads, built in-process."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# Tiny models run fastest single-threaded (thread hand-offs dominate); tests on the real
# pair raise this again with `torch.set_num_threads(os.cpu_count())`.
torch.set_num_threads(1)

from tiny import char_tokenizer, tiny_model  # noqa: E402

from engine.head import AcceptanceHead, HeadConfig  # noqa: E402


def perturbed(model: torch.nn.Module, noise: float, seed: int) -> torch.nn.Module:
    """A copy of `model` with Gaussian noise on every weight: a draft that mostly agrees."""
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(noise * torch.randn(p.shape, generator=gen))
    return draft.eval()


def random_head(hidden: int, seed: int = 0, timing: str = "before") -> AcceptanceHead:
    """A head with random (non-identity) weights, so its stop decisions vary token to token."""
    torch.manual_seed(seed)
    head = AcceptanceHead(HeadConfig(hidden_size=hidden, depth=2, timing=timing, draft_id="tiny"))
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0.0, 0.6)
    return head.eval()


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="session")
def tiny_pair():
    """(target, draft): the draft is a noisy copy of the target, so acceptance is partial."""
    target = tiny_model(0, scale=8.0)
    return target, perturbed(target, 0.05, seed=1)
