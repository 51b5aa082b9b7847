"""The draft's step with and without an int8 LM head, next to the target's forward, in one process.

Writes docs/benchmarks/kernels-lm-head.json. Each forward is one token after `CONTEXT` tokens of
cache, the fastest of `REPS` after a warm-up (other processes only ever add time). The draft runs
as the engine runs it: int8 decoder layers (the kernel choice the host makes), then its LM head
oneDNN-packed in bf16, then that head in int8.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from step_timing import context_cache, timed_step

from engine.config import EngineConfig
from engine.factory import resolve_paths
from engine.loading.loader import load_model
from engine.runner import ModelRunner
from specdecpp.bench.machine import machine_record

CONTEXT, REPS = 200, 9


def step_seconds(runner: ModelRunner) -> float:
    """One token after CONTEXT tokens, as a draft step or a target-alone step runs: the fastest of REPS."""
    ids = torch.randint(0, runner.vocab_size, (CONTEXT,))
    cache = context_cache(runner, ids)
    times = [timed_step(runner, cache, ids[i : i + 1], CONTEXT) for i in range(REPS + 1)]
    return min(times[1:])


def main(output: Path) -> None:
    torch.set_num_threads(2)
    target_spec, draft_spec, _ = resolve_paths(EngineConfig())
    draft = ModelRunner(load_model(draft_spec), quantization="auto", quantize_lm_head=True)
    chosen = draft.kernels  # what the engine's chooser decides here, LM head included
    result = {"context_tokens": CONTEXT, "reps": REPS, "draft_kernels": chosen.describe()}
    for head in ("bf16", "int8"):  # the same decoder layers, the LM head forced either way
        forced = replace(chosen, lm_head="int8" if head == "int8" else "none",
                         lm_head_wide_rows=chosen.lm_head_wide_rows or chosen.wide_rows)
        draft = ModelRunner(load_model(draft_spec), quantization=forced)
        result[f"draft_step_ms_lm_head_{head}"] = 1e3 * step_seconds(draft)
    del draft
    target = ModelRunner(load_model(target_spec))
    result["target_forward_ms"] = 1e3 * step_seconds(target)
    for head in ("bf16", "int8"):
        ratio = result[f"draft_step_ms_lm_head_{head}"] / result["target_forward_ms"]
        result[f"draft_over_target_lm_head_{head}"] = ratio
    result["machine"] = machine_record()
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/benchmarks/kernels-lm-head.json"))
