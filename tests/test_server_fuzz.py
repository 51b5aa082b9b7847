"""schemathesis fuzzes the live server from its own /openapi.json: no request it generates may
cause a server error, and every response must match the documented schema (errors: OpenAI's shape).

The served model name is an enum in the schema, so generated requests reach the handlers. The
server gets a short context (--max-model-len 64), so requests without max_tokens stay fast.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from conftest import random_head
from live_server import LiveServer, save_tiny_pair

pytest.importorskip("schemathesis")
API_KEY = "sk-fuzz"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_pair, tokenizer):
    root = tmp_path_factory.mktemp("fuzz")
    paths = save_tiny_pair(root, *tiny_pair, tokenizer, random_head(32, seed=4))
    live = LiveServer(paths, root / "server.log", ("--api-key", API_KEY, "--max-model-len", "64"))
    try:
        live.wait_healthy()
        yield live
    finally:
        assert live.stop() in (0, 130, -signal.SIGINT), live.log()


def test_schemathesis_finds_no_server_error_and_no_schema_violation(server, tmp_path):
    command = [
        sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()",
        "run", f"{server.url}/openapi.json", "--header", f"Authorization: Bearer {API_KEY}",
        "--checks", "not_a_server_error,response_schema_conformance",
        "--max-examples", "10", "--seed", "1", "--workers", "1", "--request-timeout", "30",
    ]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{run.stdout[-8000:]}\n{run.stderr[-2000:]}\n{server.log()}"
    assert " passed" in run.stdout.split("SUMMARY")[-1]  # it ran cases
