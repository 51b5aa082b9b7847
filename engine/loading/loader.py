"""Load the target, the draft, their tokenizer and the head; check they fit together.

A model spec is a local Hugging Face directory, a `.gguf` file (dequantized on load:
convert it once with `specdecpp models convert` to load fast), or a hub id for users
who are online.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from engine.loading.dtypes import DTYPES

IDENTITY_FILE = "specdecpp.json"  # written last by the model converter: {"identity", "source", "source_sha256", ...}


class VocabularyMismatchError(ValueError):
    """Draft and target do not share a vocabulary, so their distributions cannot be compared."""


def parse_dtype(name: str) -> torch.dtype:
    """'bf16' -> torch.bfloat16, and so on for every name in `DTYPES`."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


def _split_gguf(spec: str) -> tuple[str, dict]:
    path = Path(spec)
    if path.suffix == ".gguf" and path.is_file():
        return str(path.parent), {"gguf_file": path.name}
    return spec, {}


def load_model(
    spec: str,
    dtype: torch.dtype = torch.bfloat16,
    device: str | None = "cpu",
    device_map=None,
    max_memory=None,
    tensor_parallel_size: int = 1,
) -> PreTrainedModel:
    """A causal LM from a directory, GGUF file or hub id, in `dtype`, on `device` (or `device_map`).

    `max_memory` ({gpu index: bytes}) limits a string device map ("auto") to the planned GPUs.
    `tensor_parallel_size` > 1: this rank's shard under the model's own TP plan (transformers places it
    on the rank's device; torch.distributed must be initialised over that many ranks).
    """
    location, extra = _split_gguf(spec)
    if max_memory is not None:
        extra["max_memory"] = max_memory
    if tensor_parallel_size > 1:
        from transformers.distributed import DistributedConfig

        extra["distributed_config"] = DistributedConfig(tp_size=tensor_parallel_size)
        device = None
    weights = safetensors_files(location) if not extra else []
    if weights:
        model = _load_tensor_by_tensor(location, weights, dtype, device_map)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype, device_map=device_map, low_cpu_mem_usage=True, **extra
        )
    if device_map is None and device is not None:
        model = model.to(device)
    return model.eval()


def safetensors_files(location: str) -> list[Path]:
    """The safetensors weight files of a local model directory, as transformers picks them: the shards its
    index names, else model.safetensors; none for a hub id, a GGUF file or a directory without them (other
    .safetensors files, such as a consolidated copy, are not the model's weights)."""
    path = Path(location)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / name for name in json.loads(index.read_text())["weight_map"].values()})
    single = path / "model.safetensors"
    return [single] if single.is_file() else []


def _load_tensor_by_tensor(location: str, files: list[Path], dtype: torch.dtype, device_map) -> PreTrainedModel:
    """transformers' own loading (its key renames, tied weights, dtype conversion), fed tensors read one by
    one from the files (pread) instead of memory-mapped: a mapped file stays resident until the load ends,
    so the peak held the whole checkpoint next to the model; read this way, the peak holds the model and
    the tensor being converted."""
    from safetensors import safe_open
    from transformers import AutoConfig, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(location)
    handles = [safe_open(str(f), framework="pt", device="cpu", backend="pread") for f in files]
    slices = {name: h.get_slice(name) for h in handles for name in h.keys()}
    model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(
        None, config=config, state_dict=slices, dtype=dtype, device_map=device_map, low_cpu_mem_usage=True
    )
    model.config._name_or_path = location  # as a load by path records it
    if (Path(location) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(location)
    return model


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    location, extra = _split_gguf(spec)
    return AutoTokenizer.from_pretrained(location, **extra)


def model_identity(spec: str) -> str:
    """A stable name for a model, used to tie a head to the draft it was trained on."""
    path = Path(spec)
    ident = path / IDENTITY_FILE
    if path.is_dir() and ident.is_file():
        return json.loads(ident.read_text()).get("identity", path.name)
    return path.stem if path.suffix == ".gguf" else path.name


def check_vocabularies(
    target: PreTrainedModel,
    draft: PreTrainedModel,
    target_tok: PreTrainedTokenizerBase,
    draft_tok: PreTrainedTokenizerBase,
) -> None:
    """Refuse a pair whose tokenizers or output vocabularies differ."""
    tv, dv = target.get_output_embeddings().out_features, draft.get_output_embeddings().out_features
    if tv != dv:
        raise VocabularyMismatchError(f"vocabulary sizes differ: target has {tv} logits, draft has {dv}")
    if target_tok.get_vocab() != draft_tok.get_vocab():
        raise VocabularyMismatchError(
            f"tokenizers differ: target has {len(target_tok)} tokens, draft has {len(draft_tok)}; "
            "speculative decoding needs one shared vocabulary"
        )


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """All ids that end a completion: the generation config's EOS and the tokenizer's."""
    gen = getattr(model, "generation_config", None)
    return frozenset(merge_token_ids(getattr(gen, "eos_token_id", None), tokenizer.eos_token_id))


def merge_token_ids(*values: int | list[int] | tuple[int, ...] | None) -> list[int]:
    """The ids in `values`, each written as configs write `eos_token_id` (an id, a list, or None),
    in order and once each."""
    ids: list[int] = []
    for value in values:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)
    return ids
