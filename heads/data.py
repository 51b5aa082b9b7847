"""Training data for the acceptance head (paper section 4), written as resumable shards.

For a batch of prompts (chat template applied):
1. the target samples responses t at temperature 1 (left-padded batched `generate`); its raw
   logits at each step are kept, so p(.|prefix, t_<i) needs no second target pass;
2. one draft forward over prompt + t gives q(.|prefix, t_<i) at every response position;
3. d_i ~ q_i and the label p_acc_i = min(1, p_i(d_i) / q_i(d_i)) (temperature 1, no filtering);
4. z_i = d_i, except a random fraction `mixing_ratio` of positions where z_i = t_i (mask 0:
   the loss skips them);
5. one draft forward over prompt + z; its final hidden state (after the final norm) at the
   position of z_i is the head's input for z_i, exactly what the engine feeds the head after
   the draft's forward on a proposed token.

Each shard is `shard-NNNNN.safetensors` (one row per response position: hidden [N, H] in
bf16, p_acc, q_tok = q(d), p_tok = p(d), overlap = sum min(p, q), the draft's `draft_stats`
(log q(d), entropy, log max q), mask, draft/target tokens,
sequence index, position) plus `shard-NNNNN.json` (its prompts and counts). `manifest.json`
lists finished shards; a rerun with the same arguments skips them.
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
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from heads.model import DRAFT_FEATURES, draft_stats
from heads.prompts import Prompt

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
HIDDEN_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class GenConfig:
    max_new_tokens: int = 128
    max_prompt_tokens: int = 384  # longer prompts (after the chat template) are skipped
    batch_size: int = 16
    shard_prompts: int = 64  # prompts per shard (a multiple of batch_size keeps batches full)
    mixing_ratio: float = 0.15
    seed: int = 0
    hidden_dtype: str = "bf16"
    logits_chunk: int = 256  # response positions per vocabulary-sized chunk


# ----- small helpers ----------------------------------------------------------------------
def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    out = tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return [int(t) for t in out]


def prompts_hash(prompts: Sequence[Prompt]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps([p.id, p.source, p.text]).encode())
    return h.hexdigest()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _pad_right(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)


@torch.inference_mode()
def final_hidden(model: PreTrainedModel, rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """Final-layer hidden states (after the final norm) [B, L, H] of right-padded rows.

    Right padding needs no attention mask: causal attention never lets a real position see
    the padding after it.
    """
    device = next(model.parameters()).device
    return model.get_decoder()(input_ids=_pad_right(rows, pad_id).to(device), use_cache=False).last_hidden_state


# ----- one batch ----------------------------------------------------------------------------
@torch.inference_mode()
def sample_responses(
    target: PreTrainedModel,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    seed: int,
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Responses sampled from the target at temperature 1 (no top-k / top-p / penalties), cut
    after the first EOS (kept), and the target's raw logits [len, V] (float32) at each step."""
    device = next(target.parameters()).device
    width = max(len(p) for p in prompt_ids)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompt_ids], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], dtype=torch.long, device=device)
    config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        min_p=None,
        repetition_penalty=1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(eos_ids),
        pad_token_id=pad_id,
        return_dict_in_generate=True,
        output_logits=True,
    )
    torch.manual_seed(seed)  # generate samples from the global generator
    out = target.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    new = out.sequences[:, width:].tolist()
    logits = torch.stack(out.logits, dim=1)  # [B, steps, V]
    eos = set(eos_ids)
    responses, response_logits = [], []
    for b, tokens in enumerate(new):
        n = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
        responses.append(tokens[:n])
        response_logits.append(logits[b, :n].float())
    return responses, response_logits


@torch.inference_mode()
def label_batch(
    draft: PreTrainedModel,
    prompt_ids: list[list[int]],
    responses: list[list[int]],
    target_logits: list[torch.Tensor],
    pad_id: int,
    mixing_ratio: float,
    generator: torch.Generator,
    hidden_dtype: torch.dtype = torch.bfloat16,
    logits_chunk: int = 256,
) -> dict[str, torch.Tensor]:
    """Draft samples, labels, mixing and the head's inputs for one batch (steps 2-5 above).

    Returns flat per-position tensors over all response positions of the batch, in order.
    """
    lm_head = draft.get_output_embeddings()
    rows = [p + r for p, r in zip(prompt_ids, responses, strict=True)]
    hidden_t = final_hidden(draft, rows, pad_id)
    # The position before response token i predicts it.
    before = [
        hidden_t[b, len(p) - 1 : len(p) - 1 + len(r)]
        for b, (p, r) in enumerate(zip(prompt_ids, responses, strict=True))
    ]
    h = torch.cat(before)
    p_logits = torch.cat(target_logits).to(h.device)
    target_tokens = torch.tensor([t for r in responses for t in r], dtype=torch.long, device=h.device)
    n = target_tokens.shape[0]
    d = torch.empty(n, dtype=torch.long)
    q_tok, p_tok, overlap = torch.empty(n), torch.empty(n), torch.empty(n)
    stats = {name: torch.empty(n) for name in DRAFT_FEATURES}
    for s in range(0, n, logits_chunk):
        e = min(s + logits_chunk, n)
        q_logits = lm_head(h[s:e]).float()
        q = q_logits.softmax(-1)
        p = p_logits[s:e].softmax(-1)
        tok = torch.multinomial(q.cpu(), 1, generator=generator).to(q.device)
        d[s:e] = tok.squeeze(-1).cpu()
        q_tok[s:e] = q.gather(-1, tok).squeeze(-1).cpu()
        p_tok[s:e] = p.gather(-1, tok).squeeze(-1).cpu()
        overlap[s:e] = torch.minimum(p, q).sum(-1).cpu()
        for name, value in draft_stats(q_logits, tok.squeeze(-1)).items():
            stats[name][s:e] = value.cpu()
    p_acc = torch.where(q_tok > 0, (p_tok / q_tok.clamp_min(1e-30)).clamp(max=1.0), torch.ones_like(q_tok))
    mixed = torch.rand(n, generator=generator) < mixing_ratio
    target_cpu = target_tokens.cpu()
    z = torch.where(mixed, target_cpu, d)
    z_rows, offset = [], 0
    for p, r in zip(prompt_ids, responses, strict=True):
        z_rows.append(p + z[offset : offset + len(r)].tolist())
        offset += len(r)
    hidden_z = final_hidden(draft, z_rows, pad_id)
    inputs = torch.cat(
        [hidden_z[b, len(p) : len(p) + len(r)] for b, (p, r) in enumerate(zip(prompt_ids, responses, strict=True))]
    )
    positions = torch.cat([torch.arange(len(r), dtype=torch.int32) for r in responses])
    return {
        "hidden": inputs.to(device="cpu", dtype=hidden_dtype).contiguous(),
        "p_acc": p_acc,
        "q_tok": q_tok,
        "p_tok": p_tok,
        "overlap": overlap,
        **stats,
        "mask": (~mixed).to(torch.uint8),
        "draft_token": d.to(torch.int32),
        "target_token": target_cpu.to(torch.int32),
        "position": positions,
    }


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
    """All finished shards of a data directory, concatenated; `seq` gets a dataset-wide index."""
    parts = [load_file(str(path)) for path in finished_shards(directory)]
    if not parts:
        raise ValueError(f"{directory}: no finished shards")
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def generate_dataset(
    target: PreTrainedModel,
    draft: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    out_dir: str | Path,
    config: GenConfig,
    eos_ids: Sequence[int],
    description: dict | None = None,
) -> dict:
    """Write shards for `prompts` into `out_dir`, skipping shards already finished; return the manifest.

    `description` (source, draft/target identities, ...) is recorded in the manifest.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids))
    header = {
        "version": FORMAT_VERSION,
        "config": asdict(config),
        "prompts_hash": prompts_hash(prompts),
        "num_prompts": len(prompts),
        "sources": sorted({p.source for p in prompts}),
        "eval_only": any(p.source == "humaneval" for p in prompts),
        "hidden_size": draft.config.hidden_size,
        **(description or {}),
    }
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        old = {k: manifest.get(k) for k in header}
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
        shard_prompts = prompts[index * config.shard_prompts : (index + 1) * config.shard_prompts]
        tensors, meta = _make_shard(target, draft, tokenizer, shard_prompts, index, config, eos_ids, pad_id)
        name = shard_name(index)
        tmp = out / f"{name}.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"format": "specdecpp-head-data", "version": str(FORMAT_VERSION)})
        os.replace(tmp, out / f"{name}.safetensors")
        _write_json(out / f"{name}.json", meta)
        manifest["shards"].append(
            {"name": name, **{k: meta[k] for k in ("prompts", "skipped", "tokens", "trained_tokens", "seconds")}}
        )
        manifest["shards"].sort(key=lambda s: s["name"])
        _write_json(manifest_path, manifest)
        prompts_done += len(shard_prompts)
        elapsed = time.perf_counter() - started
        eta = elapsed / prompts_done * (prompts_todo - prompts_done)
        log.info(
            "shard %d/%d done: %d prompts, %d tokens, %.0fs; this run %d/%d prompts, %.0fs elapsed, ETA %.0fs",
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


def _make_shard(
    target: PreTrainedModel,
    draft: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    index: int,
    config: GenConfig,
    eos_ids: Sequence[int],
    pad_id: int,
) -> tuple[dict[str, torch.Tensor], dict]:
    t0 = time.perf_counter()
    encoded, skipped = [], []
    for p in prompts:
        ids = encode_prompt(tokenizer, p)
        (encoded if len(ids) <= config.max_prompt_tokens else skipped).append((p, ids))
    encoded.sort(key=lambda item: len(item[1]))  # similar lengths per batch: less padding
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
    parts: list[dict[str, torch.Tensor]] = []
    records = []
    seq_base = index * config.shard_prompts
    for b in range(0, len(encoded), config.batch_size):
        batch = encoded[b : b + config.batch_size]
        tb = time.perf_counter()
        prompt_ids = [ids for _, ids in batch]
        responses, logits = sample_responses(
            target, prompt_ids, config.max_new_tokens, eos_ids, pad_id, seed=config.seed * 1_000_003 + index * 997 + b
        )
        labelled = label_batch(
            draft,
            prompt_ids,
            responses,
            logits,
            pad_id,
            config.mixing_ratio,
            generator,
            HIDDEN_DTYPES[config.hidden_dtype],
            config.logits_chunk,
        )
        labelled["seq"] = torch.cat(
            [torch.full((len(r),), seq_base + b + i, dtype=torch.int32) for i, r in enumerate(responses)]
        )
        parts.append(labelled)
        for (p, ids), r in zip(batch, responses, strict=True):
            records.append({"id": p.id, "source": p.source, "prompt_tokens": len(ids), "response_tokens": len(r)})
        log.info(
            "  shard %d batch %d/%d: %d prompts, %d response tokens, mean p_acc %.3f, %.1fs",
            index,
            b // config.batch_size + 1,
            (len(encoded) + config.batch_size - 1) // config.batch_size,
            len(batch),
            labelled["p_acc"].numel(),
            float(labelled["p_acc"].mean()),
            time.perf_counter() - tb,
        )
    if parts:
        tensors = {k: torch.cat([p[k] for p in parts]).contiguous() for k in parts[0]}
    else:
        tensors = _empty_shard(draft.config.hidden_size, HIDDEN_DTYPES[config.hidden_dtype])
    meta = {
        "prompts": len(encoded),
        "skipped": len(skipped),
        "tokens": int(tensors["p_acc"].numel()),
        "trained_tokens": int(tensors["mask"].sum()),
        "seconds": round(time.perf_counter() - t0, 1),
        "records": records,
        "skipped_ids": [p.id for p, _ in skipped],
    }
    return tensors, meta


def _empty_shard(hidden_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    f32, i32 = torch.float32, torch.int32
    return {
        "hidden": torch.empty(0, hidden_size, dtype=dtype),
        **{k: torch.empty(0, dtype=f32) for k in ("p_acc", "q_tok", "p_tok", "overlap", *DRAFT_FEATURES)},
        "mask": torch.empty(0, dtype=torch.uint8),
        **{k: torch.empty(0, dtype=i32) for k in ("draft_token", "target_token", "position", "seq")},
    }
