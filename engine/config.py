"""What to load, where, and how to batch: plain data, so the engine process can be spawned from it.

A field that the command line sets carries its flag and help text in its metadata (`option`);
specdecpp/model_args.py builds the argparse arguments, the config from parsed flags, and the flags
that reproduce a config (for a server the benchmark starts) from these fields alone, so each
default and help text is written once, here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from engine.loading.dtypes import DTYPES
from engine.params import SpecConfig

CPU_FP32_GEMM_MODES = ("auto", "on", "off")  # see engine/loading/cpu_linear.py
ROW_PADDING_MODES = ("auto", "off")  # ditto
# int8/int4: weight-only; w8a8: int8 weights and int8 activations quantized per call; engine/loading/quantize.py
QUANTIZATION_MODES = ("none", "int8", "int4", "w8a8")
# A w8a8 layer scales its activations by the whole call's largest, so a target's logits for one token would
# depend on the other tokens of its forward: speculation could not reproduce such a target alone exactly.
TARGET_QUANTIZATION_MODES = ("none", "int8", "int4")
# An acceptance head's linear layers: w8a8 or as trained (fp32); auto measures which judges faster (engine/costs.py)
HEAD_QUANTIZATION_MODES = ("auto", "none", "w8a8")


def option(flag: str, help: str, **argparse_extras) -> dict:
    """Field metadata of a command-line option: its flag, its help text (argparse expands
    %(default)s to the field's default) and argparse extras such as choices or metavar."""
    return {"flag": flag, "help": help, **argparse_extras}


@dataclass(frozen=True)
class SchedulerConfig:
    """Admission and batching limits (engine/scheduler.py)."""

    max_num_seqs: int = field(default=8, metadata=option(
        "--max-num-seqs", "sequences decoded together (default: %(default)s)"))
    max_num_batched_tokens: int = field(default=512, metadata=option(
        "--max-num-batched-tokens", "prefill chunk: prompt tokens per forward for a new request "
        "(default: %(default)s)"))
    kv_cache_tokens: int = field(default=131072, metadata=option(
        "--kv-cache-tokens", "admission budget: sum of prompt + max_tokens over running requests "
        "(default: %(default)s)"))
    batching: bool = field(default=True, metadata=option(
        "--no-batching", "give every running request its own forwards (round-robin) instead of one batch"))
    # vLLM's speculative_disable_by_batch_size: once a batch makes verification compute-bound, every
    # candidate row costs about as much as a plain decoding row, so speculation stops paying.
    spec_disable_batch_size: int | None = field(default=None, metadata=option(
        "--speculative-disable-by-batch-size", "rounds with N or more sequences run the target alone (no draft): "
        "where verifying many candidates for a large batch costs more than it saves (default: always speculate)",
        metavar="N"))
    spec_batch_candidates: int | None = field(default=None, metadata=option(
        "--speculative-batch-candidates", "candidates of one batched round, all sequences together: each of b "
        "sequences proposes at most N // b (its policy may stop sooner), none once b > N. Verification gets "
        "compute-bound as the batch grows, so each sequence's share shrinks (default: no budget)", metavar="N"))

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 16:
            raise ValueError("max_num_batched_tokens must be >= 16")
        if self.kv_cache_tokens < 1:
            raise ValueError("kv_cache_tokens must be >= 1")
        if self.spec_disable_batch_size is not None and self.spec_disable_batch_size < 2:
            raise ValueError("spec_disable_batch_size must be >= 2 (or None: always speculate)")
        if self.spec_batch_candidates is not None and self.spec_batch_candidates < 1:
            raise ValueError("spec_batch_candidates must be >= 1 (or None: no budget)")


@dataclass
class EngineConfig:
    """Models, placement and batching of one engine; `default_spec` comes from the speculation flags."""

    target: str | None = field(default=None, metadata=option(
        "--target", "target model: HF directory, .gguf file or hub id (default: the default pair)"))
    # None with target None: the default draft; "" or "none": no draft
    draft: str | None = field(default=None, metadata=option(
        "--draft", "draft model (default: the default pair's draft; 'none' for no draft)"))
    # None: the shipped head for the default draft, if any; "none": no head
    head: str | None = field(default=None, metadata=option(
        "--head", "acceptance head directory (default: the shipped head for the draft)"))
    # (name, directory): heads a request picks with specdec.head
    extra_heads: tuple[tuple[str, str], ...] = field(default=(), metadata=option(
        "--extra-head", "another acceptance head, chosen per request with specdec.head=NAME (repeatable)",
        metavar="NAME=DIR"))
    dtype: str = field(default="bf16", metadata=option("--dtype", "weights dtype", choices=DTYPES))
    draft_dtype: str | None = field(default=None, metadata=option(
        "--draft-dtype", "draft dtype (default: --dtype)", choices=DTYPES))
    draft_device: str | None = field(default=None, metadata=option(
        "--draft-device", "device for the draft and head (default: GPU 0 or cpu)"))
    # None: planned (other GPUs, else the draft's device); draft_device None: GPU 0 if any, else the CPU
    target_devices: list[str] | None = field(default=None, metadata=option(
        "--target-devices", "comma-separated devices for the target; several: sharded (e.g. cuda:1,cuda:2)",
        metavar="DEV[,DEV...]"))
    tensor_parallel_size: int = field(default=1, metadata=option(
        "--tensor-parallel-size", "ranks the target is split over by tensor parallelism (one per GPU, or CPU processes "
        "over gloo); the draft and head are replicated on every rank. Must divide the target's attention and KV "
        "heads (default: %(default)s)", metavar="N"))
    max_model_len: int | None = field(default=None, metadata=option(
        "--max-model-len", "context limit (default: the target's)"))
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig, metadata={"group": "batching"})
    cpu_fp32_gemm: str = field(default="auto", metadata=option(
        "--cpu-fp32-gemm", "bf16 models on the CPU: keep an fp32 copy of each linear layer (not the LM head) for "
        "GEMMs over many rows (prefill), where CPUs without AMX run bf16 at half the fp32 speed; costs twice the "
        "bf16 weights in memory. auto: only if that fits in half the available memory (default: %(default)s)",
        choices=CPU_FP32_GEMM_MODES))
    cpu_row_padding: str = field(default="auto", metadata=option(
        "--cpu-row-padding", "models on the CPU: compute inputs of a few rows (decode, verification) as more rows "
        "where the larger call measures faster here, by groups of same-shaped layers, at load. Results are those "
        "of the larger call. auto: measure; off: never (default: %(default)s)", choices=ROW_PADDING_MODES))
    draft_quantization: str = field(default="auto", metadata=option(
        "--draft-quantization", "quantization of the draft's linear layers: int8 or int4 weights, or w8a8 "
        "(int8 weights and activations). Lossless: only the proposals change. auto: the int8 kernel (int8 or "
        "w8a8) that measures fastest on this host, where it beats the unquantized one (default: %(default)s)",
        choices=("auto", *QUANTIZATION_MODES)))
    draft_lm_head_quantization: bool = field(default=True, metadata=option(
        "--no-draft-lm-head-quantization", "keep the draft's LM head as loaded; by default a quantized draft's LM head "
        "becomes int8 (w8a8 for a w8a8 draft) too where that measures faster on its own shape"))
    target_quantization: str = field(default="none", metadata=option(
        "--target-quantization", "weight-only quantization of the target's linear layers. This CHANGES "
        "THE TARGET: output follows the quantized target's distribution, not the original's (default: %(default)s)",
        choices=TARGET_QUANTIZATION_MODES))
    head_quantization: str = field(default="auto", metadata=option(
        "--head-quantization", "the acceptance heads' linear layers on the CPU: w8a8 (int8 weights and activations) "
        "or none (as trained). Lossless: only where rounds stop changes. auto: w8a8 where it judges a candidate "
        "faster right after a draft step, as a round runs it, and its logits stay close to the trained head's "
        "(default: %(default)s)", choices=HEAD_QUANTIZATION_MODES))
    cost_model: str | None = field(default=None, metadata=option(
        "--cost-model", "a cost model JSON (as `specdecpp heads predict --save-costs` writes) to start from instead "
        "of measuring the models at start; either way the engine refreshes it from its own timings", metavar="FILE"))
    online_calibration: bool = field(default=True, metadata=option(
        "--no-online-calibration", "keep each acceptance head's shipped calibration instead of refitting it online "
        "from the exact labels every verification yields (its calibration error is measured either way)"))
    max_over_acceptance: float = field(default=0.0, metadata=option(
        "--max-over-acceptance", "the largest specdec.over_acceptance (epsilon) a request may ask for. Above 0 such "
        "a request's output is NOT the target's distribution (it says so: lossless false); the default 0 refuses "
        "every epsilon > 0 with a 400", metavar="EPS"))
    default_spec: SpecConfig = field(default_factory=SpecConfig)

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_over_acceptance <= 1.0:
            raise ValueError("max_over_acceptance must lie in [0, 1]")
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be >= 1")
        if self.tensor_parallel_size > 1 and (self.target_devices or self.draft_device):
            raise ValueError("--target-devices and --draft-device do not apply with --tensor-parallel-size: each rank "
                             "holds its target shard and a draft replica on its own device (GPU LOCAL_RANK, or the "
                             "CPU)")
        if self.tensor_parallel_size > 1 and self.target_quantization != "none":
            raise ValueError("--target-quantization does not apply to a tensor-parallel target (its weights are "
                             "sharded DTensors); use --tensor-parallel-size 1 to quantize the target")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["default_spec"] = self.default_spec.model_dump()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> EngineConfig:
        data = dict(data)
        data["scheduler"] = SchedulerConfig(**(data.get("scheduler") or {}))
        data["default_spec"] = SpecConfig.model_validate(data.get("default_spec") or {})
        data["extra_heads"] = tuple(tuple(pair) for pair in data.get("extra_heads") or ())
        return cls(**data)
