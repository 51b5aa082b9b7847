"""`bench serving` end to end: rows of (batching mode, speculation config, load), each run against
a server (started here or given), checkpointed, compared, reported.

Module-level imports stay light (the CLI builds every parser at start).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

from specdecpp.bench.runs import Checkpoint, ratio
from specdecpp.datasets import load_prompts
from specdecpp.model_args import config_flags, engine_config_from_args, threshold_arg

QUICK = {"max_tokens": 24, "num_requests": 2, "num_prompts": 4}  # --quick: these win over the flags
SPEC_KNOBS = {"constant": "k", "heuristic": "k", "confidence": "p_min", "specdec++": "threshold"}  # a row's `knob`


class ServingRow(NamedTuple):
    """One planned row of `bench serving`; `key` names it in the checkpoint."""

    mode: str | None  # batching mode of the server it runs on (None: the server as configured)
    key: str
    spec: dict | None
    concurrency: int | None
    rate: float | None
    requests: int
    baseline: bool


def run_serving_bench(args: argparse.Namespace) -> int:
    """The `bench serving` flags (specdecpp/commands/bench.py) run. Each finished row goes to a
    checkpoint, so a rerun of the same command resumes (a server is started only for a mode with
    rows left)."""
    from specdecpp.bench.machine import results_meta
    from specdecpp.bench.report import write_serving_report
    from specdecpp.bench.serving import check_loopback

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the progress lines
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.batching_modes and not args.start_server:
        raise SystemExit("--batching-modes starts its own servers: use it with --start-server")
    specs = [parse_config(c) for c in args.configs]
    prompts = [p.messages for p in load_prompts(args.dataset, args.num_prompts, seed=args.seed)]
    if args.base_url:
        check_loopback(args.base_url)
    settings = {"dataset": args.dataset, "num_prompts": len(prompts), "max_tokens": args.max_tokens,
                "temperature": args.temperature, "seed": args.seed, "ignore_eos": args.ignore_eos,
                "num_requests": args.num_requests, "requests_per_client": args.requests_per_client,
                "server": serve_args(args) if args.start_server else args.base_url}
    checkpoint = Checkpoint(args.output.with_name(args.output.stem + ".checkpoint.jsonl"), settings, args.fresh)
    modes: list[str | None] = list(args.batching_modes or [None])
    plan = plan_rows(args, modes, specs)
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
    compare_rows(rows)
    servers = {mode: card for record in records for mode, card in record["server"].items()}  # this run's and resumed
    meta = results_meta(getattr(args, "argv", None), args.dataset, {
        "base_url": args.base_url or "started by the benchmark", "server": servers, "num_prompts": len(prompts),
        "settings": settings})
    for path in write_serving_report(args.output, rows, meta):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def parse_config(text: str) -> dict | None:
    """'server-default' -> None; 'specdec++:threshold=0.3,bounds=2-20' (or threshold=auto) -> a SpecConfig
    override dict."""
    from engine.params import SpecConfig

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
        elif key == "threshold":
            spec[key] = threshold_arg(value)
        else:
            spec[key] = float(value)
    SpecConfig.model_validate(spec)  # fail before any request is sent
    return spec


def serve_args(args: argparse.Namespace) -> list[str]:
    """`specdecpp serve` flags of a started server: the engine flags given to the benchmark (with
    --batching-modes, each mode adds its own batching flag) and the API key."""
    config = engine_config_from_args(args)
    if args.batching_modes:
        config.scheduler = replace(config.scheduler, batching=True)
    return config_flags(config) + (["--api-key", args.api_key] if args.api_key else [])


def plan_rows(args: argparse.Namespace, modes: list[str | None], specs: list[dict | None]) -> list[ServingRow]:
    """Every row, mode-major: the baseline (first mode only, with --baseline), then each config under each load
    (closed-loop clients, or Poisson rates capped by the first --concurrency)."""
    loads = [(c, None) for c in args.concurrency]
    if args.request_rate:
        loads = [(args.concurrency[0] if args.concurrency else None, r) for r in args.request_rate]
    plan: list[ServingRow] = []
    for m, mode in enumerate(modes):
        if args.baseline and m == 0:
            plan.append(ServingRow(mode, f"{mode}|baseline", {"policy": "none"}, 1, None, args.num_requests or 4, True))
        for spec in specs:
            for concurrency, rate in loads:
                n = args.num_requests or max(4, args.requests_per_client * (concurrency or 1))
                plan.append(ServingRow(mode, f"{mode}|{json.dumps(spec)}|{concurrency}|{rate}", spec, concurrency,
                                       rate, n, False))
    return plan


def _serve_rows(args: argparse.Namespace, mode: str | None, todo: list[ServingRow], prompts: list,
                checkpoint: Checkpoint) -> None:
    """Run `todo` rows against one server (started for `mode`, or the --base-url one); each finished row
    goes to the checkpoint with the server's model card."""
    from specdecpp.bench.serving import ServerProcess, bench_row, server_info

    server = None
    if args.start_server:
        extra = ["--no-batching"] if mode == "off" else []
        log_path = Path(tempfile.gettempdir()) / f"specdecpp-bench-{os.getpid()}-{mode or 'server'}.log"
        server = ServerProcess(serve_args(args) + extra, log_path)
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
            row["knob"] = row_knob(planned.spec, (info.get("specdec") or {}).get("default") or {})
            row["baseline"] = planned.baseline
            checkpoint.add({"key": planned.key, "row": row, "server": {str(mode): info}})
            print(f"  {row['throughput_tokens_per_s'] or 0:.2f} tok/s, TTFT p50 {row['ttft_p50_s']}, "
                  f"errors {row['errors']}", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.stop()


def row_knob(spec: dict | None, default: dict) -> float | int | str | None:
    """The knob a row's requests ran with (k, p_min or threshold, "auto" included): the request's field
    over the server's default spec (its model card's); None for the target alone."""
    merged = {**default, **(spec or {})}
    field = SPEC_KNOBS.get(merged.get("policy"))
    return merged.get(field) if field else None


def compare_rows(rows: list[dict]) -> None:
    """Ratios between rows of one run: throughput over the same config's concurrency-1 row (same
    batching mode); the slowest request's tokens/s over the target alone's mean (baseline row);
    and, where the run has a target-alone (`none`) row under the same load (concurrency, rate,
    batching mode), throughput and slowest request over that row's: what the same traffic would
    get from the target alone."""
    def load(r: dict) -> list:
        return [r.get(k) for k in ("batching", "concurrency", "request_rate")]

    def over(row: dict, key: str, other: dict | None, other_key: str) -> float | None:
        return ratio(row.get(key), other.get(other_key) if other is not None else None)

    baseline = next((r for r in rows if r.get("baseline")), None)
    for row in rows:
        same_load = next((r for r in rows if not r.get("baseline") and r.get("policy") == "none"
                          and load(r) == load(row)), None)
        single = next((r for r in rows if not r.get("baseline") and r.get("batching") == row.get("batching")
                       and r.get("specdec") == row.get("specdec") and r.get("concurrency") == 1
                       and r.get("request_rate") is None), None)
        tput, slowest, mean = "throughput_tokens_per_s", "request_tokens_per_s_min", "request_tokens_per_s_mean"
        row["throughput_vs_concurrency_1"] = over(row, tput, single, tput)
        row["slowest_request_vs_target_alone"] = over(row, slowest, baseline, mean)
        row["throughput_vs_target_alone_same_load"] = over(row, tput, same_load, tput)
        row["slowest_request_vs_target_alone_same_load"] = over(row, slowest, same_load, mean)
