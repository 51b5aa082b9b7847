"""`specdecpp bench soak`, briefly, against a live tiny server: the report's shape and no unexpected error."""

from __future__ import annotations

import json

from conftest import random_head
from live_server import LiveServer, save_tiny_pair

from specdecpp.cli import main


def test_soak_report(tmp_path, tiny_pair, tokenizer):
    paths = save_tiny_pair(tmp_path, *tiny_pair, tokenizer, random_head(32, seed=5))
    server = LiveServer(paths, tmp_path / "server.log")
    output = tmp_path / "soak.json"
    try:
        server.wait_healthy()
        code = main(["bench", "soak", "--url", server.url, "--server-pid", str(server.process.pid),
                     "--clients", "3", "--minutes", "0.33", "--max-tokens", "16", "--hangup-rate", "0.3",
                     "--bad-request-rate", "0.3", "--rss-interval", "1", "--output", str(output)])
    finally:
        server.stop()
    report = json.loads(output.read_text())
    summary = report["summary"]
    assert code == 0, (summary["unexpected_samples"], server.log())
    assert summary["unexpected_errors"] == 0 and summary["healthy_at_end"] and summary["engine_restarts"] == 0
    assert summary["completed"] > 0 and summary["hangups"] > 0
    assert summary["expected_4xx"] == summary["bad_requests"] > 0
    assert summary["ttft_p50_s"] > 0 and summary["latency_p99_s"] >= summary["latency_p50_s"]
    clients = report["clients"]
    assert [c["stalled"] for c in clients] == [False, False, False, True]
    assert all(c["tokens_per_s"] for c in clients[:3])
    memory = report["memory"]
    assert len(memory["samples"]) >= 10 and memory["samples"][0]["engine_rss"] > 0
    assert {"server_rss_growth_bytes", "engine_rss_growth_bytes"} <= set(memory)
    assert report["meta"]["machine"]["cpu_count"] and report["meta"]["command"].startswith("specdecpp bench soak")
    markdown = output.with_suffix(".md").read_text()
    assert markdown.startswith("# Soak test") and "unexpected errors" in markdown
