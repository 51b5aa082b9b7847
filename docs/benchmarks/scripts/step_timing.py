"""One decode step as the scripts here time it: one token after a context of random tokens, logits
included, the cache cropped back after each call so that every call sees the same context."""

from __future__ import annotations

import time

import torch

from engine.runner import ModelRunner, crop_cache


def context_cache(runner: ModelRunner, ids: torch.Tensor) -> object:
    """A new cache of `runner` prefilled with `ids` [T]."""
    cache = runner.new_cache()
    runner.forward(ids.unsqueeze(0), cache)
    return cache


def timed_step(runner: ModelRunner, cache: object, token: torch.Tensor, context: int) -> float:
    """Seconds of one forward on `token` [1] after `context` cached tokens; the cache is cropped back."""
    t0 = time.perf_counter()
    runner.forward_batch([token], [cache], [1])
    elapsed = time.perf_counter() - t0
    crop_cache(cache, context)
    return elapsed
