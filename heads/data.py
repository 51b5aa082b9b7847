"""Training and evaluation data for the acceptance head, logged from the engine's own rounds.

The engine runs the training prompts with a long constant k (every candidate of every round is
verified), and its round recorder (`engine.speculate.RoundRecord`) gives, per candidate y_s:
- the draft hidden state that produced q_s (a "before" head's input; the state after the
  forward on y_s, an "after" head's input, is the next candidate's state in the same round),
- the candidate features (`engine.head.candidate_features`: the draft's view of y_s, s, the
  request's temperature and top-p),
- the exact label a_s = min(1, p_s(y_s) / q_s(y_s)) with p_s from the verification forward, in
  the very context the head judges at serving time (also after the round's first rejection),
- the overlap sum(min(p_s, q_s)), the expected acceptance of position s,
- the round's realized accepted count, which places its candidates in the generated text: the accepted
  ones and the first rejected one label text positions (the rest follow a token the text does not hold),
  which the offline evaluator's replay along the text reads (specdecpp/bench/text_replay.py).
Prompts cycle through several (temperature, top-p) settings, so one head serves them all.

Each shard is `shard-NNNNN.safetensors` (one row per candidate: hidden [N, H] in bf16,
features [N, F], accept_prob, overlap, position, round (dataset-wide id), seq (prompt index),
has_next (the next row is the same round's next candidate), round_accepted (the round's accepted count;
absent from data logged before it was kept)) plus `shard-NNNNN.json` (its
prompts and counts). `manifest.json` lists finished shards; a rerun with the same arguments
skips them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.config import EngineConfig, SchedulerConfig
from engine.factory import build_engine, resolve_paths
from engine.head import CANDIDATE_FEATURES
from engine.llm_engine import LLMEngine
from engine.loading.loader import model_identity, parse_dtype
from engine.params import SamplingParams, SpecConfig
from engine.speculate import RoundRecord
from specdecpp import datasets
from specdecpp.datasets import Prompt

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT_VERSION = 2
SAMPLING_CYCLE = ((1.0, 1.0), (1.0, 1.0), (0.0, 1.0), (0.7, 0.9))  # (temperature, top_p) by prompt index


@dataclass
class GenConfig:
    max_new_tokens: int = 128
    max_prompt_tokens: int = 384  # longer prompts (after the chat template) are skipped
    k: int = 8  # candidates per round: a long constant k labels every position a shorter rule could reach
    shard_prompts: int = 64
    sampling: tuple[tuple[float, float], ...] = SAMPLING_CYCLE
    seed: int = 0
    hidden_dtype: str = "bf16"


def prompts_hash(prompts: Sequence[Prompt]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([p.id, p.source, p.text]).encode())
    return h.hexdigest()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def records_to_rows(records: list[tuple[int, RoundRecord]], round_base: int, hidden_dtype: torch.dtype) -> dict:
    """Flat per-candidate tensors from (prompt index, round) pairs, rounds numbered from `round_base`."""
    if not records:
        return {}
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in (
        "hidden", "features", "accept_prob", "overlap", "position", "round", "seq", "has_next", "round_accepted")}
    for i, (seq_index, rec) in enumerate(records):
        k = len(rec.accept_prob)
        rows["hidden"].append(rec.states.to(hidden_dtype))
        rows["features"].append(rec.features.float())
        rows["accept_prob"].append(rec.accept_prob.float())
        rows["overlap"].append(rec.overlap.float())
        rows["position"].append(torch.arange(1, k + 1, dtype=torch.int32))
        rows["round"].append(torch.full((k,), round_base + i, dtype=torch.int64))
        rows["seq"].append(torch.full((k,), seq_index, dtype=torch.int32))
        rows["has_next"].append((torch.arange(k) < k - 1).to(torch.uint8))
        rows["round_accepted"].append(torch.full((k,), rec.accepted, dtype=torch.int16))
    return {name: torch.cat(parts).contiguous() for name, parts in rows.items()}


def run_prompts(
    engine: LLMEngine, prompts: list[tuple[int, list[int]]], config: GenConfig
) -> tuple[list[tuple[int, RoundRecord]], dict[int, int]]:
    """Run (prompt index, token ids) pairs through the engine with constant k, recording each verified round.

    The engine batches them as it serves (continuous batching, up to its `max_num_seqs`). A prompt's
    seed and sampling settings follow its index alone. Returns the (prompt index, round) pairs and
    the generated length per prompt index.
    """
    records: list[tuple[int, RoundRecord]] = []
    index_of: dict[str, int] = {}
    lengths: dict[int, int] = {}
    spec = SpecConfig(policy="constant", k=config.k, bounds=(1, max(config.k, 1)))
    for index, ids in prompts:
        temperature, top_p = config.sampling[index % len(config.sampling)]
        params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=config.max_new_tokens,
                                seed=config.seed * 1_000_003 + index)
        request_id = f"gen-{index}"
        index_of[request_id] = index
        engine.add_request(request_id, ids, params, spec)
    engine.recorder = lambda rec: records.append((index_of[rec.request_id], rec))
    try:
        started, last_log = time.perf_counter(), time.perf_counter()
        while engine.has_unfinished():
            for event in engine.step():
                if event.error:
                    raise RuntimeError(f"{event.request_id}: {event.error}")
                if event.finished:
                    lengths[index_of[event.request_id]] = event.stats.generated_tokens
            if time.perf_counter() - last_log > 30:
                last_log = time.perf_counter()
                n = sum(len(r.accept_prob) for _, r in records)
                log.info("  %d/%d prompts finished, %d candidates, %.1f candidates/s", len(lengths),
                         len(prompts), n, n / (last_log - started))
    finally:
        engine.recorder = None
    return records, lengths


# ----- shards and manifest ------------------------------------------------------------------
def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {MANIFEST}; generate data with `specdecpp heads gen-data`")
    return json.loads(path.read_text())


def finished_shards(directory: str | Path) -> list[Path]:
    """The safetensors files of the shards the manifest lists as finished."""
    directory = Path(directory)
    return [directory / f"{s['name']}.safetensors" for s in read_manifest(directory)["shards"]]


def load_shards(directory: str | Path) -> dict[str, torch.Tensor]:
    """All finished shards of a data directory, concatenated; `seq` gets a dataset-wide index. A column
    some shards lack (one added since they were logged) is left out."""
    parts = [load_file(str(path)) for path in finished_shards(directory)]
    if not parts:
        raise ValueError(f"{directory}: no finished shards")
    return concat_columns(parts)


def concat_columns(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Row-wise concatenation of the columns every part has."""
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0] if all(k in p for p in parts)}


def generate_dataset(
    engine: LLMEngine,
    prompts: Sequence[Prompt],
    out_dir: str | Path,
    config: GenConfig,
    description: dict | None = None,
    deadline: float | None = None,
) -> dict:
    """Write shards for `prompts` into `out_dir`, skipping shards already finished; return the manifest.

    `deadline` (a `time.time()`): start no shard after it; a later run with the same arguments resumes.

    `engine` needs a draft; its scheduler's `max_num_seqs` sets how many prompts share a round.
    `description` (source, draft/target identities, ...) is recorded in the manifest.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if engine.draft is None:
        raise ValueError("generating head data needs a draft model")
    header = {
        "version": FORMAT_VERSION,
        "config": asdict(config),
        "prompts_hash": prompts_hash(prompts),
        "num_prompts": len(prompts),
        "sources": sorted({p.source for p in prompts}),
        "eval_only": any(p.source in datasets.EVAL_ONLY_SOURCES for p in prompts),
        "hidden_size": engine.draft.hidden_size,
        "features": list(CANDIDATE_FEATURES),
        **(description or {}),
    }
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        old = {k: manifest.get(k) for k in header}
        header = json.loads(json.dumps(header))  # as it reads back from the manifest (tuples become lists)
        if old != header:
            changed = sorted(k for k in header if old.get(k) != header[k])
            raise ValueError(f"{out} holds data made with other arguments ({', '.join(changed)}); use another --out")
    else:
        manifest = {**header, "shards": []}
        _write_json(manifest_path, manifest)
    done = {s["name"] for s in manifest["shards"]}
    num_shards = (len(prompts) + config.shard_prompts - 1) // config.shard_prompts
    todo = [i for i in range(num_shards) if shard_name(i) not in done]
    if len(todo) < num_shards:
        log.info("%s: %d of %d shards already finished, resuming", out, num_shards - len(todo), num_shards)
    started, prompts_done = time.perf_counter(), 0
    prompts_todo = sum(len(prompts[i * config.shard_prompts : (i + 1) * config.shard_prompts]) for i in todo)
    for index in todo:
        if deadline is not None and time.time() > deadline:
            log.info("deadline reached: stopping before shard %d; rerun the same command to resume", index + 1)
            break
        shard_prompts = prompts[index * config.shard_prompts : (index + 1) * config.shard_prompts]
        tensors, meta = _make_shard(engine, shard_prompts, index, config)
        name = shard_name(index)
        tmp = out / f"{name}.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"format": "specdecpp-head-data", "version": str(FORMAT_VERSION)})
        os.replace(tmp, out / f"{name}.safetensors")
        _write_json(out / f"{name}.json", meta)
        manifest["shards"].append(
            {"name": name, **{k: meta[k] for k in ("prompts", "skipped", "tokens", "generated_tokens", "seconds")}}
        )
        manifest["shards"].sort(key=lambda s: s["name"])
        _write_json(manifest_path, manifest)
        prompts_done += len(shard_prompts)
        elapsed = time.perf_counter() - started
        eta = elapsed / prompts_done * (prompts_todo - prompts_done)
        log.info(
            "shard %d/%d done: %d prompts, %d candidates, %.0fs; this run %d/%d prompts, %.0fs elapsed, ETA %.0fs",
            index + 1,
            num_shards,
            meta["prompts"],
            meta["tokens"],
            meta["seconds"],
            prompts_done,
            prompts_todo,
            elapsed,
            eta,
        )
    manifest["tokens"] = sum(s["tokens"] for s in manifest["shards"])
    manifest["complete"] = len(manifest["shards"]) == num_shards
    _write_json(manifest_path, manifest)
    return manifest


def gen_data(
    out_dir: str | Path,
    config: GenConfig,
    *,
    source: str,
    split: str,
    num_prompts: int,
    code_fraction: float,
    target: str | None,
    draft: str | None,
    dtype: str,
    device: str | None,
    batch_size: int,
    threads: int | None = None,
    stop_after_minutes: float | None = None,
    draft_quantization: str = "none",
) -> dict:
    """`specdecpp heads gen-data`: load the pair (the default one when `target` and `draft` are both
    None) without a head, run the prompts of `source` (picked with `config.seed`) and write their
    shards into `out_dir` (`generate_dataset`); print a summary and return the manifest.

    `device` places both models; `batch_size` is the engine's `max_num_seqs`; after
    `stop_after_minutes` no new shard starts (a rerun resumes). `draft_quantization` logs the rounds
    of a quantized draft (its hidden states are what a head serving it reads).
    """
    if (target is None) != (draft is None):
        raise ValueError("give both --target and --draft, or neither (the default pair)")
    if threads:
        torch.set_num_threads(threads)
    prompts = datasets.load_prompts(source, num_prompts, split, code_fraction, config.seed)
    log.info("%d prompts from %s", len(prompts), source)
    placement = {"draft_device": device, "target_devices": [device]} if device else {}
    engine_config = EngineConfig(
        target=target, draft=draft, head="none", dtype=dtype, draft_quantization=draft_quantization,
        scheduler=SchedulerConfig(max_num_seqs=batch_size), **placement,
    )
    target_spec, draft_spec, _ = resolve_paths(engine_config)
    engine = build_engine(engine_config)
    description = {
        "source": source,
        "split": split if source == "sharegpt" else None,
        "draft_id": model_identity(draft_spec),
        "target_id": model_identity(target_spec),
        "dtype": dtype,
        "batch_size": batch_size,
    }
    if engine.draft.kernels.quantization != "none":  # absent otherwise: earlier data sets still resume
        description["draft_quantization"] = engine.draft.kernels.quantization
    if engine.draft.kernels.lm_head != "none":
        description["draft_lm_head"] = engine.draft.kernels.lm_head
    deadline = time.time() + 60 * stop_after_minutes if stop_after_minutes else None
    manifest = generate_dataset(engine, prompts, out_dir, config, description, deadline)
    print(f"{out_dir}: {len(manifest['shards'])} shards, {manifest['tokens']} candidates, "
          f"complete={manifest['complete']}")
    return manifest


def _make_shard(
    engine: LLMEngine, prompts: Sequence[Prompt], index: int, config: GenConfig
) -> tuple[dict[str, torch.Tensor], dict]:
    t0 = time.perf_counter()
    first = index * config.shard_prompts
    encoded, skipped = [], []
    for i, p in enumerate(prompts):
        ids = engine.encode(p.messages)
        (encoded if len(ids) <= config.max_prompt_tokens else skipped).append((first + i, p, ids))
    records, lengths = run_prompts(engine, [(i, ids) for i, _, ids in encoded], config)
    hidden_dtype = parse_dtype(config.hidden_dtype)
    tensors = records_to_rows(records, round_base=first * 10_000, hidden_dtype=hidden_dtype)
    if not tensors:
        tensors = _empty_shard(engine.draft.hidden_size, hidden_dtype)
    meta = {
        "prompts": len(encoded),
        "skipped": len(skipped),
        "tokens": int(tensors["accept_prob"].numel()),
        "generated_tokens": sum(lengths.values()),
        "mean_accept_prob": round(float(tensors["accept_prob"].mean()), 4) if len(tensors["accept_prob"]) else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "records": [
            {"id": p.id, "source": p.source, "index": i, "prompt_tokens": len(ids), "response_tokens": lengths.get(i)}
            for i, p, ids in encoded
        ],
        "skipped_ids": [p.id for _, p, _ in skipped],
    }
    log.info("shard %d: %d candidates from %d prompts, mean a %.3f, %.1f candidates/s", index, meta["tokens"],
             meta["prompts"], meta["mean_accept_prob"] or 0.0, meta["tokens"] / max(meta["seconds"], 1e-9))
    return tensors, meta


def _empty_shard(hidden_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        "hidden": torch.empty(0, hidden_size, dtype=dtype),
        "features": torch.empty(0, len(CANDIDATE_FEATURES)),
        "accept_prob": torch.empty(0),
        "overlap": torch.empty(0),
        "position": torch.empty(0, dtype=torch.int32),
        "round": torch.empty(0, dtype=torch.int64),
        "seq": torch.empty(0, dtype=torch.int32),
        "has_next": torch.empty(0, dtype=torch.uint8),
        "round_accepted": torch.empty(0, dtype=torch.int16),
    }
