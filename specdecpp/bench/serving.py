"""Serving benchmark: concurrent streaming clients against the OpenAI-compatible HTTP API.

Each request is a streamed chat completion (`stream_options.include_usage`), so the client
sees the time to the first token (TTFT), the gaps between content chunks (ITL; with
speculation one chunk may carry several tokens, as in vLLM's benchmark), and the token
count from the usage chunk; TPOT = (latency - TTFT) / (output tokens - 1). Load is either
a fixed number of clients in a closed loop (`concurrency`) or Poisson arrivals at
`request_rate` requests/s. The server's own acceptance numbers come from its Prometheus
counters (server/metrics.py), scraped before and after each row and differenced.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
COUNTERS = ("generated_tokens", "draft_tokens", "accepted_tokens", "discarded_tokens", "target_calls")


@dataclass
class RequestResult:
    ok: bool
    error: str | None = None
    output_tokens: int = 0
    ttft: float | None = None
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)  # gaps between content chunks after the first

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    @property
    def tokens_per_s(self) -> float | None:
        """This request's own output rate, prefill included (what one user sees)."""
        return self.output_tokens / self.latency if self.latency > 0 and self.output_tokens else None


def check_loopback(base_url: str) -> None:
    host = urlparse(base_url).hostname
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"the serving benchmark only talks to loopback servers, not {host!r}")


def parse_sse_data(line: str) -> dict | str | None:
    """The JSON payload of an SSE `data:` line, "[DONE]", or None for anything else."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if payload == "[DONE]":
        return payload
    return json.loads(payload)


def chunk_text(chunk: dict) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        text += delta.get("content") or choice.get("text") or ""
    return text


async def one_request(
    client: httpx.AsyncClient,
    messages: list[dict],
    max_tokens: int,
    temperature: float,
    seed: int | None,
    specdec: dict | None,
    model: str,
    ignore_eos: bool = False,
) -> RequestResult:
    """One streamed chat completion; timings are taken on this (client) side."""
    body: dict = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    if seed is not None:
        body["seed"] = seed
    if specdec:
        body["specdec"] = specdec
    start = time.perf_counter()
    result = RequestResult(ok=False)
    last = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:200]}"
                result.latency = time.perf_counter() - start
                return result
            async for line in response.aiter_lines():
                data = parse_sse_data(line)
                if data is None:
                    continue
                if data == "[DONE]":
                    break
                if data.get("error"):
                    result.error = str(data["error"])[:200]
                    break
                now = time.perf_counter()
                if chunk_text(data):
                    if result.ttft is None:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
                if data.get("usage"):
                    result.output_tokens = int(data["usage"].get("completion_tokens") or 0)
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.latency = time.perf_counter() - start
    result.ok = result.error is None
    return result


async def run_load(
    base_url: str,
    prompts: list[list[dict]],
    num_requests: int,
    max_tokens: int,
    temperature: float,
    concurrency: int | None = None,
    request_rate: float | None = None,
    specdec: dict | None = None,
    seed: int = 0,
    api_key: str | None = None,
    model: str = "",
    ignore_eos: bool = False,
    timeout: float = 600.0,
) -> tuple[list[RequestResult], float]:
    """Send `num_requests` requests (prompts cycled); returns the results and the wall duration.

    `concurrency` alone: that many clients in a closed loop. `request_rate`: Poisson arrivals,
    also capped at `concurrency` in flight if given.
    """
    if concurrency is None and request_rate is None:
        raise ValueError("give a concurrency, a request rate, or both")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(concurrency or num_requests)
    rng = random.Random(seed)
    results: list[RequestResult | None] = [None] * num_requests

    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout) as client:

        async def send(i: int) -> None:
            async with limit:
                results[i] = await one_request(
                    client, prompts[i % len(prompts)], max_tokens, temperature, seed + i, specdec, model, ignore_eos
                )

        start = time.perf_counter()
        tasks = []
        for i in range(num_requests):
            tasks.append(asyncio.create_task(send(i)))
            if request_rate is not None and i + 1 < num_requests:
                await asyncio.sleep(rng.expovariate(request_rate))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return [r for r in results if r is not None], duration


# ----- statistics ----------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    low, high = math.floor(pos), math.ceil(pos)
    return data[low] + (data[high] - data[low]) * (pos - low)


def summarize(results: list[RequestResult], duration: float) -> dict:
    """Throughput and latency percentiles over the successful requests; errors counted."""
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    row: dict = {
        "requests": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_samples": sorted({r.error for r in results if r.error})[:3],
        "duration_s": duration,
        "output_tokens": output_tokens,
        "throughput_tokens_per_s": output_tokens / duration if duration > 0 else None,
        "request_throughput": len(ok) / duration if duration > 0 else None,
    }
    series = {
        "ttft": [r.ttft for r in ok if r.ttft is not None],
        "tpot": [r.tpot for r in ok if r.tpot is not None],
        "itl": [gap for r in ok for gap in r.itls],
        "latency": [r.latency for r in ok],
        "request_tokens_per_s": [r.tokens_per_s for r in ok if r.tokens_per_s is not None],
    }
    for name, values in series.items():
        unit = "" if name.endswith("_per_s") else "_s"
        row[f"{name}_mean{unit}"] = sum(values) / len(values) if values else None
        for q in (50, 90, 99):
            row[f"{name}_p{q}{unit}"] = percentile(values, q)
    row["request_tokens_per_s_min"] = min(series["request_tokens_per_s"], default=None)
    return row


def parse_counters(text: str) -> dict[str, float]:
    """specdec_* counter totals from a /metrics page, summed over their labels."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.type != "counter" or not family.name.startswith("specdec_"):
            continue
        name = family.name.removeprefix("specdec_")
        totals[name] = sum(s.value for s in family.samples if s.name.endswith("_total"))
    return totals


def acceptance_from_counters(before: dict[str, float], after: dict[str, float]) -> dict:
    """The paper's rates from the counter increments between two scrapes (server/metrics.py)."""
    delta = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in COUNTERS}
    generated, drafted = delta["generated_tokens"], delta["draft_tokens"]
    return {
        "server_counters": delta,
        "acceptance_rate": delta["accepted_tokens"] / drafted if drafted else None,
        "discard_rate": delta["discarded_tokens"] / generated if generated else None,
        "verification_rate": delta["target_calls"] / generated if generated else None,
    }


async def scrape(base_url: str) -> dict[str, float] | None:
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            response = await client.get("/metrics")
            response.raise_for_status()
            return parse_counters(response.text)
    except httpx.HTTPError:
        return None


async def server_info(base_url: str, api_key: str | None) -> dict:
    """The server's model card (draft, head, default spec, batching if it says)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as client:
            response = await client.get("/v1/models")
            response.raise_for_status()
            return (response.json().get("data") or [{}])[0]
    except (httpx.HTTPError, ValueError):
        return {}


async def bench_row(
    base_url: str,
    prompts: list[list[dict]],
    num_requests: int,
    max_tokens: int,
    temperature: float,
    concurrency: int | None,
    request_rate: float | None,
    specdec: dict | None,
    seed: int = 0,
    api_key: str | None = None,
    model: str | None = None,
    ignore_eos: bool = False,
) -> dict:
    """One row: metrics scrape, load, scrape again; client-side and server-side numbers."""
    if model is None:
        model = (await server_info(base_url, api_key)).get("id", "")
    before = await scrape(base_url)
    results, duration = await run_load(
        base_url, prompts, num_requests, max_tokens, temperature, concurrency, request_rate, specdec, seed, api_key,
        model, ignore_eos,
    )
    after = await scrape(base_url)
    row = {
        "policy": (specdec or {}).get("policy", "server-default"),
        "specdec": specdec,
        "concurrency": concurrency,
        "request_rate": request_rate,
        "temperature": temperature,
        "max_tokens": max_tokens,
        **summarize(results, duration),
    }
    if before is not None and after is not None:
        row.update(acceptance_from_counters(before, after))
    return row


# ----- a server of our own -------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`specdecpp serve` in a subprocess on a free loopback port (`bench serving --start-server`, the
    server tests); its output goes to `log_path`, `env` adds to this process's environment."""

    def __init__(self, serve_args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "specdecpp.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               *serve_args]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})})

    def wait_healthy(self, timeout: float = 900.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}); see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the server was not healthy after {timeout:.0f}s; see {self.log_path}")

    def log(self) -> str:
        """The end of the server's output."""
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send `sig` (killing after `timeout` seconds); the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode
