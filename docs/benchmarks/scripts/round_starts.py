"""How a round starts, live: acceptance per proposed candidate by what ended the round before it.

Runs the bench's HumanEval prompts and seeds (T=1) through the default engine under constant k and
threshold "auto", one request at a time, and records every verified round (the engine's round
recorder). A round starts first (after the prefill's token), after a rejection (the target's
correction), or after a round whose candidates were all accepted (the target's bonus token; for
"auto" also after a round its head stopped). The offline evaluator's rounds replay scores every rule
on the logging rule's starts; this measures how much the start matters.

    python docs/benchmarks/scripts/round_starts.py [PROMPTS] [MAX_TOKENS]

Writes docs/benchmarks/round-starts-humaneval.json.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from engine.config import EngineConfig, SpecConfig
from engine.factory import build_engine
from engine.params import SamplingParams
from engine.speculate import RoundRecord
from specdecpp.bench.machine import machine_record
from specdecpp.bench.offline import BenchConfig
from specdecpp.datasets import humaneval_prompts

POLICIES = (BenchConfig("constant", 5, 1.0), BenchConfig("specdec++", "auto", 1.0))
OUT = Path(__file__).resolve().parents[1] / "round-starts-humaneval.json"


def start_types(rounds: list[tuple[int, int]]) -> list[str]:
    """The start of each of a request's rounds (candidates, accepted), in order."""
    types = []
    for i, _ in enumerate(rounds):
        if i == 0:
            types.append("first")
        else:
            proposed, accepted = rounds[i - 1]
            types.append("after_rejection" if accepted < proposed else "after_all_accepted")
    return types


def main() -> None:
    torch.set_num_threads(2)
    num_prompts = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    max_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 48
    engine = build_engine(EngineConfig())
    prompts = humaneval_prompts(num_prompts)
    bounds = SpecConfig().bounds
    records: list[RoundRecord] = []
    engine.recorder = records.append
    results = {}
    for config in POLICIES:
        engine.generate(prompts[0].messages, SamplingParams(temperature=1.0, seed=0, max_tokens=8), config.spec(bounds))
        records.clear()
        tokens, wall = 0, 0.0
        for i, prompt in enumerate(prompts):
            start = time.perf_counter()
            params = SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens)
            completion = engine.generate(prompt.messages, params, config.spec(bounds))
            wall += time.perf_counter() - start
            tokens += len(completion.token_ids)
        by_request: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for record in records:
            by_request[record.request_id].append((len(record.accept_prob), record.accepted))
        table: dict[str, dict[str, float]] = defaultdict(lambda: {"rounds": 0, "proposed": 0, "accepted": 0})
        for rounds in by_request.values():
            for kind, (proposed, accepted) in zip(start_types(rounds), rounds, strict=True):
                for key in (kind, "all"):
                    table[key]["rounds"] += 1
                    table[key]["proposed"] += proposed
                    table[key]["accepted"] += accepted
        for row in table.values():
            row["accepted_per_proposed"] = round(row["accepted"] / max(row["proposed"], 1), 4)
            row["tokens_per_round"] = round((row["accepted"] + row["rounds"]) / max(row["rounds"], 1), 4)
        results[f"{config.policy} {config.knob}"] = {"tokens": tokens, "wall_seconds": round(wall, 2),
                                                     "by_start": dict(table)}
        print(config.policy, config.knob, json.dumps(results[f"{config.policy} {config.knob}"]), flush=True)
    OUT.write_text(json.dumps({"prompts": num_prompts, "max_tokens": max_tokens, "temperature": 1.0,
                               "seeds": list(range(num_prompts)), "machine": machine_record(),
                               "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
