"""oneDNN pre-packed linear layers for CPU inference.

Decoding is a chain of matrix-vector products over every weight, so it is bound by memory
bandwidth. On x86 CPUs, aten's bf16 `linear` leaves much of that bandwidth unused for a
handful of rows, while oneDNN with the weight reordered once into its blocked layout runs the
same products much faster, with bit-identical results. That is what inductor's CPU "freezing"
does; here it is done explicitly, module by module, so the model stays an ordinary Hugging Face
model.

Wide inputs (prefill chunks, verification of large batches) are the opposite case: compute-
bound, and where bf16 is not native (no AMX or AVX512-BF16: bf16 is emulated, by oneDNN's
conversions with AVX-512, by aten's with AVX2 alone, where oneDNN cannot pack bf16 at all) a
bf16 GEMM is slower than an fp32 one, while for a few rows bf16 may stay faster (it reads half the
bytes); with AMX, bf16 wins at every width. So a bf16 layer may also keep an fp32 copy of its
weight, used from a crossover row count on. Activations and weights are bf16 values, so every
product is exact in fp32 and the sum is rounded to bf16 once, as the bf16 kernel does: the two
paths differ only in summation order, like two bf16 kernels blocked for different row counts. The
copy costs twice the layer's bf16 bytes, so `auto` makes it only where it fits in
`FP32_COPY_MEMORY_SHARE` of the memory available and where a probe of the model's widest layer at
`FP32_PROBE_ROWS` rows finds fp32 at least `FP32_MIN_GAIN` faster on this host, and then measures
the crossover on that layer (`fp32_copy_plan`): on an AVX2-only host it can lie at a handful of
rows, inside verification. The LM head never gets a copy (it only sees the few positions whose
logits are used).

The measurements behind these choices: docs/benchmarks/README.md, "CPU kernels".

Only whole-CPU models in bf16 or fp32 are packed; CUDA models, models split by accelerate
hooks and tensor-parallel shards (DTensor weights) are left alone. Where oneDNN cannot pack bf16,
only the layers that get an fp32 copy are replaced; their narrow inputs run aten's bf16 `linear`.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch
from torch import nn

from engine.config import CPU_FP32_GEMM_MODES
from engine.distributed import is_tensor_parallel
from engine.loading.inventory import available_memory_bytes

log = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.bfloat16, torch.float32)
FP32_MIN_ROWS = 24  # rows from which `--cpu-fp32-gemm on` uses the copies (auto measures its crossover)
FP32_COPY_MEMORY_SHARE = 0.5  # auto: copies only if they take at most this share of the available memory
FP32_PROBE_ROWS = 64  # auto: the width at which the fp32 copy must beat bf16 on this host
FP32_MIN_GAIN = 0.10  # auto: ... by at least this share of the bf16 time
FP32_ROW_STEPS = (1, 2, 4, 8, 12, 16, 24, 32, 48)  # auto: candidates for the crossover, below FP32_PROBE_ROWS


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bf16() -> bool:
    """Whether oneDNN runs bf16 GEMMs natively here (AVX512-BF16, AMX); it honours ONEDNN_MAX_CPU_ISA."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class Fp32Linear(nn.Module):
    """A bf16 layer computed in fp32 through a oneDNN-packed fp32 copy of its weight, bf16 in and out:
    where bf16 is emulated, several times faster than bf16 on wide inputs."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight.float(), 128),
                             persistent=False)
        self.register_buffer("bias", None if bias is None else bias.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.mkldnn._linear_pointwise(x.contiguous().float(), self.packed_weight, self.bias, "none", [], "")
        return out.to(x.dtype)


class PackedLinear(nn.Module):
    """`nn.Linear` for CPU inference (inference only): its weight in oneDNN's pre-packed layout where
    oneDNN runs its dtype natively (`packed`), else as loaded; with `fp32_copy`, a packed fp32 copy of a
    bf16 weight serves inputs of `fp32_min_rows` rows or more."""

    def __init__(self, linear: nn.Linear, fp32_copy: bool = False, fp32_min_rows: int = FP32_MIN_ROWS) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.packed = weight.dtype != torch.bfloat16 or native_bf16()
        # The batch-size hint only picks oneDNN's blocking; any number of rows works.
        narrow = torch.ops.mkldnn._reorder_linear_weight(weight, 1) if self.packed else weight
        self.register_buffer("packed_weight", narrow, persistent=False)
        bias = None if linear.bias is None else linear.bias.detach()
        self.register_buffer("bias", bias, persistent=False)
        self.fp32_copy = fp32_copy and weight.dtype == torch.bfloat16
        self.fp32_min_rows = fp32_min_rows
        self.fp32 = Fp32Linear(weight, bias) if self.fp32_copy else None
        self.pad_rows: dict[int, int] = {}  # rows -> rows computed (engine/loading/kernels.py, `row_padding_plan`)

    @property
    def shape(self) -> str:
        return f"{self.in_features}x{self.out_features}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        padded = self.pad_rows.get(rows)
        if padded is None:
            return self.compute(x)
        flat = nn.functional.pad(x.reshape(rows, self.in_features), (0, 0, 0, padded - rows))
        return self.compute(flat)[:rows].reshape(*x.shape[:-1], self.out_features)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on exactly the rows given."""
        x = x.contiguous()
        if self.fp32 is not None and x.numel() >= self.fp32_min_rows * self.in_features:
            return self.fp32(x)
        if not self.packed:
            return nn.functional.linear(x, self.packed_weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        fp32 = f", fp32 copy from {self.fp32_min_rows} rows" if self.fp32_copy else ""
        packed = "oneDNN" if self.packed else "no (bf16 emulated)"
        padding = f", rows padded {self.pad_rows}" if self.pad_rows else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, packed={packed}{fp32}{padding}"


def can_pack(model: nn.Module) -> bool:
    """True for a model wholly on the CPU, in a packable dtype, with oneDNN available (a bf16 layer
    without native bf16 is wrapped only to add its fp32 copy)."""
    if not torch.backends.mkldnn.is_available():
        return False
    params = list(model.parameters())
    if not params or any(p.device.type != "cpu" for p in params) or is_tensor_parallel(model):
        return False
    if params[0].dtype not in PACKABLE_DTYPES:
        return False
    return not any(hasattr(m, "_hf_hook") for m in model.modules())


def fp32_copy_plan(model: nn.Module, mode: str = "auto") -> tuple[list[nn.Linear], int]:
    """The bf16 layers of `model` that `pack_linears` should give an fp32 copy (see module doc), all but
    the LM head or none, and the row count from which the copies serve: measured by "auto" on the
    widest layer (the first of `FP32_ROW_STEPS` where fp32 is faster), `FP32_MIN_ROWS` for "on"."""
    if mode not in CPU_FP32_GEMM_MODES:
        raise ValueError(f"fp32 copy mode {mode!r}: expected one of {', '.join(CPU_FP32_GEMM_MODES)}")
    candidates = _fp32_candidates(model)
    if mode == "off" or not candidates:
        return [], FP32_MIN_ROWS
    if mode == "on":
        return candidates, FP32_MIN_ROWS
    extra = sum(linear.weight.numel() * 4 for linear in candidates)
    available = available_memory_bytes()
    fits = extra <= FP32_COPY_MEMORY_SHARE * available
    widest = max(candidates, key=lambda m: m.weight.numel())
    bf16_ms, fp32_ms = wide_gemm_ms(widest, (FP32_PROBE_ROWS,))[FP32_PROBE_ROWS] if fits else (0.0, 0.0)
    pays = fits and fp32_ms <= (1 - FP32_MIN_GAIN) * bf16_ms
    min_rows = FP32_PROBE_ROWS
    if pays:
        timings = wide_gemm_ms(widest, FP32_ROW_STEPS)
        min_rows = next((rows for rows, (b, f) in timings.items() if f < b), FP32_PROBE_ROWS)
    log.info(
        "fp32 copies for wide GEMMs: %s (%.1f GB, %.1f GB available; %d rows of the widest layer: bf16 %.2f ms, "
        "fp32 %.2f ms%s)", "on" if pays else "off", extra / 1e9, available / 1e9, FP32_PROBE_ROWS, bf16_ms, fp32_ms,
        f"; used from {min_rows} rows" if pays else "",
    )
    return (candidates, min_rows) if pays else ([], FP32_MIN_ROWS)


def wide_gemm_ms(linear: nn.Linear, row_counts: tuple[int, ...], reps: int = 3) -> dict[int, tuple[float, float]]:
    """Milliseconds of `linear` at each of `row_counts` rows through its bf16 weight (packed where
    oneDNN runs bf16 natively) and through a packed fp32 copy, each the fastest of `reps` calls after a
    warm-up (another process only ever adds time)."""
    probe = PackedLinear(linear, fp32_copy=True, fp32_min_rows=1)
    narrow = PackedLinear(linear)
    generator = torch.Generator().manual_seed(0)

    def fastest(fn, x: torch.Tensor) -> float:
        fn(x)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
        return min(times) * 1e3

    timings = {}
    with torch.inference_mode():
        for rows in row_counts:
            x = torch.randn(rows, linear.in_features, generator=generator).to(torch.bfloat16)
            timings[rows] = (fastest(narrow, x), fastest(probe, x))
    return timings


def _fp32_candidates(model: nn.Module) -> list[nn.Linear]:
    """The unpacked bf16 linears that would get an fp32 copy: all but the LM head."""
    if not can_pack(model):
        return []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        m for m in model.modules() if type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 and m is not head
    ]


def pack_linears(model: nn.Module, fp32_copies: str = "off") -> int:
    """Replace every `nn.Linear` of a CPU model by a `PackedLinear`, in place; returns how many.

    `fp32_copies` ("auto", "on", "off"): whether bf16 layers other than the LM head also keep an
    fp32 copy for wide inputs (see the module doc). A tied LM head keeps its embedding (the
    embedding still reads the original weight). Idempotent: packed layers are skipped. Row
    padding is set afterwards (engine/loading/kernels.py, `row_padding_plan`).
    """
    if not can_pack(model):
        return 0
    copies, min_rows = fp32_copy_plan(model, fp32_copies)
    with_copy = {id(m) for m in copies}
    native = native_bf16()
    places = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
              if type(child) is nn.Linear and child.weight.dtype in PACKABLE_DTYPES
              and (native or child.weight.dtype != torch.bfloat16 or id(child) in with_copy)]
    replaced = len(places)
    for parent, name in places:  # layer by layer: each original goes as its packed copy comes
        child = getattr(parent, name)
        setattr(parent, name, PackedLinear(child, fp32_copy=id(child) in with_copy, fp32_min_rows=min_rows))
        del child
    if replaced:
        log.info("packed %d linear layers for oneDNN (%d with fp32 copies%s)", replaced, len(with_copy),
                 "" if native else "; bf16 is emulated here, so no others")
    return replaced
