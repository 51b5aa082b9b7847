"""The shipped head as trained against its w8a8 copy on logged rounds, and online calibration over prompt orders.

For each `heads gen-data` directory given:
- the logit of every candidate from the head as trained and from `w8a8_head` (one row a call, as a round judges
  one sequence), their largest and mean difference, and AUC and ECE of both;
- ECE over the first and the second half of the stream, online calibration against the shipped map, averaged
  over 32 seeded random orders of whole prompts (one order's halves differ by which prompts fall where).

    python docs/benchmarks/scripts/head_w8a8_check.py OUTPUT.json DATA_DIR [DATA_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from engine.head import CANDIDATE_FEATURES, load_head, w8a8_head
from heads.data import load_shards
from heads.evaluate import calibration_halves, head_inputs, predictor_metrics, prompts_shuffled
from heads.shipped import shipped_head_for

ORDERS = 32


@torch.inference_mode()
def row_by_row(head, hidden: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    return torch.cat([head(hidden[i : i + 1], features[i : i + 1]) for i in range(len(hidden))])


def check(head, data_dir: str) -> dict:
    rows = head_inputs(load_shards(data_dir), head.timing)
    hidden, features, label = rows["hidden"].float(), rows["features"], rows["label"]
    trained, quantized = row_by_row(head, hidden, features), row_by_row(w8a8_head(head), hidden, features)
    error = (quantized - trained).abs()
    greedy = features[:, CANDIDATE_FEATURES.index("temperature")] == 0
    halves = [calibration_halves(*(t[order] for t in (trained, label, greedy)), head.config.calibration)
              for order in (prompts_shuffled(rows["seq"], seed) for seed in range(ORDERS))]
    by_order = {}
    for name in ("online", "shipped"):
        first = torch.tensor([h[f"ece_{name}_first_half"] for h in halves])
        second = torch.tensor([h[f"ece_{name}_second_half"] for h in halves])
        by_order[name] = {"ece_first_half": round(float(first.mean()), 5),
                          "ece_second_half": round(float(second.mean()), 5),
                          "orders_with_second_half_lower": int((second < first).sum())}
    return {
        "rows": len(label),
        "logit_error_max": round(float(error.max()), 5),
        "logit_error_mean": round(float(error.mean()), 6),
        "probability_error_max": round(float((head.calibrated(quantized) - head.calibrated(trained)).abs().max()), 6),
        "trained": predictor_metrics(head.calibrated(trained), label),
        "w8a8": predictor_metrics(head.calibrated(quantized), label),
        f"calibration_halves_over_{ORDERS}_prompt_orders": by_order,
    }


def main(output: str, data_dirs: list[str]) -> None:
    head = load_head(shipped_head_for("Qwen2.5-Coder-0.5B-Instruct"))
    result = {"head": "shipped", "data": {Path(d).name: check(head, d) for d in data_dirs}}
    Path(output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
