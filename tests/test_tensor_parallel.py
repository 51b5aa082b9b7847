"""The target split over two CPU ranks (gloo) gives the single-process output: greedy for every
policy, alone and batched; sampled for the same seed; with aborts and n choices. Rank 0 runs here,
in the test process, and starts its follower (engine/distributed.py); the caches are checked by two
ranks that run the same code (SPMD), since a fresh prefill of a sharded target takes both ranks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import fresh_prefill, make_tiny_pair, random_head, step_checking_caches
from live_server import save_tiny_pair
from test_engine_batching import MIXED, run_all
from tiny import char_tokenizer

from engine.config import EngineConfig
from engine.distributed import agreed_kv_budget, check_divides_heads, is_tensor_parallel, join_group
from engine.factory import assemble_engine, build_engine, load_models
from engine.loading.placement import Placement
from engine.params import SamplingParams, SpecConfig

pytestmark = [
    pytest.mark.timeout(600),
]
POLICIES = [
    SpecConfig(policy="none"),
    SpecConfig(policy="constant", k=3),
    SpecConfig(policy="heuristic", k=2, bounds=(1, 10)),
    SpecConfig(policy="confidence", p_min=0.5, bounds=(1, 8)),
    SpecConfig(policy="specdec++", threshold=0.3, bounds=(1, 10)),
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory) -> dict[str, Path]:
    target, draft = make_tiny_pair()
    return save_tiny_pair(tmp_path_factory.mktemp("tp"), target, draft, char_tokenizer(),
                          random_head(target.config.hidden_size))


def engine_config(paths: dict[str, Path], tensor_parallel_size: int, **extra) -> EngineConfig:
    return EngineConfig(target=str(paths["target"]), draft=str(paths["draft"]), head=str(paths["head"]),
                        dtype="fp32", tensor_parallel_size=tensor_parallel_size, **extra)


@pytest.fixture(scope="module")
def engines(pair_dirs):
    """(one process, rank 0 of two); the follower leaves and the group closes after the module.

    The split engine measures its draft's kernels ("auto") and its follower replays them; the single
    engine replays them too. Two measurements can choose differently (the int8 crossover is timed), and
    a sampled comparison then fails now and then on a draft that proposes other candidates."""
    split = build_engine(engine_config(pair_dirs, 2))
    config = engine_config(pair_dirs, 1)
    models = load_models(config, str(pair_dirs["target"]), str(pair_dirs["draft"]), str(pair_dirs["head"]),
                         Placement(draft_device="cpu", target_device="cpu"))
    single = assemble_engine(config, models, draft_kernels=split.draft.kernels)
    yield single, split
    split.lockstep.close()
    dist.destroy_process_group()


def test_the_target_is_sharded_and_the_draft_replicated(engines):
    _, split = engines
    assert is_tensor_parallel(split.target.model) and not is_tensor_parallel(split.draft.model)
    k_proj = split.target.model.model.layers[0].self_attn.k_proj
    assert type(k_proj) is torch.nn.Linear  # neither packed nor quantized: its weight is a shard
    assert k_proj.weight.to_local().shape[0] == 8  # 1 of the 2 KV heads (head size 8)


@pytest.mark.parametrize("spec", POLICIES, ids=lambda s: s.policy)
def test_greedy_identical_to_one_process(engines, spec):
    single, split = engines
    proposed = 0
    for prompt in ("hello world", "the quick brown fox"):
        out = split.generate(prompt, GREEDY, spec)
        assert out.token_ids == single.generate(prompt, GREEDY, spec).token_ids
        assert out.token_ids == single.generate(prompt, GREEDY, SpecConfig(policy="none")).token_ids
        proposed += out.stats["proposed_tokens"]
    assert (proposed > 0) == (spec.policy != "none")


def test_batched_greedy_identical_to_one_process(engines):
    single, split = engines
    requests = [(f"b{i}", prompt, GREEDY, spec) for i, (prompt, spec) in enumerate(MIXED)]
    assert run_all(split, requests) == run_all(single, requests)


@pytest.mark.parametrize("spec", [SpecConfig(policy="constant", k=4),
                                  SpecConfig(policy="specdec++", threshold=0.5, bounds=(1, 8))],
                         ids=lambda s: s.policy)
def test_sampled_identical_for_the_same_seed(engines, spec):
    single, split = engines
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=40, ignore_eos=True, seed=11)
    requests = [(f"s{i}", prompt, params.model_copy(update={"seed": 11 + i}), spec)
                for i, prompt in enumerate(("hello world", "lorem ipsum", "zz"))]
    assert run_all(split, requests) == run_all(single, requests)


def test_unseeded_requests_choices_and_aborts_keep_the_ranks_together(engines):
    """Rank 0 draws the seeds, so unseeded sampling cannot split the ranks; an abort mid-flight and n
    choices reach the follower in order. A divergence would hang (and time out) or differ from greedy."""
    _, split = engines
    sampled = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)
    split.add_request("u", "hello world", sampled, SpecConfig(policy="constant", k=3), n=2)
    split.add_request("gone", "the quick brown fox", sampled, SpecConfig(policy="specdec++", threshold=0.4))
    split.add_request("g", "hello world", GREEDY, SpecConfig(policy="constant", k=3))
    outputs: dict[str, list[int]] = {}
    for step in range(200):
        if step == 3:
            assert split.abort("gone") is not None
        for event in split.step():
            assert event.error is None, event.error
            outputs.setdefault(event.request_id, []).extend(event.token_ids)
        if not split.has_unfinished():
            break
    assert not split.has_unfinished()
    assert len(outputs["u.0"]) == len(outputs["u.1"]) == 24 and outputs["u.0"] != outputs["u.1"]
    assert outputs["g"] == split.generate("hello world", GREEDY, SpecConfig(policy="none")).token_ids


def test_a_size_that_does_not_divide_the_heads_is_refused(pair_dirs):
    from engine.loading.inventory import load_model_config

    config = load_model_config(str(pair_dirs["target"]))  # 4 attention heads, 2 KV heads
    check_divides_heads(config, 2)
    with pytest.raises(ValueError, match="must divide the target's 4 attention heads and 2 KV heads"):
        check_divides_heads(config, 4)
    with pytest.raises(ValueError, match="must divide"):
        build_engine(engine_config(pair_dirs, 3))  # refused before any rank starts


@pytest.mark.parametrize(("size", "extra"), [(2, {"target_devices": ["cuda:0"]}), (2, {"draft_device": "cpu"}),
                                            (2, {"target_quantization": "int8"}), (0, {})])
def test_flags_that_do_not_combine_with_tensor_parallelism(pair_dirs, size, extra):
    with pytest.raises(ValueError, match="tensor.parallel"):
        engine_config(pair_dirs, size, **extra)


# ----- past one node: torchrun ----------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_under_torchrun_equal_one_process(pair_dirs, tmp_path):
    """Two torchrun launchers (--nnodes 2, one rank each) on loopback: node 0's rank runs `specdecpp
    generate`, node 1's follows; the sampled completion equals the one-process engine's for the seed."""
    port = free_port()
    args = ["generate", "--json", "--target", str(pair_dirs["target"]), "--draft", str(pair_dirs["draft"]),
            "--head", str(pair_dirs["head"]), "--dtype", "fp32", "--tensor-parallel-size", "2", "--policy",
            "constant", "--k", "3", "--temperature", "1", "--seed", "3", "--max-tokens", "20", "--draft-quantization",
            "none", "hello world"]  # a draft kernel choice measured by neither (see `engines`)
    repo = str(Path(__file__).parents[1])
    path = os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank",
         str(node), "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "engine.distributed", *args],
        env=env, stdout=subprocess.PIPE, stderr=(tmp_path / f"node{node}.log").open("w"), text=True)
        for node in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    logs = "\n".join((tmp_path / f"node{node}.log").read_text()[-3000:] for node in (0, 1))
    assert [node.returncode for node in nodes] == [0, 0], logs
    assert outputs[1] == ""  # the follower prints nothing
    single = build_engine(engine_config(pair_dirs, 1, draft_quantization="none"))
    expected = single.generate("hello world", SamplingParams(temperature=1.0, seed=3, max_tokens=20),
                               SpecConfig(policy="constant", k=3))
    assert json.loads(outputs[0])["token_ids"] == expected.token_ids


# ----- caches, on two ranks that run the same code ----------------------------------------------
def check_caches_on_rank(rank: int, port: int, paths: dict[str, Path]) -> None:
    """One rank: join, load its shard and a draft replica, and after every round compare both caches
    with a fresh prefill (a sharded forward: both ranks run it, in the same order)."""
    torch.set_num_threads(1)
    plan_group = join_group({"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                             "MASTER_PORT": str(port)})
    # Each GPU's own KV room (here made up): every rank takes the smallest, or none when no rank has one.
    room = Placement("cpu", "cpu", kv_cache_tokens=1000 + 500 * rank)
    assert agreed_kv_budget(room, plan_group).kv_cache_tokens == 1000
    assert agreed_kv_budget(Placement("cpu", "cpu"), plan_group).kv_cache_tokens is None
    config = engine_config(paths, 2, draft_quantization="none", cpu_fp32_gemm="off")
    models = load_models(config, str(paths["target"]), str(paths["draft"]), str(paths["head"]),
                         Placement(draft_device="cpu", target_device="cpu", tensor_parallel_size=2))
    engine = assemble_engine(config, models)
    rounds = rejected = 0
    for temperature in (0.0, 1.0):
        params = SamplingParams(temperature=temperature, seed=7, max_tokens=30, ignore_eos=True)
        engine.add_request(f"r{temperature}", "hello world", params, SpecConfig(policy="constant", k=4))
        seen, rejections = step_checking_caches(engine, engine.requests[f"r{temperature}"])
        rounds, rejected = rounds + seen, rejected + rejections
    assert rounds > 6 and rejected > 0  # rollback really happened
    assert fresh_prefill(engine.target, [1, 2]).layers[0].keys.shape[1] == 1  # this rank's share of the 2 KV heads
    dist.destroy_process_group()


def test_caches_equal_a_fresh_prefill_on_every_rank(pair_dirs):
    mp.spawn(check_caches_on_rank, args=(free_port(), pair_dirs), nprocs=2)  # raises if a rank fails
