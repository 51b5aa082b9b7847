"""The kernels report: offline bench runs that differ by quantization, side by side with the
forward costs measured on the same host (`specdecpp bench kernels`)."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean


def _ttft(checkpoint: Path) -> dict[tuple, float]:
    """Mean time to first token per (policy, knob) over the run's checkpoint records."""
    firsts: dict[tuple, list[float]] = {}
    for line in checkpoint.read_text().splitlines()[1:]:
        record = json.loads(line)
        first = record["stats"].get("first_token_seconds")
        if first is not None:
            firsts.setdefault((record["policy"], record["knob"]), []).append(first)
    return {key: mean(values) for key, values in firsts.items()}


def kernel_rows(run: Path, costs: Path | None) -> list[dict]:
    """One row per bench row of `run` (an offline bench JSON beside its checkpoint), with the draft
    and target forward costs of `costs` (a cost model JSON measured with the same quantization), or,
    without it, of the cost model the run's engine measured at its start."""
    bench = json.loads(run.read_text())
    models = bench["meta"].get("models", {})
    cost = json.loads(costs.read_text()) if costs is not None else bench["meta"].get("cost_model_at_start")
    if cost is None:
        raise ValueError(f"{run} records no cost model (a run from before they were recorded): pass its COSTS file")
    ttft = _ttft(run.with_suffix(".checkpoint.jsonl"))
    return [{
        "run": run.name,
        "label": row["label"],
        "policy": row["policy"],
        "knob": row["knob"],
        "draft_quantization": models.get("draft_quantization", "none"),
        "target_quantization": models.get("target_quantization", "none"),
        "tokens_per_s": row["tokens_per_s"],
        "speedup": row["speedup"],
        "draft_forward_ms": 1e3 * cost["draft_step"],
        "target_forward_ms": 1e3 * cost["target"]["1"],
        "ttft_s": ttft.get((row["policy"], row["knob"])),
        "comparable_within": run.name,
    } for row in bench["rows"]]


def write_kernels_report(pairs: list[tuple[Path, Path | None]], output: Path, notes: list[str]) -> list[Path]:
    rows = [row for run, costs in pairs for row in kernel_rows(run, costs)]
    sources = [[str(r), str(c) if c is not None else f"{r} (meta.cost_model_at_start)"] for r, c in pairs]
    output.write_text(json.dumps({"rows": rows, "notes": notes, "sources": sources}, indent=2) + "\n")
    lines = ["# Kernels: quantized models, side by side", "", *[f"- {n}" for n in notes], "",
             "| run | row | draft | target | tok/s | speedup vs none (same run) | draft fwd ms | target fwd ms "
             "| TTFT s |", "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['label']} | {r['draft_quantization']} | {r['target_quantization']} "
                     f"| {r['tokens_per_s']:.2f} | {r['speedup']:.3f} | {r['draft_forward_ms']:.0f} "
                     f"| {r['target_forward_ms']:.0f} | {r['ttft_s']:.2f} |")
    md = output.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    return [output, md]
