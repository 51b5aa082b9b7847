"""`bench offline` and `bench merge` end to end: flags -> engine -> sweep -> checkpoint -> report.

Module-level imports stay light (the CLI builds every parser at start); torch and the models
load only when a run starts.
"""

from __future__ import annotations

import argparse
import logging
import sys

from specdecpp.bench.runs import Checkpoint
from specdecpp.datasets import load_prompts
from specdecpp.model_args import engine_config_from_args

log = logging.getLogger(__name__)

# Sweep defaults, and the smaller ones of --quick; a flag given explicitly wins over both.
DEFAULTS = {"num_prompts": 16, "max_tokens": 128, "ks": [1, 2, 3, 4, 5, 6, 8], "p_mins": [0.2, 0.4, 0.6, 0.8],
            "thresholds": [0.1, 0.2, 0.3, 0.5, 0.7, 0.9], "hf_ks": [2, 4, 6]}
QUICK = {"num_prompts": 3, "max_tokens": 24, "ks": [2, 4], "p_mins": [0.4], "thresholds": [0.3], "hf_ks": [4]}
NOTES = [
    "tokens_per_s = generated tokens / wall seconds summed over prompts; speedup vs the `none` row "
    "at the same temperature; rates are ratios of sums (docs/design.md)",
    "greedy_agreement: share of greedy (T=0) requests whose tokens equal the target alone's",
    "comparisons: tokens/s of a over b at each policy's fastest knob, with a paired bootstrap 95% "
    "interval by prompt",
]


def run_offline_bench(args: argparse.Namespace) -> int:
    """The `bench offline` flags (specdecpp/commands/bench.py) run: every row on every prompt,
    resumed from the checkpoint, then the report next to `args.output`."""
    import torch

    from engine.factory import build_engine, resolve_paths
    from specdecpp.bench.machine import results_meta
    from specdecpp.bench.offline import (
        HEAD_POLICIES,
        Sweep,
        aggregate,
        compare,
        complete_records,
        record_key,
        run_offline,
    )
    from specdecpp.bench.report import write_offline_report

    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    policies = tuple(args.policies) if args.policies else Sweep().policies
    if "none" not in policies:
        policies = ("none", *policies)
    asked = set(args.policies or ()) | set(args.greedy_policies or ())
    post = HEAD_POLICIES["specdec++-post"]
    extra_heads = [text.partition("=")[0] for text in args.extra_heads]
    if args.post_head:  # before the models load: a missing or doubled head fails in seconds, not after them
        if post in extra_heads:
            raise ValueError(f"--post-head and --extra-head {post}=DIR both name the head {post!r}: give one")
        args.extra_heads = [*args.extra_heads, f"{post}={args.post_head}"]
        if not args.policies:
            policies = (*policies, "specdec++-post")
    elif "specdec++-post" in asked and post not in extra_heads:
        raise ValueError(f"specdec++-post was asked for but no head {post!r} is given (--post-head DIR)")
    config = engine_config_from_args(args)
    # the over-acceptance rows are the explicit opt-in: the engine allows the largest epsilon asked for
    config.max_over_acceptance = max(config.max_over_acceptance, *args.over_acceptance)
    target, draft, head = resolve_paths(config)
    engine = build_engine(config)
    if engine.draft is None:
        raise ValueError("the offline benchmark compares speculation policies: it needs a draft model")
    if post in engine.heads and engine.heads[post].timing != "after":
        log.warning("head %r judges %s the draft's forward: the specdec++-post rows are not the paper's timing",
                    post, engine.heads[post].timing)
    policies, greedy_policies = rows_with_heads(policies, args.greedy_policies, asked, set(engine.heads))
    sweep = Sweep(
        temperatures=tuple(args.temperatures),
        ks=tuple(args.ks),
        heuristic_k=args.heuristic_k,
        p_mins=tuple(args.p_mins),
        thresholds=tuple(args.thresholds),
        hf_ks=tuple(args.hf_ks),
        policies=policies,
        bounds=tuple(args.bounds),
        greedy_policies=greedy_policies,
        greedy_ks=tuple(args.greedy_ks) if args.greedy_ks else None,
        greedy_thresholds=tuple(args.greedy_thresholds) if args.greedy_thresholds else None,
        num_drafts=tuple(args.num_drafts),
        over_acceptances=tuple(args.over_acceptance),
    )
    configs = sweep.configs()
    prompts = load_prompts(args.dataset, args.num_prompts, seed=args.seed)
    models = {"target": target, "draft": draft, "head": head, "dtype": args.dtype}
    if args.extra_heads:  # only then: checkpoints of runs without extra heads keep resuming
        models["extra_heads"] = list(args.extra_heads)
    for role in ("draft", "target"):  # likewise: only a quantized model is named so
        runner = getattr(engine, role)
        if runner is not None and runner.kernels.quantization != "none":
            models[f"{role}_quantization"] = runner.kernels.quantization
    if engine.draft.kernels.lm_head != "none":  # likewise: rows of a draft whose LM head differs do not mix
        models["draft_lm_head"] = engine.draft.kernels.lm_head
    quantized_heads = {name: k["quantization"] for name, k in engine.head_kernels.items()
                       if k["quantization"] != "none"}
    if quantized_heads:  # likewise: a quantized head judges a little differently
        models["head_quantization"] = quantized_heads
    settings = {
        "dataset": args.dataset,
        "prompt_ids": [p.id for p in prompts],
        "max_tokens": args.max_tokens,
        "seed": args.seed,
        "bounds": list(args.bounds),
        "models": models,
    }
    if args.stop:  # only then: checkpoints of runs without stop strings keep resuming
        settings["stop"] = list(args.stop)
    checkpoint_path = args.output.with_suffix(".checkpoint.jsonl")
    checkpoint = Checkpoint(checkpoint_path, settings, fresh=args.fresh)
    if args.limit_prompts:  # the loop is prompt-major, so a stopped run finished a prefix of the prompts
        prompts = prompts[: args.limit_prompts]
    print(f"{len(prompts)} prompts x {len(configs)} configurations -> {args.output} "
          f"(checkpoint {checkpoint_path})", file=sys.stderr)
    records = run_offline(
        engine, prompts, configs, args.max_tokens, checkpoint, base_seed=args.seed, bounds=tuple(args.bounds),
        progress=lambda line: print(line, file=sys.stderr, flush=True), run=not args.report_only,
        stop=tuple(args.stop),
    )
    rows = aggregate(records, configs)
    if args.pass_at_1:
        from specdecpp.bench.pass_at_1 import add_pass_at_1

        add_pass_at_1(rows, complete_records(records, configs),
                      lambda ids: engine.tokenizer.decode(ids, skip_special_tokens=True))
    theory = theory_report(rows, engine, complete_records(records, configs))
    comparisons = compare(records, rows, configs)
    finished = [i for i, p in enumerate(prompts) if all(record_key(c, p.id) in checkpoint for c in configs)]
    if len(finished) < len(prompts):
        print(f"the report covers the {len(finished)} of {len(prompts)} prompts that every row finished",
              file=sys.stderr)
    meta = results_meta(getattr(args, "argv", None), args.dataset, {
        "models": models,
        "settings": {k: v for k, v in settings.items() if k not in ("models", "prompt_ids")},
        "prompt_ids": [prompts[i].id for i in finished],
        "seeds": [args.seed + i for i in finished],
        "sweep": {"temperatures": sweep.temperatures, "ks": sweep.ks, "heuristic_k": sweep.heuristic_k,
                  "p_mins": sweep.p_mins, "thresholds": sweep.thresholds, "hf_ks": sweep.hf_ks,
                  "policies": sweep.policies, "greedy_policies": sweep.greedy_policies, "greedy_ks": sweep.greedy_ks,
                  "greedy_thresholds": sweep.greedy_thresholds, "num_drafts": sweep.num_drafts,
                  "over_acceptances": sweep.over_acceptances},
        "threads": torch.get_num_threads(),
        "kernels": {"target": engine.target.kernels.describe(),
                    "draft": engine.draft.kernels.describe() if engine.draft is not None else None,
                    "heads": engine.head_kernels},
        "prompt_format": "chat template, one user message (specdecpp/datasets.py)",
        "notes": NOTES,
        "greedy_agreement": greedy_agreement(records),
        # what threshold "auto" decided from at the end (the live cost model, its learnt scales, the acceptance
        # estimate); None when the rows were resumed from a checkpoint without running
        "self_tuning_end": engine.tuning.state() if engine.tuning is not None else None,
        # the forward costs the engine measured at its start, before any refresh (`bench kernels` reads them)
        "cost_model_at_start": engine.tuning.costs.measured.to_dict() if engine.tuning is not None else None,
        **({"theory": theory} if theory else {}),
    })
    for path in write_offline_report(args.output, rows, meta, comparisons):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def theory_report(rows: list[dict], engine, complete: dict, samples: int | None = None) -> dict | None:
    """For a run with theory rows (several draft paths or over-acceptance): each row's decode speedup predicted
    under this host's live cost model and a memory-bound GPU's, each row against the plain constant row of
    its k (paired, over `complete`, `offline.complete_records`), and the over-acceptance bias measured on a
    tiny model (specdecpp/bench/theory.py). None for a run without them."""
    if not any(r["num_drafts"] > 1 or not r["lossless"] for r in rows):
        return None
    from specdecpp.bench.theory import (
        MEMORY_BOUND_GPU,
        TINY_SAMPLES,
        add_predictions,
        theory_comparisons,
        tiny_model_bias,
    )

    here = engine.tuning.costs.current
    add_predictions(rows, {"here": here, "gpu": MEMORY_BOUND_GPU})
    epsilons = sorted({r["over_acceptance"] for r in rows})
    return {"cost_models": {"here": here.to_dict(), "gpu": MEMORY_BOUND_GPU.to_dict()},
            "comparisons": theory_comparisons(rows, complete),
            "tiny_model_bias": tiny_model_bias(epsilons, samples or TINY_SAMPLES) if len(epsilons) > 1 else []}


def rows_with_heads(policies: tuple[str, ...], greedy: list[str] | None, asked: set[str],
                    heads: set[str]) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    """The rows to run, given the engine's heads: a head row asked for without its head is an error
    (before hours of other rows); one only in the default set is skipped with a warning."""
    from specdecpp.bench.offline import HEAD_POLICIES

    flags = {"specdec++": "--head DIR", "specdec++-post": "--post-head DIR"}
    lacking = {p for p, name in HEAD_POLICIES.items() if name not in heads}
    missing = sorted(lacking & asked)
    if missing:
        policy = missing[0]
        raise ValueError(f"{policy} was asked for but its acceptance head {HEAD_POLICIES[policy]!r} is not loaded "
                         f"({flags[policy]})")
    if lacking & set(policies):
        log.warning("no acceptance head for the %s rows: skipped", ", ".join(sorted(lacking & set(policies))))
    kept = tuple(p for p in policies if p not in lacking)
    return kept, (tuple(p for p in ("none", *greedy) if p not in lacking) if greedy else None)


def greedy_agreement(records: list[dict]) -> dict[str, float]:
    """Per policy: share of greedy requests with exactly the target-alone tokens (a losslessness check;
    bf16 rounding differs between one-token and block forwards, so near but not always 1)."""
    reference = {r["prompt_id"]: r["stats"].get("token_ids") for r in records
                 if r["temperature"] == 0 and r["policy"] == "none"}
    counts: dict[str, list[int]] = {}
    for r in records:
        if r["temperature"] != 0 or r["policy"] == "none" or r["prompt_id"] not in reference:
            continue
        same = int(r["stats"].get("token_ids") == reference[r["prompt_id"]])
        counts.setdefault(r["policy"], []).append(same)
    return {policy: sum(v) / len(v) for policy, v in counts.items()}


def merge_offline_results(args: argparse.Namespace) -> int:
    """`bench merge`: one offline report from several results files on the same prompts and seeds."""
    from specdecpp.bench.machine import command_line
    from specdecpp.bench.report import merge_offline, write_offline_report

    rows, meta = merge_offline(args.inputs)
    meta["command"] = command_line(getattr(args, "argv", None))
    for path in write_offline_report(args.output, rows, meta):
        print(f"wrote {path}", file=sys.stderr)
    return 0
