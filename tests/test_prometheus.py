"""A real Prometheus (Debian's `prometheus`) scrapes a live server; its query API returns the paper's ratios.

The server is fresh (only this module's traffic), so the counters' ratio must equal the
ratio computed from the per-request stats in the responses.
"""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest
from conftest import random_head
from live_server import TARGET_NAME, free_port, openai_client, save_tiny_pair, serve

PROMETHEUS = shutil.which("prometheus") or shutil.which("prometheus", path="/usr/bin:/usr/local/bin")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="Debian's prometheus binary is not installed (make system-deps installs it)"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_pair, tokenizer):
    root = tmp_path_factory.mktemp("prom-models")
    paths = save_tiny_pair(root, *tiny_pair, tokenizer, random_head(32, seed=4))
    yield from serve(paths, root)


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    root = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    (root / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: specdecpp\n    scrape_interval: 1s\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{server.port}']\n"
    )
    log = open(root / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={root / 'prometheus.yml'}", f"--storage.tsdb.path={root / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((root / "prometheus.log").read_text()[-3000:])
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def query(url: str, expr: str) -> float | None:
    result = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=5).json()
    assert result["status"] == "success", result
    samples = result["data"]["result"]
    return float(samples[0]["value"][1]) if samples else None


def test_prometheus_reports_the_discard_rate(server, prometheus):
    client = openai_client(server)
    totals = {"discarded": 0, "generated": 0, "target_calls": 0}
    for i, policy in enumerate(("specdec++", "constant", "heuristic", "confidence", "specdec++")):
        resp = client.completions.create(
            model=TARGET_NAME, prompt=f"prompt number {i}", max_tokens=40, temperature=1.0, seed=i,
            extra_body={"specdec": {"policy": policy, "k": 5}, "ignore_eos": True},
        )
        stats = resp.model_extra["specdec"]
        totals["discarded"] += stats["discarded_tokens"]
        totals["generated"] += stats["generated_tokens"]
        totals["target_calls"] += stats["target_calls"]
    assert totals["discarded"] > 0  # random tiny models disagree: the ratio is not trivially zero
    expected = totals["discarded"] / totals["generated"]

    discard = "sum(specdec_discarded_tokens_total) / sum(specdec_generated_tokens_total)"
    verification = "sum(specdec_target_calls_total) / sum(specdec_generated_tokens_total)"
    deadline, seen = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        seen = query(prometheus, discard)
        if seen is not None and seen == pytest.approx(expected, rel=1e-9):
            break
        time.sleep(0.5)
    assert seen == pytest.approx(expected, rel=1e-9), f"prometheus said {seen}, responses say {expected}"
    assert query(prometheus, verification) == pytest.approx(totals["target_calls"] / totals["generated"], rel=1e-9)
    assert query(prometheus, 'sum(specdec_requests_total{status="length"})') == 5
