"""What this machine has and what the models need: the inputs of the placement planner.

`plan_from_config` gathers the real inventory (CUDA GPUs through torch, host memory through
psutil) and the footprints (parameter bytes of a meta-device model built from each config,
plus the KV cache of one full-length sequence, and its bytes per token), calls the pure planner in
`engine.loading.placement`, and for a sharded target turns the budgets into an explicit
accelerate device map limited to those GPUs.
"""

from __future__ import annotations

import logging
import os

import psutil

from engine.config import EngineConfig
from engine.loading.placement import (
    Footprint,
    GpuInfo,
    Placement,
    fmt_bytes,
    plan_placement,
    plan_tensor_parallel,
    shard_device_map,
)

log = logging.getLogger(__name__)

MAX_KV_TOKENS = 32768  # KV headroom covers one sequence of the context length, capped here
HEAD_DEPTH_ESTIMATE = 3  # residual blocks in the acceptance head (fp32), for its footprint


def gpu_inventory(indices: list[int] | None = None) -> list[GpuInfo]:
    """Visible CUDA GPUs (or those of `indices`) with their free and total memory (empty without CUDA).
    Probing a GPU opens a CUDA context on it: a tensor-parallel rank probes only its own."""
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()) if indices is None else indices:
        free, total = torch.cuda.mem_get_info(i)
        gpus.append(GpuInfo(index=i, total_bytes=total, free_bytes=free, name=torch.cuda.get_device_name(i)))
    return gpus


def available_memory_bytes() -> int:
    """Host memory that can be used without swapping (Linux: MemAvailable)."""
    return psutil.virtual_memory().available


def load_model_config(spec: str):
    """The model's transformers config from a directory, a .gguf file or a hub id."""
    from pathlib import Path

    from transformers import AutoConfig

    path = Path(spec)
    if path.suffix == ".gguf" and path.is_file():
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoConfig.from_pretrained(spec)


def meta_model(config, dtype):
    """The model built on the meta device: exact parameter shapes, no memory, no weights read."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def footprint(model, max_model_len: int | None, with_head: bool = False) -> Footprint:
    """Weights from the (meta) model's parameters; KV for one sequence; the head if the draft carries one."""
    dtype_bytes = next(model.parameters()).element_size()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    config = model.config
    context = max_model_len or min(getattr(config, "max_position_embeddings", 4096) or 4096, MAX_KV_TOKENS)
    per_token = kv_bytes_per_token(config, dtype_bytes)
    extra = per_token * context
    if with_head:
        h = config.get_text_config().hidden_size if hasattr(config, "get_text_config") else config.hidden_size
        extra += 4 * (HEAD_DEPTH_ESTIMATE * (h * h + h) + 2 * h + 2)
    return Footprint(weight_bytes=weights, extra_bytes=extra, kv_bytes_per_token=per_token, kv_tokens=context)


def _estimate(spec: str, dtype, max_model_len: int | None, with_head: bool):
    """(meta model, footprint), or (None, None) when the config cannot be read (memory not checked then)."""
    try:
        model = meta_model(load_model_config(spec), dtype)
        return model, footprint(model, max_model_len, with_head=with_head)
    except Exception as exc:  # noqa: BLE001 - an estimate must never block a load that might work
        log.warning("cannot estimate the size of %s (%s); its memory is not checked", spec, exc)
        return None, None


def plan_from_config(config: EngineConfig, target_spec: str, draft_spec: str | None) -> Placement:
    """The placement for this machine: real GPUs, real model sizes, the user's device flags."""
    from engine.loading.loader import parse_dtype

    dtype = parse_dtype(config.dtype)
    draft_dtype = parse_dtype(config.draft_dtype or config.dtype)
    target_meta, target_fp = _estimate(target_spec, dtype, config.max_model_len, with_head=False)
    draft_fp = None
    if draft_spec is not None:
        _, draft_fp = _estimate(draft_spec, draft_dtype, config.max_model_len, with_head=True)
        draft_fp = draft_fp or Footprint(0)
    if config.tensor_parallel_size > 1:
        return _plan_rank(config, target_fp or Footprint(0), draft_fp)
    gpus = gpu_inventory()
    for g in gpus:
        log.info("cuda:%d %s: %s free of %s", g.index, g.name, fmt_bytes(g.free_bytes), fmt_bytes(g.total_bytes))
    placement = plan_placement(
        gpus,
        target_fp or Footprint(0),
        draft_fp,
        draft_device=config.draft_device,
        target_devices=config.target_devices,
        cpu_bytes=available_memory_bytes(),
    )
    if placement.target_max_memory and target_meta is not None:
        placement.target_device_map = shard_device_map(target_meta, placement.target_max_memory)
    for note in placement.notes:
        log.info("placement: %s", note)
    return placement


def _plan_rank(config: EngineConfig, target: Footprint, draft: Footprint | None) -> Placement:
    """A tensor-parallel rank's placement: its own GPU (LOCAL_RANK), probed alone, or the CPU."""
    import torch

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpu = gpu_inventory([local_rank])[0] if local_rank < count else None
    placement = plan_tensor_parallel(count, gpu, target, draft, config.tensor_parallel_size,
                                     cpu_bytes=available_memory_bytes())
    for note in placement.notes:
        log.info("placement: %s", note)
    return placement
