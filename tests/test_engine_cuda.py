"""The engine on a CUDA device: the losslessness checks again, with models, caches, RNGs and
the head on the GPU; with two GPUs, a layer-mapped target and a tensor-parallel one. Skipped where no
GPU is visible (CI has none); run it on a GPU host with `pytest tests/test_engine_cuda.py`.
"""

from __future__ import annotations

import copy

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


# ----- two GPUs: a layer-mapped target, and tensor parallelism ------------------------------------
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


@two_gpus
def test_layer_mapped_target_over_two_gpus_matches_one_gpu(tokenizer):
    """Embedding and first layer on GPU 0, the rest and the LM head on GPU 1: verification compares
    candidates and target probabilities on one device (engine/speculate.py), and the output equals the
    target on one GPU."""
    from accelerate import dispatch_model

    target = tiny_model(0, scale=8.0)
    draft = perturbed(target, 0.05, seed=1)
    reference = LLMEngine(copy.deepcopy(target).to(CUDA), copy.deepcopy(draft).to(CUDA), tokenizer,
                          heads={"default": random_head(target.config.hidden_size)})
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1,
                  "model.norm": 1, "lm_head": 1}
    mapped = LLMEngine(dispatch_model(target, device_map=device_map), draft.to(CUDA), tokenizer,
                       heads={"default": random_head(target.config.hidden_size)})
    assert mapped.target.lm_head_device != mapped.target.device
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    for spec in GREEDY_SPECS:
        out = mapped.generate("hello world", params, spec)
        assert out.token_ids == reference.generate("hello world", params, SpecConfig(policy="none")).token_ids
    sampled = SamplingParams(temperature=1.0, max_tokens=32, ignore_eos=True, seed=5)
    assert len(mapped.generate("hello world", sampled, SpecConfig(policy="constant", k=3)).token_ids) == 32


@two_gpus
def test_tensor_parallel_over_two_gpus_matches_one_gpu(tmp_path, tokenizer):
    """--tensor-parallel-size 2: rank 0 here, its follower on GPU 1, NCCL; greedy output equals one GPU's."""
    import torch.distributed as dist
    from live_server import save_tiny_pair

    from engine.config import EngineConfig
    from engine.factory import build_engine

    target = tiny_model(0, scale=8.0)
    paths = save_tiny_pair(tmp_path, target, perturbed(target, 0.05, seed=1), tokenizer, random_head(32))
    config = {"target": str(paths["target"]), "draft": str(paths["draft"]), "head": str(paths["head"]),
              "dtype": "fp32"}
    single = build_engine(EngineConfig(**config))
    split = build_engine(EngineConfig(**config, tensor_parallel_size=2))
    try:
        assert split.target.device == torch.device("cuda", 0)
        params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
        for spec in [SpecConfig(policy="none"), *GREEDY_SPECS]:
            assert split.generate("hello world", params, spec).token_ids == single.generate(
                "hello world", params, spec).token_ids
    finally:
        split.lockstep.close()
        dist.destroy_process_group()
