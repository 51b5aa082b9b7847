"""Host memory of loading the default pair, per configuration, each in a fresh process.

Writes docs/benchmarks/load-memory.json: for each configuration, the engine's own load record
(`engine.load_memory`: bytes each model holds, RSS before and after the load and its peak), as the
server logs it and its /v1/models card shows it. A fresh process per configuration, so each peak is
that load's alone. The cost model comes from a file (`--cost-model`), so the load is what is measured,
not the start-up timing forwards; the kernel chooser still times its layers, as a server's load does.
Each configuration loads twice: tensor by tensor (the engine's loader) and memory-mapped (transformers'
own loading, which the engine used before).

    python docs/benchmarks/scripts/load_memory.py docs/benchmarks/load-memory.json [COST_MODEL_JSON]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CONFIGS = {  # name -> EngineConfig fields (SPECDECPP_LOAD_CONFIGS: a "|"-separated subset of the names)
    "default (bf16, draft quantization auto)": {},
    "bf16, nothing quantized": {"draft_quantization": "none"},
    "bf16, --target-quantization int8": {"target_quantization": "int8"},
    "--dtype fp32": {"dtype": "fp32"},
}

LOADERS = ("tensor by tensor", "memory-mapped")  # the engine's; transformers' own (before the change)

CHILD = """
import json, sys, torch
torch.set_num_threads(2)
import engine.loading.loader as loader
from engine.config import EngineConfig
from engine.factory import build_engine
if sys.argv[2] == "memory-mapped":  # transformers' own loading, the files memory-mapped
    loader.safetensors_files = lambda location: []
engine = build_engine(EngineConfig(**json.loads(sys.argv[1])))
print("LOAD_MEMORY " + json.dumps(engine.load_memory))
"""


def measure(fields: dict, loader: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(fields), loader], capture_output=True,
                          text=True, check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("LOAD_MEMORY "))
    return json.loads(line.removeprefix("LOAD_MEMORY "))


def main(output: Path, cost_model: str | None) -> None:
    from specdecpp.bench.machine import machine_record

    rows = []
    names = os.environ.get("SPECDECPP_LOAD_CONFIGS")
    for name, fields in CONFIGS.items():
        if names and name not in names.split("|"):
            continue
        fields = fields | ({"cost_model": cost_model} if cost_model else {})
        for loader in LOADERS:
            record = measure(fields, loader)
            held = sum(record["held_cpu_bytes"].values())
            rows.append({"config": name, "loader": loader, "fields": fields, **record, "held_total_bytes": held})
            print(f"{name}, {loader}: held {held / 2**30:.2f} GiB, RSS after {record['rss_bytes'] / 2**30:.2f} GiB, "
                  f"peak {record['peak_rss_bytes'] / 2**30:.2f} GiB (a rise of {record['peak_rise_over_held']}x "
                  "the held bytes)", file=sys.stderr, flush=True)
    output.write_text(json.dumps({"machine": machine_record(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
