"""`specdecpp bench offline|serving`: reproduce the paper's evaluation and measure the server."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from engine.params import SpecConfig
from specdecpp.model_args import add_model_args, engine_config_from_args

log = logging.getLogger(__name__)

# Sweep defaults, and the smaller ones of --quick; a flag given explicitly wins over both.
DEFAULTS = {"num_prompts": 16, "max_tokens": 128, "ks": [1, 2, 3, 4, 5, 6, 8], "p_mins": [0.2, 0.4, 0.6, 0.8],
            "thresholds": [0.1, 0.2, 0.3, 0.5, 0.7, 0.9], "hf_ks": [2, 4, 6]}
QUICK = {"num_prompts": 3, "max_tokens": 24, "ks": [2, 4], "p_mins": [0.4], "thresholds": [0.3], "hf_ks": [4]}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (offline policy sweep, serving load)", description=__doc__)
    modes = p.add_subparsers(dest="mode", required=True, metavar="MODE")

    o = modes.add_parser("offline", help="every policy and knob on one dataset, in-process, plus transformers' "
                         "assisted generation")
    add_model_args(o)
    _add_dataset_args(o, default_num=None)
    o.add_argument("--max-tokens", type=int, help="new tokens per request (default: 128)")
    o.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.0], help="default: 1 0")
    o.add_argument("--policies", nargs="+", help="subset of rows (default: all; `none` is always run)")
    o.add_argument("--greedy-policies", nargs="+", help="rows at temperature 0 (default: the same as --policies)")
    o.add_argument("--greedy-ks", type=int, nargs="+",
                   help="constant k values at temperature 0 (hf-constant: those also in --hf-ks; default: --ks)")
    o.add_argument("--greedy-thresholds", type=float, nargs="+",
                   help="specdec++ thresholds at temperature 0 (default: --thresholds)")
    o.add_argument("--ks", type=int, nargs="+", help="constant k sweep (default: 1 2 3 4 5 6 8)")
    o.add_argument("--heuristic-k", type=int, default=4, help="heuristic starting k (default: 4)")
    o.add_argument("--p-mins", type=float, nargs="+", help="confidence sweep (default: 0.2 0.4 0.6 0.8)")
    o.add_argument("--thresholds", type=float, nargs="+",
                   help="specdec++ threshold sweep (default: 0.1 0.2 0.3 0.5 0.7 0.9)")
    o.add_argument("--post-head", metavar="DIR",
                   help="an acceptance head that judges after the draft's forward (the paper's timing), loaded as "
                   "engine head 'post' for the specdec++-post rows")
    o.add_argument("--bounds", type=int, nargs=2, default=list(SpecConfig().bounds), metavar=("MIN", "MAX"),
                   help="candidate length bounds of heuristic/confidence/specdec++ (default: the engine's, "
                   f"{' '.join(map(str, SpecConfig().bounds))})")
    o.add_argument("--hf-ks", type=int, nargs="+", help="hf-constant k values (default: 2 4 6)")
    o.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i in every configuration")
    o.add_argument("--output", type=Path, default=Path("bench-results/offline.json"),
                   help="results JSON; the .md, -frontier.png, -speedup.png and .checkpoint.jsonl sit next to it")
    o.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice, one per core)")
    o.add_argument("--report-only", action="store_true",
                   help="no new requests: write the report from the checkpoint (prompts every row finished)")
    o.add_argument("--limit-prompts", type=int,
                   help="only the first N of the --num-prompts prompts (e.g. to report two stopped runs on the "
                   "same prompts)")
    o.add_argument("--fresh", action="store_true", help="discard the checkpoint instead of resuming")
    o.add_argument("--quick", action="store_true",
                   help=f"a smoke run in minutes: {QUICK['num_prompts']} prompts, {QUICK['max_tokens']} tokens, "
                   "small sweeps (explicit flags still win)")
    o.set_defaults(func=run_offline_command)

    m = modes.add_parser("merge", help="one offline report from several runs on the same prompts and seeds")
    m.add_argument("inputs", nargs="+", type=Path, help="offline results JSON files (later ones win on duplicates)")
    m.add_argument("--output", type=Path, required=True)
    m.set_defaults(func=run_merge_command)

    s = modes.add_parser("serving", help="concurrent streaming clients against the HTTP API")
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--base-url", help="a running server on loopback, e.g. http://127.0.0.1:8000")
    where.add_argument("--start-server", action="store_true", help="start `specdecpp serve` with the model flags")
    s.add_argument("--api-key", help="bearer token for the server")
    add_model_args(s)
    _add_dataset_args(s, default_num=32)
    s.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4], help="closed-loop clients per row")
    s.add_argument("--request-rate", type=float, nargs="+",
                   help="Poisson arrival rates (req/s), one row each (capped by the first --concurrency)")
    s.add_argument("--num-requests", type=int, help="requests per row (default: --requests-per-client x concurrency, "
                   "at least 4)")
    s.add_argument("--requests-per-client", type=int, default=4, help="default: 4")
    s.add_argument("--max-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--ignore-eos", action="store_true", help="every request generates exactly --max-tokens")
    s.add_argument("--configs", nargs="+", default=["server-default"],
                   help="speculation per row: 'server-default' or POLICY[:key=value,...], "
                   "e.g. none constant:k=4 specdec++:threshold=0.3")
    s.add_argument("--batching-label", help="label for the server's batching mode in the rows (default: from the "
                   "server's model card)")
    s.add_argument("--batching-modes", nargs="+", choices=["on", "off"],
                   help="with --start-server: one server per mode (off = --no-batching), every row under each")
    s.add_argument("--baseline", action="store_true",
                   help="first a target-alone row (policy none, concurrency 1): each row then reports its slowest "
                   "request's tokens/s over the target alone's")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--output", type=Path, default=Path("bench-results/serving.json"))
    s.add_argument("--fresh", action="store_true", help="discard the checkpoint instead of resuming")
    s.add_argument("--quick", action="store_true", help="2 requests per row, 24 tokens")
    s.set_defaults(func=run_serving_command)


def _add_dataset_args(p: argparse.ArgumentParser, default_num: int | None) -> None:
    p.add_argument("--dataset", default="humaneval",
                   help="humaneval | sharegpt (held-out split) | jsonl:PATH (lines with a 'prompt')")
    p.add_argument("--num-prompts", type=int, default=default_num)


def load_prompts(dataset: str, num: int, seed: int = 0) -> list:
    """Prompts as chat requests (specdecpp/datasets.py: one user message each).

    HumanEval: `num` problems evenly spread over the 164, each "Complete the following Python
    function." plus the problem in a code block. ShareGPT: first user turns of the held-out
    split (never used to train the head), about 40% code requests.
    """
    from specdecpp import datasets as sources

    if dataset == "humaneval":
        return sources.humaneval_prompts(num)
    if dataset == "sharegpt":
        return sources.sharegpt_prompts(num, split="heldout", seed=seed)
    if dataset.startswith("jsonl:"):
        return sources.jsonl_prompts(dataset.removeprefix("jsonl:"), num)
    raise ValueError(f"unknown dataset {dataset!r}: humaneval, sharegpt or jsonl:PATH")


def _meta(args: argparse.Namespace, extra: dict) -> dict:
    from specdecpp.bench.machine import command_line, git_commit, machine_record

    return {
        "command": command_line(getattr(args, "argv", None)),
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_record(),
        "dataset": args.dataset,
        **extra,
    }


# ----- offline ---------------------------------------------------------------------------------
def run_offline_command(args: argparse.Namespace) -> int:
    from engine.factory import build_engine, resolve_paths
    from specdecpp.bench.offline import (
        HEAD_POLICIES,
        Checkpoint,
        Sweep,
        aggregate,
        compare,
        record_key,
        run_offline,
    )
    from specdecpp.bench.report import write_offline_report

    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    policies = tuple(args.policies) if args.policies else Sweep().policies
    if "none" not in policies:
        policies = ("none", *policies)
    asked = set(args.policies or ()) | set(args.greedy_policies or ())
    post = HEAD_POLICIES["specdec++-post"]
    extra_heads = [text.partition("=")[0] for text in args.extra_head]
    if args.post_head:  # before the models load: a missing or doubled head fails in seconds, not after them
        if post in extra_heads:
            raise ValueError(f"--post-head and --extra-head {post}=DIR both name the head {post!r}: give one")
        args.extra_head = [*args.extra_head, f"{post}={args.post_head}"]
        if not args.policies:
            policies = (*policies, "specdec++-post")
    elif "specdec++-post" in asked and post not in extra_heads:
        raise ValueError(f"specdec++-post was asked for but no head {post!r} is given (--post-head DIR)")
    config = engine_config_from_args(args)
    target, draft, head = resolve_paths(config)
    engine = build_engine(config)
    if engine.draft is None:
        raise ValueError("the offline benchmark compares speculation policies: it needs a draft model")
    if post in engine.heads and engine.heads[post].timing != "after":
        log.warning("head %r judges %s the draft's forward: the specdec++-post rows are not the paper's timing",
                    post, engine.heads[post].timing)
    policies, greedy_policies = _rows_with_heads(policies, args.greedy_policies, asked, set(engine.heads))
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
    )
    configs = sweep.configs()
    prompts = load_prompts(args.dataset, args.num_prompts, args.seed)
    models = {"target": target, "draft": draft, "head": head, "dtype": args.dtype}
    if args.extra_head:  # only then: checkpoints of runs without extra heads keep resuming
        models["extra_heads"] = list(args.extra_head)
    settings = {
        "dataset": args.dataset,
        "prompt_ids": [p.id for p in prompts],
        "max_tokens": args.max_tokens,
        "seed": args.seed,
        "bounds": list(args.bounds),
        "models": models,
    }
    checkpoint_path = args.output.with_suffix(".checkpoint.jsonl")
    checkpoint = Checkpoint(checkpoint_path, settings, fresh=args.fresh)
    if args.limit_prompts:  # the loop is prompt-major, so a stopped run finished a prefix of the prompts
        prompts = prompts[: args.limit_prompts]
    print(f"{len(prompts)} prompts x {len(configs)} configurations -> {args.output} "
          f"(checkpoint {checkpoint_path})", file=sys.stderr)
    records = run_offline(
        engine, prompts, configs, args.max_tokens, checkpoint, base_seed=args.seed, bounds=tuple(args.bounds),
        progress=lambda line: print(line, file=sys.stderr, flush=True), run=not args.report_only,
    )
    rows = aggregate(records, configs)
    comparisons = compare(records, rows, configs)
    finished = [i for i, p in enumerate(prompts) if all(record_key(c, p.id) in checkpoint for c in configs)]
    if len(finished) < len(prompts):
        print(f"the report covers the {len(finished)} of {len(prompts)} prompts that every row finished",
              file=sys.stderr)
    meta = _meta(args, {
        "models": models,
        "settings": {k: v for k, v in settings.items() if k not in ("models", "prompt_ids")},
        "prompt_ids": [prompts[i].id for i in finished],
        "seeds": [args.seed + i for i in finished],
        "sweep": {"temperatures": sweep.temperatures, "ks": sweep.ks, "heuristic_k": sweep.heuristic_k,
                  "p_mins": sweep.p_mins, "thresholds": sweep.thresholds, "hf_ks": sweep.hf_ks,
                  "policies": sweep.policies, "greedy_policies": sweep.greedy_policies, "greedy_ks": sweep.greedy_ks,
                  "greedy_thresholds": sweep.greedy_thresholds},
        "threads": __import__("torch").get_num_threads(),
        "prompt_format": "chat template, one user message (specdecpp/datasets.py)",
        "notes": [
            "tokens_per_s = generated tokens / wall seconds summed over prompts; speedup vs the `none` row "
            "at the same temperature; rates are ratios of sums (docs/design.md)",
            "greedy_agreement: share of greedy (T=0) requests whose tokens equal the target alone's",
            "comparisons: tokens/s of a over b at each policy's fastest knob, with a paired bootstrap 95% "
            "interval by prompt",
        ],
        "greedy_agreement": greedy_agreement(records),
    })
    for path in write_offline_report(args.output, rows, meta, comparisons):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _rows_with_heads(policies: tuple[str, ...], greedy: list[str] | None, asked: set[str],
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


def run_merge_command(args: argparse.Namespace) -> int:
    from specdecpp.bench.machine import command_line
    from specdecpp.bench.report import merge_offline, write_offline_report

    rows, meta = merge_offline(args.inputs)
    meta["command"] = command_line(getattr(args, "argv", None))
    for path in write_offline_report(args.output, rows, meta):
        print(f"wrote {path}", file=sys.stderr)
    return 0


# ----- serving ---------------------------------------------------------------------------------
def parse_config(text: str) -> dict | None:
    """'server-default' -> None; 'specdec++:threshold=0.3,bounds=2-20' -> a SpecConfig override dict."""
    if text == "server-default":
        return None
    policy, _, rest = text.partition(":")
    spec: dict = {"policy": policy}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key == "bounds":
            spec[key] = [int(v) for v in value.split("-")]
        elif key == "k":
            spec[key] = int(value)
        else:
            spec[key] = float(value)
    from engine.params import SpecConfig

    SpecConfig.model_validate(spec)  # fail before any request is sent
    return spec


def _serve_args(args: argparse.Namespace) -> list[str]:
    out = []
    flags = {name: f"--{name.replace('_', '-')}" for name in (
        "target", "draft", "head", "dtype", "draft_dtype", "draft_device", "max_model_len",
        "max_num_seqs", "max_num_batched_tokens", "kv_cache_tokens", "cpu_fp32_gemm")}
    flags["spec_disable_batch_size"] = "--speculative-disable-by-batch-size"
    flags["spec_batch_candidates"] = "--speculative-batch-candidates"
    for name, flag in flags.items():
        value = getattr(args, name)
        if value is not None:
            out += [flag, str(value)]
    if not args.batching and not args.batching_modes:  # --no-batching (modes add their own flag)
        out.append("--no-batching")
    if args.target_devices:
        out += ["--target-devices", ",".join(args.target_devices)]
    if args.api_key:
        out += ["--api-key", args.api_key]
    return out


class ServingRow(NamedTuple):
    """One planned row of `bench serving`; `key` names it in the checkpoint."""

    mode: str | None  # batching mode of the server it runs on (None: the server as configured)
    key: str
    spec: dict | None
    concurrency: int | None
    rate: float | None
    requests: int
    baseline: bool


def run_serving_command(args: argparse.Namespace) -> int:
    """Rows are (batching mode, config, load); each finished row goes to a checkpoint, so a rerun
    of the same command resumes (a server is started only for a mode with rows left)."""
    from specdecpp.bench.offline import Checkpoint
    from specdecpp.bench.report import write_serving_report
    from specdecpp.bench.serving import check_loopback

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the progress lines
    if args.quick:
        args.max_tokens, args.num_requests, args.num_prompts = 24, 2, 4
    if args.batching_modes and not args.start_server:
        raise SystemExit("--batching-modes starts its own servers: use it with --start-server")
    specs = [parse_config(c) for c in args.configs]
    prompts = [p.messages for p in load_prompts(args.dataset, args.num_prompts, args.seed)]
    if args.base_url:
        check_loopback(args.base_url)
    loads = [(c, None) for c in args.concurrency]
    if args.request_rate:
        loads = [(args.concurrency[0] if args.concurrency else None, r) for r in args.request_rate]
    settings = {"dataset": args.dataset, "num_prompts": len(prompts), "max_tokens": args.max_tokens,
                "temperature": args.temperature, "seed": args.seed, "ignore_eos": args.ignore_eos,
                "num_requests": args.num_requests, "requests_per_client": args.requests_per_client,
                "server": _serve_args(args) if args.start_server else args.base_url}
    checkpoint = Checkpoint(args.output.with_name(args.output.stem + ".checkpoint.jsonl"), settings, args.fresh)
    modes: list[str | None] = list(args.batching_modes or [None])
    plan: list[ServingRow] = []
    for m, mode in enumerate(modes):
        if args.baseline and m == 0:
            plan.append(ServingRow(mode, f"{mode}|baseline", {"policy": "none"}, 1, None, args.num_requests or 4, True))
        for spec in specs:
            for concurrency, rate in loads:
                n = args.num_requests or max(4, args.requests_per_client * (concurrency or 1))
                plan.append(ServingRow(mode, f"{mode}|{json.dumps(spec)}|{concurrency}|{rate}", spec, concurrency,
                                       rate, n, False))
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        for mode in modes:
            todo = [row for row in plan if row.mode == mode and row.key not in checkpoint]
            if todo:
                _serve_rows(args, mode, todo, prompts, checkpoint)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    records = [checkpoint.records[row.key] for row in plan]
    rows = [record["row"] for record in records]
    _compare_rows(rows)
    servers = {mode: card for record in records for mode, card in record["server"].items()}  # this run's and resumed
    meta = _meta(args, {"base_url": args.base_url or "started by the benchmark", "server": servers,
                        "num_prompts": len(prompts), "settings": settings})
    for path in write_serving_report(args.output, rows, meta):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _serve_rows(args: argparse.Namespace, mode: str | None, todo: list[ServingRow], prompts: list,
                checkpoint) -> None:
    """Run `todo` rows against one server (started for `mode`, or the --base-url one); each finished row
    goes to the checkpoint with the server's model card."""
    from specdecpp.bench.serving import ServerProcess, bench_row, server_info

    server = None
    if args.start_server:
        extra = ["--no-batching"] if mode == "off" else []
        log_path = Path(tempfile.gettempdir()) / f"specdecpp-bench-{os.getpid()}-{mode or 'server'}.log"
        server = ServerProcess(_serve_args(args) + extra, log_path)
        print(f"starting the server (batching {mode or 'as configured'}) on {server.url} (log {log_path})",
              file=sys.stderr)
        base_url = server.url
    else:
        base_url = args.base_url.rstrip("/")
    try:
        if server is not None:
            server.wait_healthy()
        info = asyncio.run(server_info(base_url, args.api_key))
        scheduler = (info.get("specdec") or {}).get("scheduler") or {}
        batching = mode or args.batching_label or {True: "on", False: "off"}.get(scheduler.get("batching"), "unknown")
        model = info.get("id", "")
        # one unmeasured request: first-call costs stay out of the rows
        asyncio.run(bench_row(base_url, prompts[:1], 1, 8, args.temperature, 1, None, None, args.seed, args.api_key,
                              model))
        for planned in todo:
            print(f"row: batching={batching} {planned.spec or 'server-default'} concurrency={planned.concurrency} "
                  f"rate={planned.rate} requests={planned.requests}", file=sys.stderr, flush=True)
            row = asyncio.run(bench_row(base_url, prompts, planned.requests, args.max_tokens, args.temperature,
                                        planned.concurrency, planned.rate, planned.spec, args.seed, args.api_key,
                                        model, args.ignore_eos))
            row["batching"] = batching
            row["baseline"] = planned.baseline
            checkpoint.add({"key": planned.key, "row": row, "server": {str(mode): info}})
            print(f"  {row['throughput_tokens_per_s'] or 0:.2f} tok/s, TTFT p50 {row['ttft_p50_s']}, "
                  f"errors {row['errors']}", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.stop()


def _compare_rows(rows: list[dict]) -> None:
    """Ratios between rows of one run: throughput over the same config's concurrency-1 row (same
    batching mode); the slowest request's tokens/s over the target alone's mean (baseline row);
    and, where the run has a target-alone (`none`) row under the same load (concurrency, rate,
    batching mode), throughput and slowest request over that row's: what the same traffic would
    get from the target alone."""
    def load(r: dict) -> list:
        return [r.get(k) for k in ("batching", "concurrency", "request_rate")]

    baseline = next((r for r in rows if r.get("baseline")), None)
    for row in rows:
        same_load = next((r for r in rows if not r.get("baseline") and r.get("policy") == "none"
                          and load(r) == load(row)), None)
        single = next((r for r in rows if not r.get("baseline") and r.get("batching") == row.get("batching")
                       and r.get("specdec") == row.get("specdec") and r.get("concurrency") == 1
                       and r.get("request_rate") is None), None)
        tput, slowest, mean = "throughput_tokens_per_s", "request_tokens_per_s_min", "request_tokens_per_s_mean"
        row["throughput_vs_concurrency_1"] = _ratio(row, tput, single, tput)
        row["slowest_request_vs_target_alone"] = _ratio(row, slowest, baseline, mean)
        row["throughput_vs_target_alone_same_load"] = _ratio(row, tput, same_load, tput)
        row["slowest_request_vs_target_alone_same_load"] = _ratio(row, slowest, same_load, mean)


def _ratio(row: dict, key: str, other: dict | None, other_key: str) -> float | None:
    """row[key] / other[other_key], or None where either is missing (or the divisor is 0)."""
    if other is None or row.get(key) is None or not other.get(other_key):
        return None
    return row[key] / other[other_key]
