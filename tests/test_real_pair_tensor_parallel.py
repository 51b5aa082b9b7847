"""The real default pair with the target over two CPU ranks (--tensor-parallel-size 2, gloo): greedy output
equals the single-process target alone, for the target alone, constant k and the shipped head. fp32, as in
tests/test_real_pair.py: a split all-reduce sums in another order than one GEMM, and fp32 keeps such
rounding away from near-ties. Slow: it loads the pair in one process, frees it, then over two ranks.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
import torch.distributed as dist
from tiny import CHEAP_DRAFT_COSTS

from engine.config import EngineConfig
from engine.factory import build_engine
from engine.params import SamplingParams, SpecConfig
from specdecpp.model_store import ensure_default_pair

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(3600),
]
PROMPT = [{"role": "user", "content": "Write a Python function that reverses a string."}]


def test_two_ranks_reproduce_one_process(tmp_path):
    torch.set_num_threads(max((os.cpu_count() or 2) // 2, 1))  # rank 0's share; the follower reads OMP_NUM_THREADS
    target_dir, draft_dir = ensure_default_pair()
    costs = tmp_path / "costs.json"  # no start-up timing: the rows below use fixed stop rules, and timing the
    CHEAP_DRAFT_COSTS.save(costs)    # cost model in lockstep is covered on tiny models (test_tensor_parallel.py)
    config = {"target": str(target_dir), "draft": str(draft_dir), "dtype": "fp32", "cost_model": str(costs)}
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    single = build_engine(EngineConfig(**config))
    alone = single.generate(PROMPT, params, SpecConfig(policy="none"))
    del single  # the host holds one load of the pair at a time: the ranks' planner counts free memory
    gc.collect()
    split = build_engine(EngineConfig(**config, tensor_parallel_size=2))
    try:
        for spec in (SpecConfig(policy="none"), SpecConfig(policy="constant", k=4),
                     SpecConfig(policy="specdec++", threshold=0.3)):
            out = split.generate(PROMPT, params, spec)
            assert out.token_ids == alone.token_ids, spec.policy
    finally:
        split.lockstep.close()
        dist.destroy_process_group()
        torch.set_num_threads(1)
