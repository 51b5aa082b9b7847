"""Forwards of the default pair under transformers' `sdpa` attention and under grouped-query attention
(engine/loading/attention.py), side by side in one process, at several cache lengths.

Writes docs/benchmarks/attention.json. Each forward feeds 1 token (a draft step, a target-alone step) or
5 tokens (verifying 4 candidates) after `context` cached tokens, logits included, the cache cropped back
after each call; the median of REPS calls after a warm-up, the two attentions interleaved call by call so
that a host busy for a while slows both alike. The models run as the engine runs them (the draft with the
kernels `auto` chooses here).
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.factory import resolve_paths
from engine.loading.attention import GROUPED_QUERY_ATTENTION
from engine.loading.loader import load_model
from engine.runner import ModelRunner, crop_cache
from specdecpp.bench.machine import machine_record

CONTEXTS, TOKENS, REPS = (200, 1000, 2000), (1, 5), 15
ATTENTIONS = ("sdpa", GROUPED_QUERY_ATTENTION)


def interleaved_forward_ms(context: int, tokens: tuple[int, ...], reps: int,
                           variants: dict[str, tuple[ModelRunner, Callable[[], None]]]) -> dict[str, dict[int, float]]:
    """variant -> new tokens -> median ms of one forward of that many tokens after `context` cached tokens,
    logits at every token, the cache cropped back after each call. A variant is a runner and a callable that
    switches it to the variant before its call (one runner may serve several); the variants take turns call
    by call, so that a host busy for a while slows them alike. The first round warms up."""
    runners = {id(runner): runner for runner, _ in variants.values()}
    ids = torch.randint(0, min(r.vocab_size for r in runners.values()), (context + max(tokens),))
    caches = {key: runner.new_cache() for key, runner in runners.items()}
    for key, runner in runners.items():
        runner.forward(ids[:context].unsqueeze(0), caches[key])
    times: dict[str, dict[int, list[float]]] = {v: {n: [] for n in tokens} for v in variants}
    for rep in range(reps + 1):
        for n in tokens:
            for variant, (runner, switch) in variants.items():
                switch()
                cache = caches[id(runner)]
                t0 = time.perf_counter()
                runner.forward_batch([ids[context : context + n]], [cache], [n])
                elapsed = time.perf_counter() - t0
                crop_cache(cache, context)
                if rep:
                    times[variant][n].append(1e3 * elapsed)
    return {v: {n: statistics.median(t) for n, t in by_n.items()} for v, by_n in times.items()}


def forward_ms(runner: ModelRunner, context: int) -> dict[str, dict[int, float]]:
    """attention -> new tokens -> median ms of one forward after `context` cached tokens."""
    ms = interleaved_forward_ms(context, TOKENS, REPS, {
        a: (runner, functools.partial(runner.model.set_attn_implementation, a)) for a in ATTENTIONS})
    runner.model.set_attn_implementation(GROUPED_QUERY_ATTENTION)
    return ms


def main(output: Path) -> None:
    torch.set_num_threads(2)
    target_spec, draft_spec, _ = resolve_paths(EngineConfig())
    result: dict = {"reps": REPS, "rows": []}
    for role, spec, quantization in (("draft", draft_spec, "auto"), ("target", target_spec, "none")):
        runner = ModelRunner(load_model(spec), quantization=quantization, quantize_lm_head=role == "draft")
        result[f"{role}_kernels"] = runner.kernels.describe()
        for context in CONTEXTS:
            ms = forward_ms(runner, context)
            for n in TOKENS:
                row = {"model": role, "context_tokens": context, "new_tokens": n,
                       "sdpa_ms": ms["sdpa"][n], "grouped_ms": ms[GROUPED_QUERY_ATTENTION][n]}
                row["speedup"] = row["sdpa_ms"] / row["grouped_ms"]
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
        del runner
    by = {(r["model"], r["context_tokens"], r["new_tokens"]): r for r in result["rows"]}
    result["draft_over_target_1_token"] = {
        attention: {c: by["draft", c, 1][f"{attention}_ms"] / by["target", c, 1][f"{attention}_ms"] for c in CONTEXTS}
        for attention in ("sdpa", "grouped")}
    result["machine"] = machine_record()
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["draft_over_target_1_token"], indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/benchmarks/attention.json"))
