"""Time to first token of a 200-token prompt with the default flags: the target alone and specdec++
(threshold auto), alternated, a few requests each, in one process.

Writes the JSON named on the command line. Run it as the host is, or under oneDNN's and aten's AVX2
caps (`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`) to measure what an AVX2-only CPU, whose bf16
is emulated, would see (the machine record says which). The prompt is HumanEval text cut to exactly
`PROMPT_TOKENS` token ids; each request asks for one token after a fresh prefill.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.factory import build_engine
from engine.params import SamplingParams, SpecConfig
from specdecpp.bench.machine import machine_record
from specdecpp.datasets import load_prompts

PROMPT_TOKENS, REQUESTS = 200, 3


def main(output: Path) -> None:
    torch.set_num_threads(2)
    engine = build_engine(EngineConfig())
    text = "\n".join(p.text for p in load_prompts("humaneval", 8, seed=0))
    ids = engine.encode(text)[:PROMPT_TOKENS]
    assert len(ids) == PROMPT_TOKENS, len(ids)
    specs = {"none": SpecConfig(policy="none"), "specdec++ auto": SpecConfig(policy="specdec++")}
    params = SamplingParams(temperature=1.0, max_tokens=2, seed=0, ignore_eos=True)
    ttft: dict[str, list[float]] = {name: [] for name in specs}
    for _ in range(REQUESTS):
        for name, spec in specs.items():
            stats = engine.generate(ids, params, spec).stats
            ttft[name].append(stats["first_token_seconds"])
            print(name, round(stats["first_token_seconds"], 3), flush=True)
    result = {
        "prompt_tokens": PROMPT_TOKENS, "requests": REQUESTS, "machine": machine_record(),
        "kernels": {role: getattr(engine, role).kernels.describe() for role in ("target", "draft")},
        "ttft_s": {name: {"min": min(t), "median": statistics.median(t), "all": t} for name, t in ttft.items()},
    }
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ttft_s"]))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
