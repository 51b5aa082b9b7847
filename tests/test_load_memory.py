"""The memory record of a load: bytes each model holds (each storage once) and the peak of the load."""

from __future__ import annotations

import torch
from torch import nn

from engine.loading import memory
from engine.loading.quantize import QuantizedLinear


def test_held_bytes_count_a_tied_weight_once_and_every_copy_a_layer_keeps():
    tied = nn.Sequential(nn.Embedding(100, 16), nn.Linear(16, 100, bias=False))
    tied[1].weight = tied[0].weight
    assert memory.held_bytes(tied) == 100 * 16 * 4
    quantized = QuantizedLinear(nn.Linear(64, 32, bias=False).to(torch.bfloat16), 8)
    # int8 weight, a bf16 scale per row, and the dequantized bf16 copy the wide rows run on
    assert memory.held_bytes(quantized) >= 32 * 64 * (1 + 2) + 32 * 2
    assert memory.held_bytes(quantized, "meta") == 0


def test_the_peak_of_a_load_is_its_own_and_is_reported_against_the_held_bytes():
    before = memory.rss_bytes()
    assert memory.reset_peak_rss()  # Linux: VmHWM starts again from now
    transient = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB touched, then freed: a transient copy
    del transient
    model = nn.Linear(1024, 1024)  # 4 MiB held
    record = memory.load_memory({"target": model, "draft": None}, before)
    assert record["held_cpu_bytes"] == {"target": (1024 * 1024 + 1024) * 4}
    assert record["peak_rss_bytes"] - before >= 60 << 20  # the transient is in the peak
    assert record["peak_rise_over_held"] > 10
    assert "held target 0.00 GiB" in memory.describe(record)


def test_the_loader_reads_the_models_own_files_and_loads_what_transformers_loads(tmp_path):
    from tiny import tiny_model
    from transformers import AutoModelForCausalLM

    from engine.loading.loader import load_model, safetensors_files

    model = tiny_model(0)
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    model.save_pretrained(sharded, max_shard_size="20KB")
    model.save_pretrained(single)
    (single / "consolidated.safetensors").write_bytes((single / "model.safetensors").read_bytes())  # not read
    assert len(safetensors_files(str(sharded))) > 1 and safetensors_files(str(single)) == [single / "model.safetensors"]
    assert safetensors_files(str(tmp_path / "missing")) == []
    for path in (sharded, single):
        ours, theirs = load_model(str(path), torch.float32), AutoModelForCausalLM.from_pretrained(path)
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        assert all(torch.equal(ours.state_dict()[k], theirs.state_dict()[k]) for k in ours.state_dict())
        assert ours.config._name_or_path == str(path)
