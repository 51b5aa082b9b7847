"""Which CPU kernels a model's linear layers use, chosen by measuring on this host.

CPUs differ (native bf16 or emulated, AMX or not, AVX-512 or AVX2 only), and so does the fastest
kernel for a layer: weight-only int8 wins where decoding is memory-bound and loses on wide
inputs; bf16 may be emulated. Nothing here assumes a machine: at load, one real layer of the
model is timed for the two shape classes that matter, decode/verify (a few rows) and prefill
(many rows), and the choice is logged and reported (`KernelChoice.describe`).

A few rows are not always cheapest computed as they are: on a host where oneDNN's one- and two-row
kernels stream the weights more slowly than its kernel for four, computing one row as the first of
four is faster, and over a whole forward, with the weights coming from memory rather than cache,
the difference is large. So `auto` times each group of same-shaped layers, one after another as a
forward runs them, at every row count below `ROW_PADDING_LIMIT`, and pads an input to the
cheapest count at or above its own where that is at least `ROW_PADDING_MIN_GAIN` faster
(`row_padding_plan`). A padded input's rows come out exactly as the rows of that larger call.
Groups small enough to stay in cache are left alone.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from engine.config import ROW_PADDING_MODES
from engine.loading.cpu_linear import PackedLinear, can_pack, cpu_flags, native_bf16
from engine.loading.quantize import (
    DEFAULT_WIDE_ROWS,
    QUANTIZATION_MODES,
    QuantizedLinear,
    mode_bits,
    quantizable,
    quantize_linears,
    quantize_lm_head,
)

log = logging.getLogger(__name__)

DECODE_ROWS = (1, 4)  # the decode/verify class: one token per sequence, a few candidates
WIDE_ROW_STEPS = (2, 4, 8, 16, 32, 64, 128)  # candidates for the int8 -> dequantized GEMM crossover
AUTO_MIN_GAIN = 1.1  # "auto" quantizes only when one row measures at least this much faster (`pays`)
AUTO_MODES = ("int8", "w8a8")  # what "auto" measures: the int8 kernels (int4 loses accuracy for little more speed)
ROW_PADDING_LIMIT = 9  # auto: row counts 1 .. LIMIT - 1 (decode, verification of a few candidates) may be padded
ROW_PADDING_MIN_GAIN = 0.05  # auto: ... to a larger count measured at least this share faster
ROW_PADDING_MIN_BYTES = 32 << 20  # auto: only groups of layers whose weights together outgrow the caches
ROW_PADDING_REPS = 3  # auto: each count timed this many times after a warm-up (the fastest counts)

RowPadding = dict[str, dict[int, int]]  # "in x out" of a group of layers -> rows -> rows computed
CPU_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8",
                         "amx_tile")


def cpu_features() -> dict:
    """What the host CPU offers, as far as kernel choice cares."""
    flags = cpu_flags()
    return {
        "flags": [f for f in CPU_FLAGS_OF_INTEREST if f in flags],
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16(),
    }


@dataclass
class KernelChoice:
    """What was measured on one layer of a model and what it chose."""

    requested: str  # the quantization asked for: "auto" or one of QUANTIZATION_MODES
    quantization: str  # what the model runs with
    wide_rows: int | None = None  # rows from which a quantized layer runs the dequantized GEMM
    layer: str = ""
    decode_ms: dict[str, dict[int, float]] = field(default_factory=dict)  # kernel -> rows -> ms per call
    lm_head: str = "none"  # the LM head's quantization, "int8" or "w8a8" (asked for the draft only)
    lm_head_wide_rows: int | None = None
    lm_head_decode_ms: dict[str, dict[int, float]] = field(default_factory=dict)
    fp32_copies: int = 0  # bf16 layers given an fp32 copy for wide inputs (engine/loading/cpu_linear.py) ...
    fp32_min_rows: int | None = None  # ... used from this many rows on
    attention: str = "sdpa"  # transformers' attention implementation the model runs (engine/loading/attention.py)
    row_padding: dict[str, dict[int, int]] = field(default_factory=dict)  # by layer shape: rows -> rows computed

    def describe(self) -> dict:
        return asdict(self)


def time_call(fn, x: torch.Tensor, repeats: int = 15) -> float:
    """Fastest milliseconds of fn(x) over `repeats` calls after two warm-up calls: the minimum is
    what the kernel costs; slower calls measure whatever else the host was doing."""
    fn(x)
    fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def probe_layer(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """The widest quantizable linear layer of the model (a real shape, most of the decode cost)."""
    layers = quantizable(model, 8)
    if not layers:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    parent, attr, layer = max(layers, key=lambda item: item[2].weight.numel())
    return f"{names.get(id(parent), '?')}.{attr}", layer


@torch.inference_mode()
def measure_layer(layer: nn.Linear, mode: str, plain_ms: dict[int, float] | None = None
                  ) -> tuple[dict[str, dict[int, float]], int, QuantizedLinear]:
    """Decode-class timings of the layer as the engine would run it unquantized (oneDNN-packed where
    it packs; `plain_ms` if already measured) and quantized as `mode`, the row count from which the
    dequantized GEMM beats the kernel, and the quantized layer timed, with that crossover (to install
    rather than quantize the layer again)."""
    dtype = layer.weight.dtype
    inputs = {rows: torch.randn(rows, layer.in_features, dtype=dtype) for rows in DECODE_ROWS}
    if plain_ms is None:
        plain = PackedLinear(layer) if can_pack(layer) else layer
        plain_ms = {rows: time_call(plain, x) for rows, x in inputs.items()}
        del plain  # a packed copy: gone before the quantized one comes (an LM head's copies are large)
    timings: dict[str, dict[int, float]] = {"plain": plain_ms}
    # The int kernel at every row count, for now.
    quant = QuantizedLinear(layer, mode_bits(mode), wide_rows=1 << 30, activations=mode == "w8a8")
    wide_rows = WIDE_ROW_STEPS[-1]
    for rows in WIDE_ROW_STEPS:
        x = torch.randn(rows, layer.in_features, dtype=dtype)
        if time_call(quant.wide, x) < time_call(quant, x):
            wide_rows = rows
            break
    quant.wide_rows = wide_rows
    # The quantized layer as the engine runs it, past the crossover too: on a host whose packed bf16 GEMM costs
    # the same at 1 and 4 rows (AMX), the int kernel alone loses at 4 rows, and a choice that summed it there
    # came out either way from one load to the next.
    timings[mode] = {rows: time_call(quant, x) for rows, x in inputs.items()}
    return timings, wide_rows, quant


def gain(timings: dict[str, dict[int, float]], kernel: str, rows: int | None = None) -> float:
    """How many times faster the layer quantized as `kernel` (with its crossover) runs the decode class (or
    `rows` rows alone) than the unquantized layer."""
    if rows is not None:
        return timings["plain"][rows] / timings[kernel][rows]
    return sum(timings["plain"].values()) / sum(timings[kernel].values())


def pays(timings: dict[str, dict[int, float]], kernel: str = "int8") -> bool:
    """Whether "auto" quantizes: at least `AUTO_MIN_GAIN` faster on one row (a draft step, one sequence's
    decode: what a quantized draft is for) and not slower over the decode class. The one-row gain is the
    signal; a criterion on the class's sum alone sat near its threshold on a host whose bf16 GEMM costs
    the same at 1 and 4 rows, and went either way from one load to the next."""
    return gain(timings, kernel, DECODE_ROWS[0]) >= AUTO_MIN_GAIN and gain(timings, kernel) >= 1.0


def choose_and_quantize(model: nn.Module, requested: str | KernelChoice, lm_head: bool = False) -> KernelChoice:
    """Quantize the model's linear layers as `requested` ("auto": the int8 kernel, weight-only or w8a8,
    whose decode class measures fastest, where it beats the unquantized kernel on this host), with the
    measured crossover. With `lm_head` (the draft), a quantized model's LM head is measured too (int8, or
    w8a8 for a w8a8 model) and quantized where that is faster on its own shape.

    A KernelChoice is replayed without measuring: ranks of a tensor-parallel engine run the draft
    with rank 0's choice, so that they propose alike."""
    if isinstance(requested, KernelChoice):
        quantize_linears(model, requested.quantization, requested.wide_rows or DEFAULT_WIDE_ROWS)
        head_rows = requested.lm_head_wide_rows or DEFAULT_WIDE_ROWS
        if requested.lm_head != "none" and not quantize_lm_head(model, head_rows, mode=requested.lm_head):
            raise ValueError("the kernel choice quantizes the LM head, and this model's cannot be: its proposals "
                             "would differ from the chooser's")
        return requested
    if requested != "auto" and requested not in QUANTIZATION_MODES:
        raise ValueError(f"quantization {requested!r}: expected auto or one of {', '.join(QUANTIZATION_MODES)}")
    cpu = all(p.device.type == "cpu" for p in model.parameters())
    probe = probe_layer(model) if cpu else None
    if requested == "none" or probe is None:
        if requested not in ("none", "auto"):
            quantize_linears(model, requested)  # raises the clear error for a non-CPU model
        return KernelChoice(requested, "none")
    name, layer = probe
    timings: dict[str, dict[int, float]] = {}
    crossovers: dict[str, int] = {}
    for mode in AUTO_MODES if requested == "auto" else (requested,):
        try:
            measured, crossovers[mode], _ = measure_layer(layer, mode, timings.get("plain"))  # plain: once
        except ValueError:  # w8a8 where torch has no quantized CPU engine: auto keeps to the others
            if requested != "auto":
                raise
            continue
        timings.update(measured)
    chosen = requested
    if requested == "auto":
        paying = [mode for mode in crossovers if pays(timings, mode)]
        chosen = max(paying, key=lambda mode: gain(timings, mode, DECODE_ROWS[0]), default="none")
    wide_rows = crossovers.get(chosen)
    choice = KernelChoice(requested, chosen, wide_rows, name, timings)
    quantize_linears(model, chosen, wide_rows or DEFAULT_WIDE_ROWS)
    log.info("kernels for %s: %s (probe %s, ms per call %s, dequantized GEMM from %s rows)",
             type(model).__name__, chosen, name, timings, wide_rows)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if lm_head and chosen != "none" and type(head) is nn.Linear:
        head_mode = "w8a8" if chosen == "w8a8" else "int8"
        choice.lm_head_decode_ms, head_wide_rows, quantized_head = measure_layer(head, head_mode)
        if pays(choice.lm_head_decode_ms, head_mode) and quantize_lm_head(
                model, head_wide_rows, quantized_head, head_mode):
            choice.lm_head, choice.lm_head_wide_rows = head_mode, head_wide_rows
        log.info("LM head of %s: %s (ms per call %s)", type(model).__name__, choice.lm_head,
                 choice.lm_head_decode_ms)
    return choice


def padding_plan(ms: dict[int, float], min_gain: float = ROW_PADDING_MIN_GAIN) -> dict[int, int]:
    """Rows -> the row count to compute them as, from milliseconds by row count: the cheapest count at
    or above, where it beats the count itself by `min_gain`; counts kept as they are are left out."""
    plan = {}
    for rows, own in ms.items():
        cheapest = min((r for r in ms if r >= rows), key=lambda r: (ms[r], r))
        if ms[cheapest] <= (1 - min_gain) * own:
            plan[rows] = cheapest
    return plan


def few_rows_ms(layers: list[PackedLinear], reps: int = ROW_PADDING_REPS) -> dict[int, float]:
    """Milliseconds of running `layers` one after another, unpadded, at each row count below
    `ROW_PADDING_LIMIT`: the fastest of `reps` passes after a warm-up, the counts interleaved pass by pass
    so that a host busy for a while slows them alike."""
    generator = torch.Generator().manual_seed(0)
    counts = range(1, ROW_PADDING_LIMIT)
    inputs = {rows: torch.randn(rows, layers[0].in_features, generator=generator).to(layers[0].packed_weight.dtype)
              for rows in counts}
    times: dict[int, list[float]] = {rows: [] for rows in counts}
    with torch.inference_mode():
        for rep in range(reps + 1):
            for rows, x in inputs.items():
                t0 = time.perf_counter()
                for layer in layers:
                    layer.compute(x)
                if rep:  # the first pass warms up
                    times[rows].append(time.perf_counter() - t0)
    return {rows: 1e3 * min(t) for rows, t in times.items()}


def row_padding_plan(model: nn.Module, mode: str | RowPadding = "auto") -> RowPadding:
    """Set the row padding of the model's packed layers, by groups of one shape: measured by "auto"
    (`few_rows_ms`, `padding_plan`; groups under `ROW_PADDING_MIN_BYTES` of weights are not), none by
    "off", or as given (a plan measured elsewhere: tensor-parallel ranks replay rank 0's for their
    draft replica, so that they propose alike). Returns the plan in force."""
    if isinstance(mode, str) and mode not in ROW_PADDING_MODES:
        raise ValueError(f"row padding {mode!r}: expected one of {', '.join(ROW_PADDING_MODES)}")
    # A quantized layer's dequantized copy (a PackedLinear inside it) only serves wide inputs.
    inside_quantized = {id(m) for q in model.modules() if isinstance(q, QuantizedLinear) for m in q.modules()}
    groups: dict[str, list[PackedLinear]] = {}
    for module in model.modules():
        if isinstance(module, PackedLinear) and id(module) not in inside_quantized:
            module.pad_rows = {}
            groups.setdefault(module.shape, []).append(module)
    if mode == "off":
        return {}
    plan: RowPadding = {}
    for shape, layers in groups.items():
        if isinstance(mode, dict):
            padding = mode.get(shape, {})
        elif sum(layer.packed_weight.nbytes for layer in layers) >= ROW_PADDING_MIN_BYTES:
            padding = padding_plan(few_rows_ms(layers))
        else:
            padding = {}
        for layer in layers:
            layer.pad_rows = dict(padding)
        if padding:
            plan[shape] = padding
    if plan:
        log.info("rows padded, by layer shape: %s", plan)
    return plan
