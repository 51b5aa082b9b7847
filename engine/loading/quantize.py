"""Quantization of a model's linear layers: int8 weights per channel, int4 per group, or w8a8.

Why: decoding reads every weight once per token, so it is bound by memory traffic; int8 weights
halve it, int4 quarter it. For the draft this is free of risk: only the proposals change, and
rejection sampling keeps the output exactly the target's distribution. Quantizing the target
changes the target (the output is then the quantized target's distribution).

Kernels are torch's maintained ops, no code of our own: weight-only `aten._weight_int8pack_mm` and
`aten._weight_int4pack_mm_for_cpu`, and for w8a8 torch's quantized CPU engine (fbgemm/oneDNN:
`quantized.linear_dynamic`), which quantizes each call's activations to int8 (one scale per call) and
multiplies int8 by int8. On a CPU with int8 dot products (VNNI, AMX) that beats the weight-only kernels,
which widen every weight to bf16 first; its activations carry 8 bits there, 7 elsewhere (without VNNI
the kernel's int16 pair sums would saturate: `int8_dot_products`). w8a8 is approximate in the
activations too: fine for a draft, a bigger change to a target. They shine on a few rows (decode,
verification) and lose on many (prefill, a batch of drafts): from `wide_rows` rows on, a crossover
measured on the host (`engine/loading/kernels.py`), a layer runs the ordinary (oneDNN-packed where
possible) GEMM on a copy of its dequantized weight. That copy costs the unquantized layer's memory
again (twice that where bf16 is emulated: it is kept in fp32, `wide_layer`): the gain is decode
speed, not memory. Both paths compute with the same dequantized values,
so the model is one model whatever the row count. The LM head is left alone unless asked for
(`quantize_lm_head`): the draft's LM head is a large share of a draft step on a small vocabulary-heavy
model, and quantizing it changes only the proposals; the target's stays as loaded.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from engine.config import QUANTIZATION_MODES
from engine.distributed import is_tensor_parallel
from engine.loading.cpu_linear import Fp32Linear, PackedLinear, can_pack, cpu_flags, native_bf16

log = logging.getLogger(__name__)

INT4_GROUP_SIZE = 32  # columns sharing one scale and zero point
DEFAULT_WIDE_ROWS = 32  # rows from which the dequantized GEMM runs (replaced by a host measurement)
QUANTIZE_ROWS = 4096  # output rows quantized at a time (bounds the float32 temporaries)


def int8_dot_products() -> bool:
    """Whether the CPU sums int8 products without int16 saturation (VNNI, AMX-INT8), so that w8a8 may
    quantize activations to 8 bits rather than 7."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def mode_bits(mode: str) -> int:
    """The weight bits of a quantization mode other than "none"."""
    return 4 if mode == "int4" else 8


class QuantizedLinear(nn.Module):
    """A linear layer with int8 or int4 weights, or int8 weights and activations (`activations`: w8a8);
    inference only."""

    def __init__(self, linear: nn.Linear, bits: int, wide_rows: int = DEFAULT_WIDE_ROWS,
                 activations: bool = False) -> None:
        super().__init__()
        if bits not in (4, 8) or (activations and bits != 8):
            raise ValueError(f"bits must be 4 or 8 (8 with int8 activations), not {bits}")
        self.in_features, self.out_features, self.bits = linear.in_features, linear.out_features, bits
        self.wide_rows = wide_rows
        weight = linear.weight.detach()
        self.compute_dtype = weight.dtype
        bias = None if linear.bias is None else linear.bias.detach()
        self.register_buffer("bias", bias, persistent=False)
        if bits == 8:
            self._quantize_int8(weight)
        else:
            self._quantize_int4(weight)
        dequantized = self.dequantized_weight()
        self.dynamic = self._pack_w8a8() if activations else None
        if self.dynamic is not None:  # the packed weight holds the int8 values: no second copy, even at load
            del self.qweight
        self.reduce_range = not int8_dot_products()
        self.wide = wide_layer(dequantized, bias)

    @property
    def mode(self) -> str:
        return "w8a8" if self.dynamic is not None else f"int{self.bits}"

    def _pack_w8a8(self) -> torch.ScriptObject:
        """The int8 weight (bias in fp32) packed for torch's quantized engine."""
        zeros = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # torch flags its quantized tensor type for a future change; its ops stay
            warnings.simplefilter("ignore")
            weight = torch._make_per_channel_quantized_tensor(self.qweight, self.scale.double(), zeros, 0)
            bias = None if self.bias is None else self.bias.float()
            try:
                return torch.ops.quantized.linear_prepack(weight, bias)
            except RuntimeError as error:
                raise ValueError(f"w8a8 needs torch's quantized CPU engine, which this build lacks: {error}") from None

    def _quantize_int8(self, weight: torch.Tensor) -> None:
        """Symmetric, one scale per output channel; `QUANTIZE_ROWS` rows at a time, so that the float32
        temporaries of a large layer (an LM head) stay small next to the model."""
        qweight = torch.empty(weight.shape, dtype=torch.int8)
        scale = torch.empty(weight.shape[0], dtype=torch.float32)
        for start in range(0, weight.shape[0], QUANTIZE_ROWS):
            w = weight[start : start + QUANTIZE_ROWS].float()
            s = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
            qweight[start : start + QUANTIZE_ROWS] = torch.round(w / s[:, None]).clamp(-127, 127)
            scale[start : start + QUANTIZE_ROWS] = s
        self.register_buffer("qweight", qweight, persistent=False)
        self.register_buffer("scale", scale.to(self.compute_dtype), persistent=False)

    def _quantize_int4(self, weight: torch.Tensor) -> None:
        """Asymmetric, one scale and minimum per group of `INT4_GROUP_SIZE` input columns."""
        if self.in_features % INT4_GROUP_SIZE:
            raise ValueError(f"int4 needs in_features divisible by {INT4_GROUP_SIZE}, got {self.in_features}")
        groups = weight.float().view(self.out_features, -1, INT4_GROUP_SIZE)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15.0).clamp_min(1e-12)
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
        q = q.view(self.out_features, self.in_features)
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), persistent=False)
        # The kernel computes (q - 8) * scale + zero; ours is q * scale + low.
        zeros = low + 8 * scale
        scales_and_zeros = torch.stack([scale, zeros], dim=-1).transpose(0, 1).contiguous()  # [groups, N, 2]
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(self.compute_dtype), persistent=False)
        nibbles = q.to(torch.uint8).view(self.out_features, -1, 2)  # two 4-bit values a byte, for the wide path
        self.register_buffer("_q4", nibbles[..., 0] | (nibbles[..., 1] << 4), persistent=False)
        self.register_buffer("_low", low.to(self.compute_dtype), persistent=False)
        self.register_buffer("_scale4", scale.to(self.compute_dtype), persistent=False)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the quantized layer stands for, [out, in], in the compute dtype."""
        if self.bits == 8:  # a w8a8 layer's int8 values live in its packed weight only
            qweight = self.qweight if hasattr(self, "qweight") else torch.ops.quantized.linear_unpack(
                self.dynamic)[0].int_repr()
            return qweight.to(self.compute_dtype).mul_(self.scale[:, None])  # in place: one temporary
        q = torch.stack([self._q4 & 15, self._q4 >> 4], dim=-1).view(self.out_features, -1, INT4_GROUP_SIZE)
        q = q.to(self.compute_dtype)
        return (q * self._scale4[..., None] + self._low[..., None]).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features).to(self.compute_dtype)
        if rows.shape[0] >= self.wide_rows:
            return self.wide(rows).view(*shape[:-1], self.out_features)
        if self.dynamic is not None:  # the bias is packed with the weight
            out = torch.ops.quantized.linear_dynamic(rows.float(), self.dynamic, self.reduce_range)
            return out.to(self.compute_dtype).view(*shape[:-1], self.out_features)
        if self.bits == 8:
            out = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), self.qweight, self.scale)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                rows.contiguous(), self.qweight, INT4_GROUP_SIZE, self.scales_and_zeros
            )
        if self.bias is not None:
            out = out + self.bias
        return out.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.mode}, "
                f"dequantized GEMM from {self.wide_rows} rows")


def wide_layer(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """The layer a quantized one runs on many rows: an ordinary linear layer on the dequantized
    weight, oneDNN-packed where the host packs it, in fp32 where bf16 is emulated (twice the memory)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)  # no initialisation, no second copy
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    if not can_pack(linear):
        return linear
    if weight.dtype == torch.bfloat16 and not native_bf16():
        return Fp32Linear(weight, bias)  # bf16 is emulated here: wide inputs run faster in fp32
    return PackedLinear(linear)


def quantizable(model: nn.Module, bits: int) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) of every plain linear layer but the LM head that `bits` supports (not the
    shards of a tensor-parallel model: their weights are DTensors)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is not nn.Linear or child is head or child.weight.device.type != "cpu":
                continue
            if is_tensor_parallel(child):
                continue
            if bits == 4 and child.in_features % INT4_GROUP_SIZE:
                continue
            found.append((parent, name, child))
    return found


def quantize_lm_head(model: nn.Module, wide_rows: int = DEFAULT_WIDE_ROWS,
                     quantized: QuantizedLinear | None = None, mode: str = "int8") -> bool:
    """Replace the model's LM head by an int8 (or w8a8) `QuantizedLinear` (`quantized`, one already made
    from it, or a new one), in place; False where it is not a plain CPU linear layer. A tied input
    embedding keeps reading the original weight."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.weight.device.type != "cpu" or is_tensor_parallel(head):
        return False
    model.set_output_embeddings(quantized or QuantizedLinear(head, 8, wide_rows, activations=mode == "w8a8"))
    log.info("quantized the LM head to %s (dequantized GEMM from %d rows)", mode, wide_rows)
    return True


def quantize_linears(model: nn.Module, mode: str, wide_rows: int = DEFAULT_WIDE_ROWS) -> int:
    """Replace the model's linear layers (all but the LM head) by `QuantizedLinear`, in place.

    Returns how many were replaced. CPU models only: on CUDA the torchao path is the one to use,
    and it is not wired here yet, so a CUDA model is refused clearly.
    """
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"quantization {mode!r}: expected one of {', '.join(QUANTIZATION_MODES)}")
    if mode == "none":
        return 0
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("quantization is implemented for CPU models only")
    bits = mode_bits(mode)
    layers = quantizable(model, bits)
    count = len(layers)
    while layers:  # layer by layer, and each original goes as its replacement comes: never two whole models
        parent, name, child = layers.pop()
        setattr(parent, name, QuantizedLinear(child, bits, wide_rows, activations=mode == "w8a8"))
        del child
    log.info("quantized %d linear layers to %s (dequantized GEMM from %d rows)", count, mode, wide_rows)
    return count
