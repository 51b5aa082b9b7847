"""The placement planner on fake GPU inventories: pure decisions, no CUDA needed."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from tiny import write_tiny_gguf
from transformers import LlamaConfig

from engine.config import EngineConfig
from engine.loading.inventory import footprint, kv_bytes_per_token, load_model_config, meta_model, plan_from_config
from engine.loading.placement import (
    Footprint,
    GiB,
    GpuInfo,
    InsufficientMemoryError,
    PlacementError,
    plan_placement,
    plan_tensor_parallel,
    shard_device_map,
)


def gpus(n: int, gib: int = 80, used_gib: float = 0.0) -> list[GpuInfo]:
    return [GpuInfo(i, gib * GiB, int((gib - used_gib) * GiB), "fake") for i in range(n)]


def test_no_gpu_puts_everything_on_cpu():
    p = plan_placement([], target=3 * GiB, draft=1 * GiB, cpu_bytes=24 * GiB)
    assert (p.draft_device, p.target_device, p.target_device_map) == ("cpu", "cpu", None)


def test_no_gpu_and_too_little_ram_fails_with_sizes():
    with pytest.raises(InsufficientMemoryError, match=r"target.*needs 20\.0 GiB.*cpu"):
        plan_placement([], target=20 * GiB, draft=1 * GiB, cpu_bytes=16 * GiB)


def test_cpu_checks_weights_and_notes_a_cache_that_may_not_fit():
    # Host RAM: the weights must fit; a full-length KV cache that might not is only noted.
    p = plan_placement([], target=Footprint(10 * GiB, 8 * GiB), draft=Footprint(2 * GiB, GiB), cpu_bytes=16 * GiB)
    assert p.target_device == "cpu"
    assert any("target: a full-length KV cache (8.0 GiB)" in n for n in p.notes)
    with pytest.raises(InsufficientMemoryError, match=r"draft.*need 20\.0 GiB of weights"):
        plan_placement([], target=Footprint(GiB), draft=Footprint(20 * GiB, GiB), cpu_bytes=16 * GiB)


def test_one_gpu_holds_both():
    p = plan_placement(gpus(1), target=Footprint(30 * GiB, 2 * GiB), draft=Footprint(4 * GiB, GiB))
    assert (p.draft_device, p.target_device) == ("cuda:0", "cuda:0")


def test_one_gpu_too_small_for_both_fails_before_loading():
    # 24 GiB card, 5% reserved: 22.8 usable; the draft takes 5, the target needs 18.
    with pytest.raises(InsufficientMemoryError, match="not enough memory for the target") as err:
        plan_placement(gpus(1, gib=24), target=Footprint(17 * GiB, GiB), draft=Footprint(4 * GiB, GiB))
    assert "cuda:0" in str(err.value) and "18.0 GiB" in str(err.value)


def test_two_gpus_draft_on_0_target_alone_on_1_when_it_fits():
    p = plan_placement(gpus(2), target=Footprint(60 * GiB, GiB), draft=Footprint(14 * GiB, GiB))
    assert (p.draft_device, p.target_device, p.target_max_memory) == ("cuda:0", "cuda:1", None)


def test_four_gpus_shard_target_over_the_others_only():
    target = Footprint(130 * GiB, 2 * GiB)
    p = plan_placement(gpus(4), target=target, draft=Footprint(14 * GiB, GiB))
    assert p.draft_device == "cuda:0"
    assert p.target_device is None and p.target_device_map == "auto"
    assert sorted(p.target_max_memory) == [1, 2, 3]
    # Budgets leave room for the KV cache next to the weights and never exceed a card.
    usable = 80 * GiB - int(0.05 * 80 * GiB)
    assert all(b < usable for b in p.target_max_memory.values())
    assert sum(p.target_max_memory.values()) >= target.weight_bytes


def test_paper_pair_on_two_a100s_shares_gpu0_with_the_draft():
    # Llama-2 70B + 7B in bf16 on 2 x 80 GB: the target does not fit on GPU 1 alone.
    target = Footprint(int(137.95e9), int(1.34e9))
    draft = Footprint(int(13.48e9), int(0.6e9))
    p = plan_placement(gpus(2, gib=80), target=target, draft=draft)
    assert p.draft_device == "cuda:0"
    assert sorted(p.target_max_memory) == [0, 1]
    # GPU 0's budget is what the draft leaves.
    assert p.target_max_memory[0] < p.target_max_memory[1]
    assert any("adding cuda:0" in n for n in p.notes)


def test_not_enough_memory_over_all_gpus_lists_devices():
    with pytest.raises(InsufficientMemoryError) as err:
        plan_placement(gpus(2, gib=40), target=Footprint(130 * GiB), draft=Footprint(14 * GiB))
    msg = str(err.value)
    assert "130.0 GiB" in msg and "cuda:0" in msg and "cuda:1" in msg and "--target-devices" in msg


def test_busy_gpu_counts_only_free_memory():
    busy = [GpuInfo(0, 80 * GiB, 80 * GiB), GpuInfo(1, 80 * GiB, 10 * GiB)]
    with pytest.raises(InsufficientMemoryError, match="cuda:1"):
        plan_placement(busy, target=Footprint(20 * GiB), draft=Footprint(2 * GiB), target_devices=["cuda:1"])


def test_draft_too_big_for_its_device():
    with pytest.raises(InsufficientMemoryError, match="draft and head on cuda:0"):
        plan_placement(gpus(2, gib=16), target=Footprint(GiB), draft=Footprint(20 * GiB))


def test_explicit_devices_are_honoured():
    p = plan_placement(
        gpus(4), target=Footprint(100 * GiB), draft=Footprint(GiB), draft_device="3", target_devices=["cuda:0", "1"]
    )
    assert p.draft_device == "cuda:3"
    assert sorted(p.target_max_memory) == [0, 1]
    p = plan_placement(gpus(3), target=Footprint(GiB), draft=None, draft_device="cpu")
    assert sorted(p.target_max_memory) == [0, 1, 2]  # no draft: the target takes every GPU
    p = plan_placement(gpus(2), target=Footprint(GiB), draft=Footprint(GiB), target_devices=["cuda:0"])
    assert (p.draft_device, p.target_device) == ("cuda:0", "cuda:0")


def test_explicit_device_sharing_with_draft_accounts_for_it():
    # cuda:0 alone would hold the target (70 of 76 usable), but not next to a 10 GiB draft.
    with pytest.raises(InsufficientMemoryError, match="draft's share"):
        plan_placement(gpus(2), target=Footprint(70 * GiB), draft=Footprint(10 * GiB), target_devices=["cuda:0"])


def test_no_draft_uses_every_gpu_for_the_target():
    p = plan_placement(gpus(3), target=Footprint(150 * GiB), draft=None)
    assert sorted(p.target_max_memory) == [0, 1, 2]


def test_draft_and_target_on_different_device_types():
    """Each side samples with a generator on its own device, so a CPU draft may feed GPU targets."""
    p = plan_placement(gpus(2), target=GiB, draft=GiB, draft_device="cpu")
    assert p.draft_device == "cpu" and p.target_device != "cpu"
    p = plan_placement(gpus(1), target=GiB, draft=GiB, target_devices=["cpu"])
    assert p.target_device == "cpu"


def test_bad_device_requests():
    with pytest.raises(PlacementError, match="visible GPUs are: cuda:0, cuda:1"):
        plan_placement(gpus(2), target=GiB, draft=GiB, target_devices=["cuda:5"])
    with pytest.raises(PlacementError, match="none"):
        plan_placement([], target=GiB, draft=GiB, draft_device="cuda")
    with pytest.raises(PlacementError, match="cannot mix cpu"):
        plan_placement(gpus(2), target=GiB, draft=GiB, target_devices=["cpu", "cuda:1"])
    with pytest.raises(PlacementError, match="unknown device"):
        plan_placement(gpus(2), target=GiB, draft=GiB, draft_device="tpu")


def tiny_llama(layers: int = 8) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )


def test_footprint_counts_parameters_and_kv():
    config = tiny_llama()
    model = meta_model(config, torch.bfloat16)
    fp = footprint(model, max_model_len=1024)
    params = sum(p.numel() for p in model.parameters())
    assert fp.weight_bytes == 2 * params
    # K and V, 8 layers, 2 KV heads of 32 dims, bf16, 1024 tokens.
    assert kv_bytes_per_token(config, 2) == 2 * 8 * 2 * 32 * 2
    assert fp.extra_bytes == 1024 * kv_bytes_per_token(config, 2)
    assert footprint(model, max_model_len=None).extra_bytes == 2048 * kv_bytes_per_token(config, 2)


def test_shard_device_map_uses_only_the_planned_gpus():
    model = meta_model(tiny_llama(layers=16), torch.float32)
    fp = footprint(model, max_model_len=256)
    # Three cards, each holding 3/4 of the target: it needs both cards besides the draft's.
    card = int(fp.total * 0.75 / 0.95)
    inventory = [GpuInfo(i, card, card) for i in range(3)]
    p = plan_placement(inventory, target=fp, draft=Footprint(card // 4))
    assert sorted(p.target_max_memory) == [1, 2]
    device_map = shard_device_map(model, p.target_max_memory)
    used = Counter(device_map.values())
    assert set(used) == {1, 2}  # nothing on the draft's GPU, nothing spilled to cpu/disk
    assert device_map["model.embed_tokens"] == 1 and device_map["lm_head"] == 2


def test_shard_device_map_refuses_to_spill():
    model = meta_model(tiny_llama(), torch.float32)
    weights = footprint(model, max_model_len=1).weight_bytes
    with pytest.raises(InsufficientMemoryError, match="do not fit on GPUs"):
        shard_device_map(model, {0: weights // 4, 1: weights // 4})


def test_plan_from_config_on_this_machine(tmp_path):

    # A model directory with only its config: sizes come from the config, nothing is loaded.
    (tmp_path / "config.json").write_text(json.dumps(tiny_llama().to_dict()))
    p = plan_from_config(EngineConfig(target=str(tmp_path), draft=str(tmp_path)), str(tmp_path), str(tmp_path))
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert p.draft_device == expected
    assert any("draft + head" in n for n in p.notes)
    p = plan_from_config(EngineConfig(target_devices=["cpu"], draft_device="cpu"), str(tmp_path), None)
    assert (p.draft_device, p.target_device) == ("cpu", "cpu")


def test_shard_device_map_fills_in_order_when_the_last_gpu_is_the_smallest():
    # Balanced caps GPU 0 near half the model, so a small last GPU would overflow; in-order fill fits.
    model = meta_model(tiny_llama(layers=16), torch.float32)
    weights = footprint(model, max_model_len=1).weight_bytes
    device_map = shard_device_map(model, {0: int(weights * 0.8), 1: int(weights * 0.35)})
    assert set(device_map.values()) == {0, 1}
    assert device_map["model.embed_tokens"] == 0 and device_map["lm_head"] == 1


def test_footprint_of_a_gguf_file_matches_its_model(tmp_path):
    # A quantized GGUF is sized as the dequantized model the loader builds: parameters x --dtype bytes.
    path = tmp_path / "tiny.gguf"
    model = write_tiny_gguf(path)
    fp = footprint(meta_model(load_model_config(str(path)), torch.bfloat16), max_model_len=100)
    assert fp.weight_bytes == 2 * sum(p.numel() for p in model.parameters())
    assert fp.extra_bytes == 100 * kv_bytes_per_token(model.config, 2)


# ----- tensor parallelism and the KV budget ----------------------------------------------------
CONTEXT = 32768
# Llama-3-70B-like in bf16: 80 layers, 8 KV heads of 128 dims; a 1B-like draft: 16 layers, 8 KV heads of 64.
TARGET_70B = Footprint(int(141e9), 2 * 80 * 8 * 128 * 2 * CONTEXT, 2 * 80 * 8 * 128 * 2, CONTEXT)
DRAFT_1B = Footprint(int(2.5e9), 2 * 16 * 8 * 64 * 2 * CONTEXT + 10 * 2**20, 2 * 16 * 8 * 64 * 2, CONTEXT)


@pytest.mark.parametrize("n", [4, 8])
def test_tensor_parallel_70b_sizes_a_quarter_or_an_eighth_per_gpu(n):
    inventory = gpus(n)
    p = plan_tensor_parallel(n, inventory[0], TARGET_70B, DRAFT_1B, n)
    assert (p.target_device, p.draft_device, p.tensor_parallel_size) == ("cuda:0", "cuda:0", n)
    usable = 0.95 * 80 * GiB
    static = TARGET_70B.weight_bytes / n + DRAFT_1B.static_bytes
    per_token = TARGET_70B.kv_bytes_per_token / n + DRAFT_1B.kv_bytes_per_token
    assert p.kv_cache_tokens == pytest.approx((usable - static) / per_token, rel=1e-3)
    assert p.kv_cache_tokens > CONTEXT
    assert plan_tensor_parallel(n, inventory[n - 1], TARGET_70B, DRAFT_1B, n).draft_device == f"cuda:{n - 1}"


def test_tensor_parallel_kv_budget_is_each_gpus_own():
    busy = GpuInfo(2, 80 * GiB, 60 * GiB, "busy")  # the ranks then agree on the smallest (engine/distributed.py)
    assert plan_tensor_parallel(4, busy, TARGET_70B, DRAFT_1B, 4).kv_cache_tokens < plan_tensor_parallel(
        4, gpus(4)[2], TARGET_70B, DRAFT_1B, 4).kv_cache_tokens


def test_tensor_parallel_refusals():
    with pytest.raises(PlacementError, match="needs 4 GPUs on each node; 2 visible"):
        plan_tensor_parallel(2, gpus(2)[0], TARGET_70B, DRAFT_1B, 4)
    with pytest.raises(InsufficientMemoryError, match="each needs"):
        plan_tensor_parallel(2, gpus(2, gib=40)[0], TARGET_70B, DRAFT_1B, 2)
    with pytest.raises(InsufficientMemoryError, match="host memory"):
        plan_tensor_parallel(0, None, TARGET_70B, DRAFT_1B, 2, cpu_bytes=64 * GiB)
    p = plan_tensor_parallel(0, None, TARGET_70B, DRAFT_1B, 2, cpu_bytes=512 * GiB)
    assert (p.target_device, p.kv_cache_tokens) == ("cpu", None)  # host RAM: the flag's budget


def test_one_gpu_kv_budget_counts_both_caches():
    target = Footprint(30 * GiB, 1000 * 1024, 1024, 1000)
    draft = Footprint(4 * GiB, 1000 * 256, 256, 1000)
    p = plan_placement(gpus(1), target, draft)
    assert p.kv_cache_tokens == int(0.95 * 80 * GiB - 34 * GiB) // (1024 + 256)


def test_layer_map_kv_budget_pools_the_target_gpus():
    target = Footprint(130 * GiB, 1000 * 4096, 4096, 1000)
    p = plan_placement(gpus(3), target, Footprint(GiB, 1000 * 64, 64, 1000))
    assert p.target_device is None
    usable = 2 * int(0.95 * 80 * GiB)  # GPUs 1 and 2; the draft has GPU 0, whose cache holds more tokens
    assert p.kv_cache_tokens == (usable - 130 * GiB) // 4096


def test_the_scheduler_takes_the_planned_kv_budget():
    from engine.factory import with_planned_kv_budget
    from engine.loading.placement import Placement

    config = EngineConfig()
    lowered = with_planned_kv_budget(config, Placement("cuda:0", "cuda:0", kv_cache_tokens=5000))
    assert lowered.scheduler.kv_cache_tokens == 5000
    assert with_planned_kv_budget(config, Placement("cpu", "cpu")) is config
    roomy = Placement("cuda:0", "cuda:0", kv_cache_tokens=10**9)
    assert with_planned_kv_budget(config, roomy).scheduler.kv_cache_tokens == config.scheduler.kv_cache_tokens
