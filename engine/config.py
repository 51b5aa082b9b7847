"""What to load and where: plain data, so the engine process can be spawned from it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from engine.params import SpecConfig

CPU_FP32_GEMM_MODES = ("auto", "on", "off")  # see engine/loading/cpu_linear.py


@dataclass
class EngineConfig:
    target: str | None = None  # None: the default pair (pulled on first use)
    draft: str | None = None  # None with target None: the default draft; "" or "none": no draft
    head: str | None = None  # None: the shipped head for the default draft, if any; "none": no head
    extra_heads: tuple[tuple[str, str], ...] = ()  # (name, directory): heads a request picks with specdec.head
    dtype: str = "bf16"
    draft_dtype: str | None = None  # defaults to dtype
    draft_device: str | None = None  # None: planned (GPU 0 if any, else CPU)
    target_devices: list[str] | None = None  # None: planned (other GPUs, else the draft's device)
    max_model_len: int | None = None
    max_num_seqs: int = 8  # continuous batching: sequences running at once
    max_num_batched_tokens: int = 512  # prefill chunk size (tokens per forward for a new prompt)
    kv_cache_tokens: int = 131072  # admission budget: sum of prompt + max_tokens over running sequences
    batching: bool = True  # False: each running sequence gets its own forwards (round-robin)
    spec_disable_batch_size: int | None = None  # rounds with this many sequences or more skip the draft
    spec_batch_candidates: int | None = None  # candidates per round over the whole batch (see SchedulerConfig)
    cpu_fp32_gemm: str = "auto"  # bf16 CPU models: fp32 weight copies for wide GEMMs (engine/loading/cpu_linear.py)
    default_spec: SpecConfig = field(default_factory=SpecConfig)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["default_spec"] = self.default_spec.model_dump()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> EngineConfig:
        data = dict(data)
        data["default_spec"] = SpecConfig.model_validate(data.get("default_spec") or {})
        data["extra_heads"] = tuple(tuple(pair) for pair in data.get("extra_heads") or ())
        return cls(**data)
