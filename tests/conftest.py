"""Shared fixtures: tiny random target/draft pairs and heads, built in-process.

A fixture used by more than one test module lives here; test modules never import fixtures
from each other. An engine repacks its models in place (`ModelRunner` swaps `nn.Linear` for
oneDNN-packed layers on the CPU), so model fixtures are module-scoped: each test module gets
fresh, unmodified models whatever ran before it (within a module, an engine built on
`tiny_pair` packs those same models; `make_tiny_pair()` builds an untouched copy).
"""

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

from tiny import CHEAP_DRAFT_COSTS, char_tokenizer, tiny_model  # noqa: E402

from engine.head import AcceptanceHead, HeadConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402

DISTRIBUTION_VOCAB = 6  # the distribution tests' vocabulary: exact two-token distributions stay cheap


def fresh_prefill(runner, ids: list[int]):
    """A new cache of `runner` (a ModelRunner) after one forward over `ids`."""
    cache = runner.new_cache()
    runner.forward(torch.tensor([ids]), cache)
    return cache


def step_checking_caches(engine: LLMEngine, seq) -> tuple[int, int]:
    """Step `engine` until `seq` finishes, checking its caches after every round; returns the rounds and
    how many of them rejected a candidate (so a caller can assert that rollback really happened)."""
    rounds = rejected = 0
    while seq.request_id in engine.requests:
        engine.step()
        if seq.finished:
            break
        rounds += 1
        rejected += seq.stats.accepted_lengths[-1] < seq.stats.candidate_lengths[-1]
        assert_caches_equal_fresh_prefill(engine, seq)
    return rounds, rejected


def assert_caches_equal_fresh_prefill(engine: LLMEngine, seq) -> None:
    """After a round (its rollback included), `seq`'s target cache holds every token but the newest and its
    draft cache a prefix of the sequence (none before its deferred prefill), each equal to a fresh prefill of
    those tokens."""
    ids = seq.all_ids
    assert seq.target_kv.cached == len(ids) - 1 == seq.target_kv.cache.get_seq_length()
    runners = [(engine.target, seq.target_kv)]
    if engine.draft is not None and seq.draft_kv.cache is not None:
        assert seq.draft_kv.cached == seq.draft_kv.cache.get_seq_length() <= len(ids)
        runners.append((engine.draft, seq.draft_kv))
    for runner, kv in runners:
        reference = fresh_prefill(runner, ids[: kv.cached])
        for layer, fresh in zip(kv.cache.layers, reference.layers, strict=True):
            torch.testing.assert_close(layer.keys, fresh.keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(layer.values, fresh.values, atol=1e-5, rtol=1e-4)


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


def make_tiny_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(target, draft): the draft is a noisy copy of the target, so acceptance is partial."""
    target = tiny_model(0, scale=8.0)
    return target, perturbed(target, 0.05, seed=1)


@pytest.fixture(scope="module")
def tiny_pair():
    """`make_tiny_pair()`, fresh for each test module."""
    return make_tiny_pair()


@pytest.fixture(scope="module")
def distribution_engine():
    """Sharp 6-token target and draft with two heads, for the chi-square tests of the output distribution."""
    tokenizer = char_tokenizer("abcde")
    target = tiny_model(10, vocab_size=DISTRIBUTION_VOCAB, hidden=16, layers=1, scale=10.0)
    draft = tiny_model(11, vocab_size=DISTRIBUTION_VOCAB, hidden=16, layers=1, scale=10.0)
    heads = {"default": random_head(16, seed=3), "after": random_head(16, seed=4, timing="after")}
    return LLMEngine(target, draft, tokenizer, heads=heads, costs=CHEAP_DRAFT_COSTS)
