"""oneDNN pre-packed linear layers for CPU inference.

Decoding is a chain of matrix-vector products over every weight, so it is bound by memory
bandwidth. On x86 CPUs, aten's bf16 `linear` leaves much of that bandwidth unused for a
handful of rows, while oneDNN with the weight reordered once into its blocked layout runs the
same products much faster, with bit-identical results. That is what inductor's CPU "freezing"
does; here it is done explicitly, module by module, so the model stays an ordinary Hugging Face
model.

Wide inputs (prefill chunks, verification of large batches) are the opposite case: compute-
bound, and on CPUs without native bf16 (no AMX or AVX512-BF16) oneDNN's bf16 GEMM is slower than
its fp32 one, while for a few rows bf16 stays faster (it reads half the bytes); with AMX, bf16
wins at every width. So a bf16 layer may also keep an fp32 copy of its weight, used from
`FP32_MIN_ROWS` rows on, the crossover measured on an emulated-bf16 host. Activations and weights
are bf16 values, so every product is exact in fp32 and the sum is rounded to bf16 once, as
the bf16 kernel does: the two paths differ only in summation order, like two bf16 kernels
blocked for different row counts. The copy costs twice the layer's bf16 bytes, so `auto`
makes it only where it fits in `FP32_COPY_MEMORY_SHARE` of the memory available and where a
probe of the model's widest layer at `FP32_PROBE_ROWS` rows finds fp32 at least
`FP32_MIN_GAIN` faster on this host (`fp32_copy_plan`); the LM head never gets one (it only
sees the few positions whose logits are used).
The measurements behind these choices: docs/benchmarks/README.md, "CPU kernels".

Only whole-CPU models in bf16 or fp32 are packed; CUDA models, models split by accelerate
hooks and tensor-parallel shards (DTensor weights) are left alone.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from engine.config import CPU_FP32_GEMM_MODES
from engine.distributed import is_tensor_parallel
from engine.loading.inventory import available_memory_bytes

log = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.bfloat16, torch.float32)
FP32_MIN_ROWS = 24  # rows from which a bf16 layer's fp32 copy is faster (docs/benchmarks/README.md, CPU kernels)
FP32_COPY_MEMORY_SHARE = 0.5  # auto: copies only if they take at most this share of the available memory
FP32_PROBE_ROWS = 64  # auto: the width at which the fp32 copy must beat bf16 on this host
FP32_MIN_GAIN = 0.10  # auto: ... by at least this share of the bf16 time


class PackedLinear(nn.Module):
    """`nn.Linear` whose weight lives in oneDNN's pre-packed layout (inference only)."""

    def __init__(self, linear: nn.Linear, fp32_copy: bool = False) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        # The batch-size hint only picks oneDNN's blocking; any number of rows works.
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        self.register_buffer("packed_weight", packed, persistent=False)
        bias = None if linear.bias is None else linear.bias.detach()
        self.register_buffer("bias", bias, persistent=False)
        self.fp32_copy = fp32_copy and weight.dtype == torch.bfloat16
        if self.fp32_copy:
            packed32 = torch.ops.mkldnn._reorder_linear_weight(weight.float(), 128)
            self.register_buffer("packed_weight_fp32", packed32, persistent=False)
            self.register_buffer("bias_fp32", None if bias is None else bias.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        if self.fp32_copy and x.numel() >= FP32_MIN_ROWS * self.in_features:
            out = torch.ops.mkldnn._linear_pointwise(x.float(), self.packed_weight_fp32, self.bias_fp32, "none", [], "")
            return out.to(x.dtype)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        fp32 = f", fp32 copy from {FP32_MIN_ROWS} rows" if self.fp32_copy else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN{fp32}"


def can_pack(model: nn.Module) -> bool:
    """True for a model wholly on the CPU, in a packable dtype, with oneDNN available."""
    if not torch.backends.mkldnn.is_available():
        return False
    params = list(model.parameters())
    if not params or any(p.device.type != "cpu" for p in params) or is_tensor_parallel(model):
        return False
    dtype = params[0].dtype
    if dtype not in PACKABLE_DTYPES:
        return False
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    return not any(hasattr(m, "_hf_hook") for m in model.modules())


def fp32_copy_plan(model: nn.Module, mode: str = "auto") -> list[nn.Linear]:
    """The bf16 layers of `model` that `pack_linears` should give an fp32 copy (see module doc):
    all but the LM head, or none."""
    if mode not in CPU_FP32_GEMM_MODES:
        raise ValueError(f"fp32 copy mode {mode!r}: expected one of {', '.join(CPU_FP32_GEMM_MODES)}")
    candidates = _fp32_candidates(model)
    if mode == "off" or not candidates:
        return []
    if mode == "on":
        return candidates
    extra = sum(linear.weight.numel() * 4 for linear in candidates)
    available = available_memory_bytes()
    fits = extra <= FP32_COPY_MEMORY_SHARE * available
    bf16_ms, fp32_ms = wide_gemm_ms(max(candidates, key=lambda m: m.weight.numel())) if fits else (0.0, 0.0)
    pays = fits and fp32_ms <= (1 - FP32_MIN_GAIN) * bf16_ms
    log.info(
        "fp32 copies for wide GEMMs: %s (%.1f GB, %.1f GB available; %d rows of the widest layer: bf16 %.2f ms, "
        "fp32 %.2f ms)", "on" if pays else "off", extra / 1e9, available / 1e9, FP32_PROBE_ROWS, bf16_ms, fp32_ms,
    )
    return candidates if pays else []


def wide_gemm_ms(linear: nn.Linear, rows: int = FP32_PROBE_ROWS, reps: int = 3) -> tuple[float, float]:
    """Milliseconds of `linear` on `rows` rows through the packed bf16 weight and through a packed fp32
    copy, each the fastest of `reps` calls after a warm-up (another process only ever adds time)."""
    probe = PackedLinear(linear, fp32_copy=True)
    x = torch.randn(rows, linear.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)

    def fastest(fn) -> float:
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times) * 1e3

    with torch.inference_mode():
        bf16 = fastest(lambda: torch.ops.mkldnn._linear_pointwise(x, probe.packed_weight, None, "none", [], ""))
        fp32 = fastest(lambda: probe(x))  # `rows` >= FP32_MIN_ROWS: through the copy
    return bf16, fp32


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
    embedding still reads the original weight). Idempotent: packed layers are skipped.
    """
    if not can_pack(model):
        return 0
    with_copy = {id(m) for m in fp32_copy_plan(model, fp32_copies)}
    places = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
              if type(child) is nn.Linear and child.weight.dtype in PACKABLE_DTYPES]
    replaced = len(places)
    for parent, name in places:  # layer by layer: each original goes as its packed copy comes
        child = getattr(parent, name)
        setattr(parent, name, PackedLinear(child, fp32_copy=id(child) in with_copy))
        del child
    if replaced:
        log.info("packed %d linear layers for oneDNN (%d with fp32 copies)", replaced, len(with_copy))
    return replaced
