"""Soak test: many streaming clients for minutes against one server, with abuse mixed in.

Each client loops until the deadline: mostly streamed chat completions, some of which it hangs up
on mid-stream, and now and then a bad request (malformed JSON, out-of-range or unknown parameters,
a wrong model), which must get a 4xx in OpenAI's error shape. One more client opens a long stream
and stops reading it: the others' per-client throughput shows whether it slows them. Meanwhile the
server's memory is sampled (psutil: the server process and its children, the engine among them),
and its growth after the warm-up is reported. Anything else that goes wrong (a 5xx, an error in a
stream, a stream that never ends, a refused connection) is an unexpected error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

from specdecpp.bench.serving import ServerProcess, check_loopback, chunk_text, parse_sse_data, percentile

PROMPTS = (
    "Write a Python function that reverses a string.",
    "Explain what a hash map is in two sentences.",
    "List three prime numbers and say why they are prime.",
    "Write a haiku about a server that never goes down.",
    "What does HTTP status 429 mean?",
    "Sort the list [3, 1, 2] step by step.",
)
STALLED_TOKENS_FACTOR = 4  # the stalled client's stream asks for this many times --max-tokens
READ_TIMEOUT_S = 120.0  # a stream silent this long counts as hung (an unexpected error)


@dataclass
class SoakSettings:
    clients: int
    duration_s: float
    max_tokens: int
    temperature: float = 1.0
    hangup_rate: float = 0.1  # share of streams the client drops mid-stream
    bad_request_rate: float = 0.1  # share of requests that are deliberately bad
    stalled_client: bool = True
    rss_interval_s: float = 2.0
    warmup_s: float | None = None  # default: a fifth of the duration
    seed: int = 0
    model: str = ""
    api_key: str | None = None


@dataclass
class ClientRecord:
    """What one client saw."""

    client: int
    stalled: bool = False
    streams: int = 0
    completed: int = 0
    hangups: int = 0
    bad_requests: int = 0
    expected_4xx: int = 0
    unexpected: list[str] = field(default_factory=list)
    output_tokens: int = 0
    busy_s: float = 0.0  # time spent in completed streams
    ttfts: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float | None:
        return self.output_tokens / self.busy_s if self.busy_s > 0 else None


# ----- bad requests -----------------------------------------------------------------------------
def bad_requests(model: str) -> list[tuple[str, dict]]:
    """(name, httpx request kwargs) of requests the server must refuse with a 4xx."""
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    raw = {"headers": {"Content-Type": "application/json"}}
    return [
        ("malformed-json", {"content": b'{"model": "' + model.encode() + b'", "messages": [', **raw}),
        ("not-an-object", {"content": b"[1, 2, 3]", **raw}),
        ("bad-temperature", {"json": {**chat, "temperature": "hot"}}),
        ("temperature-out-of-range", {"json": {**chat, "temperature": 7}}),
        ("n-zero", {"json": {**chat, "n": 0}}),
        ("max-tokens-zero", {"json": {**chat, "max_tokens": 0}}),
        ("unknown-field", {"json": {**chat, "frobnicate": True}}),
        ("empty-messages", {"json": {**chat, "messages": []}}),
        ("wrong-model", {"json": {**chat, "model": "no-such-model"}}),
    ]


async def send_bad_request(client: httpx.AsyncClient, rng: random.Random, model: str, record: ClientRecord) -> None:
    name, kwargs = rng.choice(bad_requests(model))
    record.bad_requests += 1
    try:
        response = await client.post("/v1/chat/completions", **kwargs)
    except httpx.HTTPError as exc:
        record.unexpected.append(f"{name}: {type(exc).__name__}: {exc}")
        return
    try:
        shaped = set(response.json()["error"]) >= {"message", "type", "param", "code"}
    except (ValueError, KeyError, TypeError):
        shaped = False
    if 400 <= response.status_code < 500 and shaped:
        record.expected_4xx += 1
    else:
        record.unexpected.append(f"{name}: HTTP {response.status_code}: {response.text[:200]}")


# ----- streams ----------------------------------------------------------------------------------
def chat_body(settings: SoakSettings, rng: random.Random, max_tokens: int) -> dict:
    return {"model": settings.model, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
            "max_tokens": max_tokens, "temperature": settings.temperature, "seed": rng.getrandbits(32),
            "stream": True, "stream_options": {"include_usage": True}}


async def stream_once(client: httpx.AsyncClient, body: dict, hang_up_after: int | None,
                      record: ClientRecord) -> None:
    """One streamed chat completion, dropped after `hang_up_after` chunks if given; records the outcome."""
    record.streams += 1
    start = time.perf_counter()
    ttft, tokens, chunks = None, 0, 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                record.unexpected.append(f"stream: HTTP {response.status_code}: {text[:200]}")
                return
            async for line in response.aiter_lines():
                data = parse_sse_data(line)
                if data is None:
                    continue
                if data == "[DONE]":
                    break
                if data.get("error"):
                    record.unexpected.append(f"stream: error event {json.dumps(data['error'])[:200]}")
                    return
                chunks += 1
                if ttft is None and chunk_text(data):
                    ttft = time.perf_counter() - start
                if data.get("usage"):
                    tokens = int(data["usage"].get("completion_tokens") or 0)
                if hang_up_after is not None and chunks >= hang_up_after:
                    record.hangups += 1  # leaving the block closes the connection mid-stream
                    return
            else:
                record.unexpected.append("stream: ended without [DONE]")
                return
    except httpx.HTTPError as exc:
        record.unexpected.append(f"stream: {type(exc).__name__}: {exc}")
        return
    latency = time.perf_counter() - start
    record.completed += 1
    record.output_tokens += tokens
    record.busy_s += latency
    record.latencies.append(latency)
    if ttft is not None:
        record.ttfts.append(ttft)


async def client_loop(client: httpx.AsyncClient, settings: SoakSettings, deadline: float,
                      record: ClientRecord) -> None:
    """Requests back to back until the deadline: bad ones, streams hung up on, and whole streams."""
    rng = random.Random(settings.seed * 1000 + record.client)
    while time.monotonic() < deadline:
        if rng.random() < settings.bad_request_rate:
            await send_bad_request(client, rng, settings.model, record)
            continue
        hang_up_after = rng.randint(1, 4) if rng.random() < settings.hangup_rate else None
        await stream_once(client, chat_body(settings, rng, settings.max_tokens), hang_up_after, record)


async def stalled_loop(client: httpx.AsyncClient, settings: SoakSettings, deadline: float,
                       record: ClientRecord) -> None:
    """Open a long stream, read its first chunk, then stop reading until the deadline (and hang up)."""
    rng = random.Random(settings.seed * 1000 + record.client)
    record.streams += 1
    body = chat_body(settings, rng, settings.max_tokens * STALLED_TOKENS_FACTOR)
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                record.unexpected.append(f"stalled stream: HTTP {response.status_code}")
                return
            async for line in response.aiter_lines():
                if parse_sse_data(line) is not None:
                    break
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
            record.hangups += 1
    except httpx.HTTPError as exc:
        record.unexpected.append(f"stalled stream: {type(exc).__name__}: {exc}")


# ----- memory -----------------------------------------------------------------------------------
def memory_sample(pid: int) -> dict:
    """RSS of the server process and, summed, of its children (the engine process among them)."""
    server = psutil.Process(pid)
    children = 0
    for child in server.children(recursive=True):
        try:
            children += child.memory_info().rss
        except psutil.Error:  # a child that just exited
            continue
    return {"server_rss": server.memory_info().rss, "engine_rss": children}


async def sample_memory(pid: int, interval: float, deadline: float, start: float, samples: list[dict]) -> None:
    while True:
        try:
            samples.append({"t_s": round(time.monotonic() - start, 2), **memory_sample(pid)})
        except psutil.Error:
            return  # the server is gone: the clients' errors say so
        if time.monotonic() >= deadline:
            return
        await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def memory_growth(samples: list[dict], warmup_s: float) -> dict:
    """Bytes each RSS grew from the first sample after the warm-up to the last, and its peak."""
    settled = [s for s in samples if s["t_s"] >= warmup_s] or samples[-1:]
    if not settled:
        return {}
    return {f"{key}_growth_bytes": settled[-1][key] - settled[0][key] for key in ("server_rss", "engine_rss")} | {
        f"{key}_max_bytes": max(s[key] for s in samples) for key in ("server_rss", "engine_rss")}


# ----- the run ----------------------------------------------------------------------------------
async def health(base_url: str) -> dict:
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
            return (await client.get("/health")).json()
    except (httpx.HTTPError, ValueError):
        return {}


async def soak(base_url: str, settings: SoakSettings, server_pid: int | None) -> dict:
    """Run the clients (and the stalled one) and the memory sampler; the report's summary and details."""
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    timeout = httpx.Timeout(30.0, read=READ_TIMEOUT_S)
    limits = httpx.Limits(max_connections=settings.clients + 2, max_keepalive_connections=settings.clients + 2)
    before = await health(base_url)
    start = time.monotonic()
    deadline = start + settings.duration_s
    records = [ClientRecord(i) for i in range(settings.clients)]
    samples: list[dict] = []
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, limits=limits) as client:
        tasks = [client_loop(client, settings, deadline, r) for r in records]
        if settings.stalled_client:
            records.append(ClientRecord(settings.clients, stalled=True))
            tasks.append(stalled_loop(client, settings, deadline, records[-1]))
        if server_pid is not None:
            tasks.append(sample_memory(server_pid, settings.rss_interval_s, deadline, start, samples))
        await asyncio.gather(*tasks)
    wall = time.monotonic() - start
    after = await health(base_url)
    warmup = settings.warmup_s if settings.warmup_s is not None else settings.duration_s / 5
    return {
        "summary": summarize(records, wall, before, after),
        "clients": [client_row(r) for r in records],
        "memory": {"server_pid": server_pid, "warmup_s": warmup, **memory_growth(samples, warmup),
                   "samples": samples},
    }


def summarize(records: list[ClientRecord], wall: float, before: dict, after: dict) -> dict:
    unexpected = [e for r in records for e in r.unexpected]
    ttfts = [t for r in records for t in r.ttfts]
    latencies = [t for r in records for t in r.latencies]
    peers = [r.tokens_per_s for r in records if not r.stalled and r.tokens_per_s]
    out = {
        "wall_s": wall,
        "streams": sum(r.streams for r in records),
        "completed": sum(r.completed for r in records),
        "hangups": sum(r.hangups for r in records),
        "bad_requests": sum(r.bad_requests for r in records),
        "expected_4xx": sum(r.expected_4xx for r in records),
        "unexpected_errors": len(unexpected),
        "unexpected_samples": sorted(set(unexpected))[:10],
        "output_tokens": sum(r.output_tokens for r in records),
        "engine_restarts": (after.get("restarts") or 0) - (before.get("restarts") or 0) if after and before else None,
        "healthy_at_end": after.get("status") == "ready",
        "slowest_client_vs_median_tokens_per_s": min(peers) / percentile(peers, 50) if peers else None,
    }
    for name, values in (("ttft", ttfts), ("latency", latencies)):
        for q in (50, 90, 99):
            out[f"{name}_p{q}_s"] = percentile(values, q)
    return out


def client_row(record: ClientRecord) -> dict:
    row = {k: v for k, v in asdict(record).items() if k not in ("ttfts", "latencies", "unexpected")}
    return {**row, "unexpected": len(record.unexpected), "tokens_per_s": record.tokens_per_s,
            "latency_p50_s": percentile(record.latencies, 50)}


# ----- report -----------------------------------------------------------------------------------
def soak_markdown(report: dict) -> str:
    meta, summary, memory = report["meta"], report["summary"], report["memory"]
    machine = meta.get("machine", {})

    def fmt(value: object, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    mib = 2**20
    out = ["# Soak test", "", f"- command: `{meta.get('command', '')}`", f"- git commit: `{meta.get('git_commit')}`",
           f"- machine: {machine.get('cpu_count')} cores, {machine.get('cpu_model', '?')}, "
           f"{(machine.get('memory_bytes') or 0) / 2**30:.0f} GiB; torch {machine.get('torch')}",
           f"- settings: `{json.dumps(meta.get('settings'))}`", "",
           "| streams | completed | hung up | bad requests | expected 4xx | unexpected errors | engine restarts "
           "| TTFT p50 | TTFT p99 | latency p50 | latency p99 | slowest client / median |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
           f"| {summary['streams']} | {summary['completed']} | {summary['hangups']} | {summary['bad_requests']} | "
           f"{summary['expected_4xx']} | {summary['unexpected_errors']} | {fmt(summary['engine_restarts'])} | "
           f"{fmt(summary['ttft_p50_s'], 2)} | {fmt(summary['ttft_p99_s'], 2)} | {fmt(summary['latency_p50_s'], 2)} | "
           f"{fmt(summary['latency_p99_s'], 2)} | {fmt(summary['slowest_client_vs_median_tokens_per_s'], 2)} |", "",
           "| client | stalled | streams | completed | hung up | unexpected | tokens/s | latency p50 |",
           "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["clients"]:
        out.append(f"| {r['client']} | {'yes' if r['stalled'] else 'no'} | {r['streams']} | {r['completed']} | "
                   f"{r['hangups']} | {r['unexpected']} | {fmt(r['tokens_per_s'], 2)} | {fmt(r['latency_p50_s'], 2)} |")
    if memory.get("samples"):
        out += ["", f"Memory after a {memory['warmup_s']:.0f} s warm-up: server RSS grew "
                f"{memory['server_rss_growth_bytes'] / mib:+.1f} MiB (peak {memory['server_rss_max_bytes'] / mib:.0f}"
                f" MiB), engine {memory['engine_rss_growth_bytes'] / mib:+.1f} MiB (peak "
                f"{memory['engine_rss_max_bytes'] / mib:.0f} MiB); every sample is in the JSON."]
    if summary["unexpected_samples"]:
        out += ["", "Unexpected errors (samples):", ""] + [f"- `{e}`" for e in summary["unexpected_samples"]]
    return "\n".join(out) + "\n"


def write_soak_report(json_path: Path, report: dict) -> list[Path]:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md = json_path.with_suffix(".md")
    md.write_text(soak_markdown(report))
    return [json_path, md]


def run_soak_bench(args: argparse.Namespace) -> int:
    """`bench soak` (specdecpp/commands/bench.py): start a server or use --url, soak it, write the report.
    Returns 1 when a request failed unexpectedly or the server did not stay healthy."""
    from specdecpp.bench.machine import results_meta
    from specdecpp.model_args import config_flags, engine_config_from_args

    settings = SoakSettings(clients=args.clients, duration_s=args.minutes * 60, max_tokens=args.max_tokens,
                            temperature=args.temperature, hangup_rate=args.hangup_rate,
                            bad_request_rate=args.bad_request_rate, stalled_client=not args.no_stalled_client,
                            rss_interval_s=args.rss_interval, warmup_s=args.warmup, seed=args.seed,
                            api_key=args.api_key)
    server = None
    if args.start_server:
        serve = config_flags(engine_config_from_args(args)) + (["--api-key", args.api_key] if args.api_key else [])
        log_path = Path(tempfile.gettempdir()) / f"specdecpp-soak-{time.strftime('%Y%m%d-%H%M%S')}.log"
        server = ServerProcess(serve, log_path)
        print(f"starting the server on {server.url} (log {log_path})", file=sys.stderr)
        base_url, pid = server.url, server.process.pid
    else:
        check_loopback(args.url)
        base_url, pid = args.url.rstrip("/"), args.server_pid
    try:
        if server is not None:
            server.wait_healthy()
        settings.model = asyncio.run(served_model(base_url, args.api_key))
        print(f"soaking {base_url} ({settings.model}): {settings.clients} clients for {args.minutes:g} min",
              file=sys.stderr, flush=True)
        report = asyncio.run(soak(base_url, settings, pid))
    finally:
        if server is not None:
            server.stop()
    settings_record = {k: v for k, v in asdict(settings).items() if k != "api_key"}
    report = {"meta": results_meta(getattr(args, "argv", None), "built-in chat prompts",
                                   {"base_url": args.url or "started by the benchmark", "settings": settings_record}),
              **report}
    for path in write_soak_report(args.output, report):
        print(f"wrote {path}", file=sys.stderr)
    summary = report["summary"]
    print(f"{summary['completed']} streams completed, {summary['hangups']} hung up, {summary['expected_4xx']} "
          f"expected 4xx, {summary['unexpected_errors']} unexpected errors", file=sys.stderr)
    return 0 if summary["unexpected_errors"] == 0 and summary["healthy_at_end"] else 1


async def served_model(base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as client:
        response = await client.get("/v1/models")
        response.raise_for_status()
        return response.json()["data"][0]["id"]
