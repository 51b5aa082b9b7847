"""The target's one-token forward in bf16 and with `--target-quantization int8`, side by side in one process.

Writes docs/benchmarks/kernels-target-int8.json. This host's speed drifts by up to 2x within an hour
(other tenants), so the two are timed alternately, call by call, on two loaded copies of the target:
each forward is one token after `CONTEXT` tokens of cache, and each model's figure is the fastest and
the median of `REPS` calls. The int8 copy runs as `--target-quantization int8` makes it (int8 decoder
layers with the measured crossover, oneDNN-packed what stays unquantized; the LM head as loaded).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch
from step_timing import context_cache, timed_step

from engine.config import EngineConfig
from engine.factory import resolve_paths
from engine.loading.loader import load_model
from engine.runner import ModelRunner
from specdecpp.bench.machine import machine_record

CONTEXT, REPS = 200, 21


def main(output: Path) -> None:
    torch.set_num_threads(2)
    target_spec = resolve_paths(EngineConfig())[0]
    runners = {"bf16": ModelRunner(load_model(target_spec)), "int8": ModelRunner(load_model(target_spec),
                                                                                  quantization="int8")}
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, runners["bf16"].vocab_size, (CONTEXT + REPS + 1,), generator=generator)
    caches = {name: context_cache(runner, ids[:CONTEXT]) for name, runner in runners.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(REPS + 1):  # the first call of each is a warm-up
        for name, runner in runners.items():
            elapsed = timed_step(runner, caches[name], ids[CONTEXT + i : CONTEXT + i + 1], CONTEXT)
            if i:
                times[name].append(elapsed)
    result = {
        "context_tokens": CONTEXT, "reps": REPS, "machine": machine_record(),
        "target_kernels": {name: r.kernels.describe() for name, r in runners.items()},
        "forward_ms": {name: {"min": 1e3 * min(t), "median": 1e3 * statistics.median(t)} for name, t in times.items()},
    }
    result["int8_speedup"] = {k: result["forward_ms"]["bf16"][k] / result["forward_ms"]["int8"][k]
                              for k in ("min", "median")}
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["forward_ms"]), json.dumps(result["int8_speedup"]))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
