"""The engine on a CUDA device: the losslessness checks again, with models, caches, RNGs and
the head on the GPU. Skipped where no GPU is visible (CI has none); run it on a GPU host with
`pytest tests/test_engine_cuda.py`.
"""

from __future__ import annotations

import pytest
import torch
from conftest import perturbed, random_head
from test_engine_batching import MIXED, run_all
from test_engine_distribution import (
    SAMPLES,
    T1,
    VOCAB,
    chi_square_pvalue,
    exact_two_token_distribution,
    sample_two_tokens,
)
from tiny import char_tokenizer, tiny_model

from engine.llm_engine import LLMEngine
from engine.params import SamplingParams, SpecConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = "cuda"
GREEDY_SPECS = [
    SpecConfig(policy="constant", k=3),
    SpecConfig(policy="heuristic", k=2, bounds=(1, 10)),
    SpecConfig(policy="confidence", p_min=0.5, bounds=(1, 8)),
    SpecConfig(policy="specdec++", threshold=0.3, bounds=(1, 10)),
    SpecConfig(policy="specdec++", threshold=0.6, bounds=(1, 12)),
]


@pytest.fixture(scope="module")
def cuda_engine(tokenizer):
    target = tiny_model(0, scale=8.0)
    draft = perturbed(target, 0.05, seed=1)
    head = random_head(target.config.hidden_size)
    return LLMEngine(target.to(CUDA), draft.to(CUDA), tokenizer, heads={"default": head})


def test_models_and_head_are_on_the_gpu(cuda_engine):
    assert cuda_engine.target.device.type == CUDA and cuda_engine.draft.device.type == CUDA
    assert next(cuda_engine.heads["default"].parameters()).device.type == CUDA
    # oneDNN packing is for CPU models only: CUDA models keep their nn.Linear layers.
    assert type(cuda_engine.target.lm_head) is torch.nn.Linear


@pytest.mark.parametrize("spec", GREEDY_SPECS, ids=lambda s: f"{s.policy}-{s.k}-{s.threshold}-{s.p_min}")
def test_greedy_identical_to_target_alone_on_cuda(cuda_engine, spec):
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    proposed = 0
    for prompt in ("hello world", "the quick brown fox", "a"):
        reference = cuda_engine.generate(prompt, params, SpecConfig(policy="none"))
        out = cuda_engine.generate(prompt, params, spec)
        assert out.token_ids == reference.token_ids
        proposed += out.stats["proposed_tokens"]
    assert proposed > 0


def test_batched_greedy_identical_to_alone_on_cuda(cuda_engine):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    requests = [(f"r{i}", prompt, params, spec) for i, (prompt, spec) in enumerate(MIXED)]
    together = run_all(cuda_engine, requests)
    for rid, prompt, _, spec in requests:
        assert together[rid] == cuda_engine.generate(prompt, params, spec).token_ids, rid


@pytest.fixture(scope="module")
def small_vocab_engine():
    tokenizer = char_tokenizer("abcde")
    target = tiny_model(10, vocab_size=VOCAB, hidden=16, layers=1, scale=10.0).to(CUDA)
    draft = tiny_model(11, vocab_size=VOCAB, hidden=16, layers=1, scale=10.0).to(CUDA)
    return LLMEngine(target, draft, tokenizer, heads={"default": random_head(16, seed=3)})


@pytest.mark.parametrize("spec", [SpecConfig(policy="constant", k=3),
                                  SpecConfig(policy="specdec++", threshold=0.4, bounds=(1, 6))],
                         ids=lambda s: s.policy)
def test_sampled_distribution_on_cuda(small_vocab_engine, spec):
    counts = sample_two_tokens(small_vocab_engine, T1, spec)
    expected = exact_two_token_distribution(small_vocab_engine, T1)
    assert chi_square_pvalue(counts, expected, SAMPLES) > 1e-3
