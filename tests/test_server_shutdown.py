"""Shutdown cancels what the grace period did not finish: streams end with an error chunk and [DONE]."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest
from conftest import random_head
from live_server import TARGET_NAME, save_tiny_pair, serve


@pytest.fixture
def server(tmp_path, tiny_pair, tokenizer):
    paths = save_tiny_pair(tmp_path, *tiny_pair, tokenizer, random_head(32, seed=5))
    yield from serve(paths, tmp_path, ("--shutdown-grace", "0.2"))


def test_sigint_cancels_in_flight_requests_cleanly(server):
    body = {"model": TARGET_NAME, "prompt": "hello", "max_tokens": 480, "ignore_eos": True,
            "specdec": {"policy": "none"}}
    plain: list[httpx.Response] = []
    waiter = threading.Thread(target=lambda: plain.append(httpx.post(f"{server.url}/v1/completions", json=body,
                                                                     timeout=60)))
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60) as resp:
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # generating
        waiter.start()
        server.process.send_signal(signal.SIGINT)
        rest = [line for line in lines if line.startswith("data: ")]
    waiter.join(timeout=60)
    assert server.process.wait(timeout=60) in (0, 130, -signal.SIGINT), server.log()
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2][6:])["error"]
    assert error["code"] == "request_cancelled"
    assert plain and plain[0].status_code == 503  # cancelled too, or refused once the server was stopping


def test_engine_killed_mid_batch_fails_every_request_cleanly(server):
    """SIGKILL to the engine while several streams and a plain request run: each gets an OpenAI-style error
    (in the stream, or a 5xx body), none hangs, and the server serves again once the engine is back."""
    body = {"model": TARGET_NAME, "max_tokens": 400, "ignore_eos": True, "specdec": {"policy": "none"}}
    outcomes: dict[str, object] = {}

    def stream(name: str, route: str, extra: dict) -> None:
        try:
            with httpx.stream("POST", f"{server.url}{route}", json={**body, **extra, "stream": True},
                              timeout=httpx.Timeout(60, read=30)) as resp:
                outcomes[name] = [line for line in resp.iter_lines() if line.startswith("data: ")]
        except httpx.HTTPError as exc:
            outcomes[name] = exc

    def plain(name: str) -> None:
        try:
            outcomes[name] = httpx.post(f"{server.url}/v1/completions", json={**body, "prompt": "plain"}, timeout=60)
        except httpx.HTTPError as exc:
            outcomes[name] = exc

    threads = [threading.Thread(target=stream, args=(f"s{i}", "/v1/completions", {"prompt": f"stream {i}"}))
               for i in range(3)]
    threads.append(threading.Thread(target=stream, args=("chat", "/v1/chat/completions",
                                                          {"messages": [{"role": "user", "content": "hi"}], "n": 2})))
    threads.append(threading.Thread(target=plain, args=("plain",)))
    for thread in threads:
        thread.start()
    wait_running(server, 6)
    old_pid = server.engine_pid()
    os.kill(old_pid, signal.SIGKILL)
    late = httpx.post(f"{server.url}/v1/completions", json={**body, "prompt": "late"}, timeout=60)
    assert late.status_code == 503 and late.json()["error"]["code"] == "engine_unavailable"  # refused or failed
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a request hung after the engine died"
    for name in ("s0", "s1", "s2", "chat"):
        lines = outcomes[name]
        assert isinstance(lines, list), (name, lines)
        assert lines[-1] == "data: [DONE]", (name, lines[-3:])
        error = json.loads(lines[-2][6:])["error"]
        assert error["code"] == "engine_unavailable" and error["type"] == "service_unavailable", (name, error)
    response = outcomes["plain"]
    assert isinstance(response, httpx.Response) and response.status_code == 503, response
    assert response.json()["error"]["code"] == "engine_unavailable"
    deadline = time.monotonic() + 180
    while httpx.get(f"{server.url}/health").status_code != 200:
        assert time.monotonic() < deadline, "the engine did not come back"
        time.sleep(0.2)
    assert server.engine_pid() != old_pid
    again = httpx.post(f"{server.url}/v1/completions", json={**body, "prompt": "again", "max_tokens": 4}, timeout=60)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 4


def wait_running(server, count: int, timeout: float = 60.0) -> None:
    """Until the engine reports `count` running requests (the Prometheus gauge)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in httpx.get(f"{server.url}/metrics").text.splitlines():
            if line.startswith("specdec_running_requests ") and float(line.split()[1]) >= count:
                return
        time.sleep(0.1)
    raise AssertionError(f"never {count} running requests:\n{server.log()}")
