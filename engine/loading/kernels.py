"""Which CPU kernels a model's linear layers use, chosen by measuring on this host.

CPUs differ (native bf16 or emulated, AMX or not, AVX-512 or AVX2 only), and so does the fastest
kernel for a layer: weight-only int8 wins where decoding is memory-bound and loses on wide
inputs; bf16 may be emulated. Nothing here assumes a machine: at load, the first real layers of
the model (`probe_layers`: enough of them that their weights come from memory, as in a forward) are
timed for the two shape classes that matter, decode/verify (a few rows) and prefill (many rows),
with the candidate kernels taking turns, and the choice is logged and reported
(`KernelChoice.describe`).

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
AUTO_MODES = ("int8", "w8a8", "int4")  # what "auto" measures
INT4_MIN_GAIN = 1.1  # auto: int4 rounds more than int8, so it must beat the fastest int8 kernel on one row by this
PROBE_MIN_BYTES = 64 << 20  # auto: the layers a forward runs first, as many as hold this many weight bytes, are timed
PROBE_ROUNDS = 7  # auto: each kernel timed this many times on them (the fastest counts), the kernels taking turns
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
    """What was measured on a model's probe layers and what it chose."""

    requested: str  # the quantization asked for: "auto" or one of QUANTIZATION_MODES
    quantization: str  # what the model runs with
    wide_rows: int | None = None  # rows from which a quantized layer runs the dequantized GEMM
    layer: str = ""  # the widest of the probe layers
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


def time_call(fn, x: torch.Tensor | None, repeats: int = 15) -> float:
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


def probe_layers(model: nn.Module) -> tuple[str, list[nn.Linear]] | None:
    """The quantizable linear layers a forward runs first, in model order, until they hold `PROBE_MIN_BYTES`
    of weights, named by the widest of them. Timed one after another, as a forward runs them, their weights
    come from memory, and each shape and its per-call cost count as in a forward: one layer timed over and
    over sits in the cache, which favours the wider unquantized weight and hides what int4 saves."""
    layers = [layer for _, _, layer in quantizable(model, 8)]
    if not layers:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    group, held = [], 0
    for layer in layers:
        if held >= PROBE_MIN_BYTES:
            break
        group.append(layer)
        held += layer.weight.nbytes
    return names.get(id(max(group, key=lambda layer: layer.weight.numel())), "?"), group


def layer_inputs(layers: list[nn.Module], rows: int, dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """Random inputs of `rows` rows for each input width among `layers`."""
    generator = torch.Generator().manual_seed(rows)
    return {n: torch.randn(rows, n, generator=generator).to(dtype) for n in {layer.in_features for layer in layers}}


def time_layers(layers: list[nn.Module], rows: int, dtype: torch.dtype) -> float:
    """Fastest milliseconds of running `layers` one after another on `rows` random rows each (`time_call`;
    fewer repeats for more layers, so that each timing does about the same work)."""
    feeds = layer_inputs(layers, rows, dtype)
    return time_call(lambda _: [layer(feeds[layer.in_features]) for layer in layers], None,
                     repeats=max(3, 15 // len(layers)))


def interleaved_ms(variants: dict[str, list[nn.Module]], dtype: torch.dtype, rounds: int = PROBE_ROUNDS
                   ) -> dict[str, dict[int, float]]:
    """variant -> decode rows -> fastest milliseconds of one pass over its layers, the variants taking turns
    pass by pass, so that a host busy for a while (another tenant's memory traffic) slows them alike. The
    first round warms up."""
    feeds = {rows: layer_inputs(next(iter(variants.values())), rows, dtype) for rows in DECODE_ROWS}
    times: dict[str, dict[int, list[float]]] = {v: {rows: [] for rows in DECODE_ROWS} for v in variants}
    for round_ in range(rounds + 1):
        for rows, x in feeds.items():
            for variant, layers in variants.items():
                t0 = time.perf_counter()
                for layer in layers:
                    layer(x[layer.in_features])
                if round_:
                    times[variant][rows].append(time.perf_counter() - t0)
    return {v: {rows: 1e3 * min(t) for rows, t in by_rows.items()} for v, by_rows in times.items()}


def crossover(quants: list[QuantizedLinear], dtype: torch.dtype) -> int:
    """The row count from which the layers' dequantized GEMMs beat their int kernels (`WIDE_ROW_STEPS`)."""
    for rows in WIDE_ROW_STEPS:
        if time_layers([q.wide for q in quants], rows, dtype) < time_layers(quants, rows, dtype):
            return rows
    return WIDE_ROW_STEPS[-1]


@torch.inference_mode()
def measure_kernels(group: list[nn.Linear], modes: tuple[str, ...], plain_ms: dict[int, float] | None = None,
                    skip_unavailable: bool = False
                    ) -> tuple[dict[str, dict[int, float]], dict[str, int], dict[str, QuantizedLinear]]:
    """Decode-class timings of `group` as the engine would run it unquantized (oneDNN-packed where it packs;
    `plain_ms` if already measured) and quantized as each of `modes` past its measured crossover, all timed
    in turn (`interleaved_ms`); each mode's crossover (the row count from which the dequantized GEMM runs);
    and each mode's quantized copy of the first layer, with its crossover (to install rather than quantize
    that layer again). A mode this host or shape cannot run raises, or with `skip_unavailable` is left out
    (w8a8 without torch's quantized CPU engine, int4 on widths its groups do not divide)."""
    dtype = group[0].weight.dtype
    variants: dict[str, list[nn.Module]] = {}
    if plain_ms is None:
        variants["plain"] = [PackedLinear(m) if can_pack(m) else m for m in group]
    crossovers: dict[str, int] = {}
    for mode in modes:
        try:
            quants = [QuantizedLinear(m, mode_bits(mode), wide_rows=1 << 30, activations=mode == "w8a8")
                      for m in group]
        except ValueError:
            if not skip_unavailable:
                raise
            continue
        crossovers[mode] = crossover(quants, dtype)
        for quant in quants:
            quant.wide_rows = crossovers[mode]
        variants[mode] = quants
    # The quantized layers as the engine runs them, past the crossover too: on a host whose packed bf16 GEMM
    # costs the same at 1 and 4 rows (AMX), the int kernel alone loses at 4 rows, and a choice that summed it
    # there came out either way from one load to the next.
    timings = interleaved_ms(variants, dtype)
    if plain_ms is not None:
        timings["plain"] = plain_ms
    return timings, crossovers, {mode: variants[mode][0] for mode in crossovers}


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


def auto_mode(timings: dict[str, dict[int, float]], measured: list[str]) -> str:
    """What "auto" runs: of the `measured` kernels that pay, the fastest on one row, except that int4 must
    also beat the fastest paying int8 kernel there by `INT4_MIN_GAIN`: its coarser weights make proposals
    that are accepted a little less often (docs/deployment.md), which a small speed gain would not repay."""
    paying = [mode for mode in measured if pays(timings, mode)]
    best = max((m for m in paying if m != "int4"), key=lambda m: gain(timings, m, DECODE_ROWS[0]), default="none")
    one_row = DECODE_ROWS[0]
    if "int4" in paying and timings[best if best != "none" else "plain"][one_row] >= (
            INT4_MIN_GAIN * timings["int4"][one_row]):
        return "int4"
    return best


def choose_and_quantize(model: nn.Module, requested: str | KernelChoice, lm_head: bool = False) -> KernelChoice:
    """Quantize the model's linear layers as `requested` ("auto": `auto_mode` of the kernels measured on the
    probe layers), with the measured crossover. With `lm_head` (the draft), a quantized model's LM head is
    measured too (the body's int8 kernel; for an int4 body, both int8 kernels) and quantized where that is
    faster on its own shape.

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
    probe = probe_layers(model) if cpu else None
    if requested == "none" or probe is None:
        if requested not in ("none", "auto"):
            quantize_linears(model, requested)  # raises the clear error for a non-CPU model
        return KernelChoice(requested, "none")
    name, group = probe
    timings, crossovers, _ = measure_kernels(group, AUTO_MODES if requested == "auto" else (requested,),
                                             skip_unavailable=requested == "auto")
    chosen = requested
    if requested == "auto":
        chosen = auto_mode(timings, list(crossovers))
    wide_rows = crossovers.get(chosen)
    choice = KernelChoice(requested, chosen, wide_rows, name, timings)
    quantize_linears(model, chosen, wide_rows or DEFAULT_WIDE_ROWS)
    log.info("kernels for %s: %s (probe %s, ms per call %s, dequantized GEMM from %s rows)",
             type(model).__name__, chosen, name, timings, wide_rows)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if lm_head and chosen != "none" and type(head) is nn.Linear:
        # The body's own int8 kernel; an int4 body's head is int8 (int4 would round the logits themselves),
        # by whichever int8 kernel is faster on the head's shape.
        modes = ("int8", "w8a8") if chosen == "int4" else (chosen,)
        choose_lm_head(model, head, modes, choice)
        log.info("LM head of %s: %s (ms per call %s)", type(model).__name__, choice.lm_head,
                 choice.lm_head_decode_ms)
    return choice


def choose_lm_head(model: nn.Module, head: nn.Linear, modes: tuple[str, ...], choice: KernelChoice) -> None:
    """Quantize the model's LM head with the fastest of `modes` on one row where it pays on its own shape
    (ties: the first), recording every timing in `choice`."""
    best: tuple[float, str, int, QuantizedLinear] | None = None
    # One copy at a time, the unquantized one first: an LM head's copies are large, and a packed copy alive
    # beside a quantized one raised the load's peak by a third of a GiB on the default draft.
    choice.lm_head_decode_ms = measure_kernels([head], ())[0]
    for mode in modes:
        measured, crossovers, quantized = measure_kernels([head], (mode,), choice.lm_head_decode_ms["plain"],
                                                          skip_unavailable=True)
        if mode not in crossovers:
            continue
        choice.lm_head_decode_ms.update(measured)
        one_row = measured[mode][DECODE_ROWS[0]]
        if pays(measured, mode) and (best is None or one_row < best[0]):
            best = (one_row, mode, crossovers[mode], quantized[mode])
        del quantized
    if best is not None and quantize_lm_head(model, best[2], best[3], best[1]):
        choice.lm_head, choice.lm_head_wide_rows = best[1], best[2]


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
