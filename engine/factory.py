"""Build an `LLMEngine` from an `EngineConfig`: resolve defaults, place, load, check."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from engine.config import EngineConfig
from engine.costs import CostModel
from engine.head import AcceptanceHead, HeadMismatchError, load_head
from engine.llm_engine import DEFAULT_HEAD, LLMEngine
from engine.loading.kernels import KernelChoice
from engine.loading.loader import load_model, load_tokenizer, model_identity, parse_dtype
from engine.loading.placement import Placement
from engine.params import SpecConfig

log = logging.getLogger(__name__)
NO_MODEL = ("", "none")


def resolve_paths(config: EngineConfig) -> tuple[str, str | None, str | None]:
    """(target, draft, head) specs with the defaults filled in (pulling the default pair if needed)."""
    target, draft, head = config.target, config.draft, config.head
    if target is None:
        from specdecpp.model_store import ensure_default_pair

        default_target, default_draft = ensure_default_pair()
        target = str(default_target)
        if draft is None:
            draft = str(default_draft)
    if draft in NO_MODEL:
        draft = None
    if head is None and draft is not None:
        from heads.shipped import shipped_head_for

        found = shipped_head_for(model_identity(draft))
        head = str(found) if found else None
    if head in NO_MODEL:
        head = None
    return target, draft, head


def build_engine(config: EngineConfig) -> LLMEngine:
    """Resolve the model specs, place the models, load them and their heads, assemble the engine.

    With --tensor-parallel-size N > 1 this process becomes rank 0 of N (engine/distributed.py).
    What the load held and peaked at in host memory is logged and kept as `engine.load_memory`."""
    from engine.loading import memory

    rss_before = memory.rss_bytes()
    memory.reset_peak_rss()
    with memory.layer_by_layer_memory():
        if config.tensor_parallel_size > 1:
            from engine.distributed import build_rank_zero

            engine = build_rank_zero(config)
        else:
            target_spec, draft_spec, head_spec = resolve_paths(config)
            from engine.loading.inventory import plan_from_config

            placement = plan_from_config(config, target_spec, draft_spec)
            config = with_planned_kv_budget(config, placement)
            engine = assemble_engine(config, load_models(config, target_spec, draft_spec, head_spec, placement))
    models = {"target": engine.target.model, "draft": engine.draft.model if engine.draft is not None else None,
              **{f"head {name}": head for name, head in engine.heads.items()}}
    engine.load_memory = memory.load_memory(models, rss_before)
    log.info(memory.describe(engine.load_memory))
    return engine


def load_models(
    config: EngineConfig, target_spec: str, draft_spec: str | None, head_spec: str | None, placement: Placement
) -> dict:
    """The target, the draft, their tokenizers and the heads, loaded where `placement` puts them: the
    model arguments of LLMEngine."""
    dtype = parse_dtype(config.dtype)
    draft_dtype = parse_dtype(config.draft_dtype or config.dtype)  # both checked before anything loads
    log.info("loading target %s (%s) on %s", target_spec, config.dtype, placement.describe_target())
    target, tokenizer = _load_target(target_spec, dtype, placement)
    draft = draft_tokenizer = None
    heads: dict[str, AcceptanceHead] = {}
    if draft_spec is not None:
        log.info("loading draft %s on %s", draft_spec, placement.draft_device)
        draft = load_model(draft_spec, draft_dtype, device=placement.draft_device)
        draft_tokenizer = load_tokenizer(draft_spec)
        heads = _load_heads(config, head_spec, draft_spec, draft.config.hidden_size, placement.draft_device)
    return {"target": target, "draft": draft, "tokenizer": tokenizer, "draft_tokenizer": draft_tokenizer,
            "heads": heads}


def assemble_engine(
    config: EngineConfig, models: dict, draft_kernels: KernelChoice | None = None, measure_costs_now: bool = True,
    head_kernels: dict[str, str] | None = None,
) -> LLMEngine:
    """The engine over `load_models`' models. `draft_kernels` and `head_kernels` (each head's "none" or "w8a8"):
    kernel choices to replay instead of measuring them (a follower rank takes rank 0's). `measure_costs_now`
    False: a cost model to measure is left to `LLMEngine.start_self_tuning` (rank 0 of a tensor-parallel target)."""
    return LLMEngine(
        **models,
        max_model_len=config.max_model_len,
        default_spec=_default_spec(config.default_spec, DEFAULT_HEAD in models["heads"], models["draft"] is not None),
        scheduler_config=config.scheduler,
        cpu_fp32_gemm=config.cpu_fp32_gemm,
        cpu_row_padding=config.cpu_row_padding,
        draft_quantization=draft_kernels or config.draft_quantization,
        quantize_draft_lm_head=config.draft_lm_head_quantization,
        target_quantization=config.target_quantization,
        head_quantization=head_kernels if head_kernels is not None else config.head_quantization,
        costs=CostModel.load(config.cost_model) if config.cost_model else None,
        online_calibration=config.online_calibration,
        max_over_acceptance=config.max_over_acceptance,
        measure_costs_now=measure_costs_now,
    )


def with_planned_kv_budget(config: EngineConfig, placement: Placement) -> EngineConfig:
    """`config` with the scheduler's KV budget lowered to what the planner found room for, so
    admission cannot run a GPU out of memory."""
    planned = placement.kv_cache_tokens
    if planned is None or planned >= config.scheduler.kv_cache_tokens:
        return config
    log.info("KV budget: %d tokens (--kv-cache-tokens %d does not fit next to the weights)",
             planned, config.scheduler.kv_cache_tokens)
    return dataclasses.replace(config, scheduler=dataclasses.replace(config.scheduler, kv_cache_tokens=max(planned, 1)))


def _load_target(
    target_spec: str, dtype: torch.dtype, placement: Placement
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    target = load_model(
        target_spec,
        dtype,
        device=placement.target_device,
        device_map=placement.target_device_map,
        max_memory=placement.target_max_memory,
        tensor_parallel_size=placement.tensor_parallel_size,
    )
    return target, load_tokenizer(target_spec)


def _load_heads(
    config: EngineConfig, head_spec: str | None, draft_spec: str, hidden_size: int, device: str
) -> dict[str, AcceptanceHead]:
    """--head (named DEFAULT_HEAD) and the --extra-head ones, on the draft's device.

    A head the user asked for must load; a shipped one that does not fit the draft is skipped.
    """
    if any(name == DEFAULT_HEAD for name, _ in config.extra_heads):
        raise ValueError(f"--extra-head cannot be named {DEFAULT_HEAD!r}: that is --head")
    named = [(DEFAULT_HEAD, head_spec)] if head_spec is not None else []
    heads: dict[str, AcceptanceHead] = {}
    for name, directory in named + list(config.extra_heads):
        try:
            heads[name] = load_head(
                Path(directory), hidden_size=hidden_size, draft_id=model_identity(draft_spec), device=device
            )
        except HeadMismatchError as exc:
            if name != DEFAULT_HEAD or config.head is not None:
                raise  # a head the user asked for must load
            log.warning("the shipped head does not load (%s); serving without one", exc)
            continue
        log.info("acceptance head %r from %s (judges %s the draft's forward on a candidate)",
                 name, directory, heads[name].timing)
    return heads


def _default_spec(spec: SpecConfig, has_head: bool, has_draft: bool) -> SpecConfig:
    """The configured default spec, narrowed to what the loaded models can run."""
    runnable = spec.runnable(has_head, has_draft)
    if has_draft and runnable.policy != spec.policy:
        log.warning("no acceptance head: the default policy falls back to constant k=%d", spec.k)
    return runnable
