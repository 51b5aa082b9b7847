"""Paired comparison of two offline-benchmark runs over the same prompts and seeds, by prompt.

Usage: python docs/benchmarks/scripts/compare_runs.py A.checkpoint.jsonl B.checkpoint.jsonl OUT.json

For every (policy, knob) row both runs have: tokens/s of A over B (ratios of sums over prompts), and the
same ratio with each run's speedup over its own target-alone row, which takes out a host that drifted
between the two runs. 95% intervals resample prompts jointly for all four rows (2,000 resamples).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def per_prompt(path: Path) -> dict[tuple[str, str], dict[str, tuple[float, float]]]:
    """(policy, knob) -> prompt id -> (generated tokens, wall seconds)."""
    rows: dict[tuple[str, str], dict[str, tuple[float, float]]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "stats" not in record or record["temperature"] != 1.0:
            continue
        stats = record["stats"]
        key = (record["policy"], str(record["knob"]))
        rows.setdefault(key, {})[record["prompt_id"]] = (stats["generated_tokens"], stats["total_seconds"])
    return rows


def main(a_path: str, b_path: str, out: str) -> None:
    a, b = per_prompt(Path(a_path)), per_prompt(Path(b_path))
    none = ("none", "None")
    prompts = sorted(set(a[none]) & set(b[none]))
    rng = np.random.default_rng(0)
    index = rng.integers(0, len(prompts), size=(2000, len(prompts)))

    def arrays(run, key):
        tokens = np.array([run[key][p][0] for p in prompts], dtype=np.float64)
        seconds = np.array([run[key][p][1] for p in prompts], dtype=np.float64)
        return tokens, seconds

    def rate(tokens, seconds, idx=None):
        return tokens.sum() / seconds.sum() if idx is None else tokens[idx].sum(1) / seconds[idx].sum(1)

    results = []
    for key in sorted(set(a) & set(b)):
        if not all(p in a[key] and p in b[key] for p in prompts):
            continue
        ra, rb, na, nb = arrays(a, key), arrays(b, key), arrays(a, none), arrays(b, none)
        raw = rate(*ra) / rate(*rb)
        normalised = (rate(*ra) / rate(*na)) / (rate(*rb) / rate(*nb))
        boot_raw = rate(*ra, index) / rate(*rb, index)
        boot_norm = (rate(*ra, index) / rate(*na, index)) / (rate(*rb, index) / rate(*nb, index))
        results.append({
            "policy": key[0], "knob": key[1], "prompts": len(prompts),
            "a_tokens_per_s": rate(*ra), "b_tokens_per_s": rate(*rb),
            "ratio": raw, "ratio_ci95": list(np.percentile(boot_raw, [2.5, 97.5])),
            "speedup_ratio": normalised, "speedup_ratio_ci95": list(np.percentile(boot_norm, [2.5, 97.5])),
        })
    Path(out).write_text(json.dumps({"a": a_path, "b": b_path, "rows": results}, indent=2) + "\n")
    for r in results:
        print(f"{r['policy']} {r['knob']}: {r['a_tokens_per_s']:.2f} vs {r['b_tokens_per_s']:.2f} tok/s, "
              f"ratio {r['ratio']:.3f} [{r['ratio_ci95'][0]:.3f}, {r['ratio_ci95'][1]:.3f}], speedup ratio "
              f"{r['speedup_ratio']:.3f} [{r['speedup_ratio_ci95'][0]:.3f}, {r['speedup_ratio_ci95'][1]:.3f}]")


if __name__ == "__main__":
    main(*sys.argv[1:4])
