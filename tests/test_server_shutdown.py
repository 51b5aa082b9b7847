"""Shutdown cancels what the grace period did not finish: streams end with an error chunk and [DONE]."""

from __future__ import annotations

import json
import signal
import threading

import httpx
import pytest
from conftest import random_head
from live_server import TARGET_NAME, LiveServer, save_tiny_pair


@pytest.fixture
def server(tmp_path, tiny_pair, tokenizer):
    paths = save_tiny_pair(tmp_path, *tiny_pair, tokenizer, random_head(32, seed=5))
    live = LiveServer(paths, tmp_path / "server.log", ("--shutdown-grace", "0.2"))
    try:
        live.wait_healthy()
        yield live
    finally:
        live.stop()


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
