"""Forwards of the default pair with the row padding `auto` measures at load and without it, side by
side in one process, and whether a few-row call's rows depend on how many rows the call had.

Writes docs/benchmarks/row-padding.json. Each forward feeds 1, 2, 3, 5 or 8 tokens (a decode step or
a verification) after CONTEXT cached tokens, logits included, the cache cropped back after each call:
the median of REPS calls after a warm-up, with and without padding interleaved call by call. The
models run as the engine runs them (the draft with the kernels `auto` chooses here). Then, per layer
shape of the target, the rows of calls of 1 to 8 rows are compared with the same rows inside larger
calls: oneDNN's one-row kernel may sum in another order than its kernel for more rows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from attention_timing import interleaved_forward_ms  # this folder's

from engine.config import EngineConfig
from engine.factory import resolve_paths
from engine.loading.cpu_linear import PackedLinear
from engine.loading.kernels import row_padding_plan
from engine.loading.loader import load_model
from engine.runner import ModelRunner
from specdecpp.bench.machine import machine_record

CONTEXT, TOKENS, REPS, MAX_ROWS = 200, (1, 2, 3, 5, 8), 15, 8


def forward_ms(runner: ModelRunner) -> dict[str, dict[int, float]]:
    """"padded" / "unpadded" -> new tokens -> median ms of one forward after CONTEXT cached tokens."""
    plan = runner.kernels.row_padding
    ms = interleaved_forward_ms(CONTEXT, TOKENS, REPS, {
        "padded": (runner, lambda: row_padding_plan(runner.model, plan)),
        "unpadded": (runner, lambda: row_padding_plan(runner.model, "off"))})
    row_padding_plan(runner.model, plan)
    return ms


@torch.inference_mode()
def row_dependence(runner: ModelRunner) -> dict[str, list[list[int]]]:
    """Layer shape -> the pairs (rows, larger rows) whose unpadded calls give the first rows differently."""
    found: dict[str, list[list[int]]] = {}
    for layer in runner.model.modules():
        if isinstance(layer, PackedLinear) and layer.shape not in found:
            x = torch.randn(MAX_ROWS, layer.in_features).to(layer.packed_weight.dtype)
            out = {rows: layer.compute(x[:rows]) for rows in range(1, MAX_ROWS + 1)}
            found[layer.shape] = [[a, b] for a in out for b in out if a < b and not torch.equal(out[a], out[b][:a])]
    return found


def main(output: Path) -> None:
    torch.set_num_threads(2)
    target_spec, draft_spec, _ = resolve_paths(EngineConfig())
    result: dict = {"context_tokens": CONTEXT, "reps": REPS, "rows": []}
    for role, spec in (("draft", draft_spec), ("target", target_spec)):
        runner = ModelRunner(load_model(spec), quantization="auto" if role == "draft" else "none",
                             quantize_lm_head=role == "draft")
        result[f"{role}_kernels"] = runner.kernels.describe()
        with torch.inference_mode():
            ms = forward_ms(runner)
        for n in TOKENS:
            row = {"model": role, "new_tokens": n, "unpadded_ms": ms["unpadded"][n], "padded_ms": ms["padded"][n]}
            row["speedup"] = row["unpadded_ms"] / row["padded_ms"]
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
        if role == "target":
            result["target_rows_that_differ_by_call_size"] = row_dependence(runner)
        del runner
    result["machine"] = machine_record()
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["target_rows_that_differ_by_call_size"]))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/benchmarks/row-padding.json"))
