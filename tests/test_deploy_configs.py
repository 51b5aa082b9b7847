"""Deployment files: the compose stack validates, Prometheus accepts its config, the image is
sane, and every query on the Grafana dashboard reads metrics a live server really exports.

The dashboard check runs a live `specdecpp serve` on tiny models, sends traffic with several
policies, scrapes /metrics, then (1) compares each metric name the dashboard queries with the
exported names and labels, and (2) evaluates every query with promtool's PromQL engine over
those very series, asserting each one returns a number.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import random_head
from live_server import LiveServer, save_tiny_pair
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_TP = ROOT / "docker" / "compose.tp.yml"  # the tensor-parallel override of the GPU service
PROMETHEUS = ROOT / "docker" / "prometheus.yml"
GRAFANA = ROOT / "docker" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "specdecpp.json"
DATASOURCE = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER = GRAFANA / "provisioning" / "dashboards" / "specdecpp.yml"
DOCKERFILE = ROOT / "Dockerfile"
POLICIES = ("specdec++", "constant", "heuristic", "none")

# ---- PromQL: the metric names and labels a query reads ---------------------------------

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")


def metric_names(expr: str) -> set[str]:
    """Every metric name a PromQL expression selects (identifiers that are not functions or keywords)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = GROUPING.sub(" ", s)
    names = set()
    for m in re.finditer(r"(?<![\w$.])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end() :].lstrip().startswith("(") or m.group(0).lower() in KEYWORDS:
            continue  # a function call or an operator
        names.add(m.group(0))
    return names


def label_names(expr: str) -> set[str]:
    """Labels a query matches on or groups by."""
    labels = {lbl.strip() for m in GROUPING.finditer(expr) for lbl in m.group(2).split(",") if lbl.strip()}
    for m in SELECTOR.finditer(expr):
        labels |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(2)))
    return labels


def test_metric_name_extraction():
    expr = (
        'histogram_quantile(0.9, sum by (policy, le) (rate(a_bucket{policy=~"$policy"}[$__rate_interval])))'
        ' / ignoring(x) (sum(rate(b_total{status="error"}[5m])) or vector(0)) + c'
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}
    assert label_names(expr) == {"policy", "le", "x", "status"}


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expr) for every query on the dashboard."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


# ---- a live server and what it exports -------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_pair, tokenizer) -> list[tuple[str, dict, float]]:
    """(sample name, labels, value) scraped from a live server after traffic with several policies."""
    target, draft = tiny_pair
    dirs = save_tiny_pair(tmp_path_factory.mktemp("deploy-models"), target, draft, tokenizer, random_head(32, seed=5))
    live = LiveServer(dirs, tmp_path_factory.mktemp("deploy-log") / "server.log")
    try:
        live.wait_healthy()
        for i, policy in enumerate(POLICIES):
            body = {
                "model": "tiny-target",
                "messages": [{"role": "user", "content": f"hello {i}"}],
                "max_tokens": 12,
                "temperature": 1.0,
                "seed": i,
                "specdec": {"policy": policy},
            }
            r = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
        # a fixed level, so the head surely judges candidates whatever the cost model: the calibration gauges
        body = {**body, "specdec": {"policy": "specdec++", "threshold": 0.5}}
        r = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200 and r.json()["specdec"]["judged_candidates"] > 0, r.text
        text = httpx.get(f"{live.url}/metrics", timeout=10).text
    finally:
        code = live.stop()
    assert code in (0, 130, -signal.SIGINT), live.log()
    samples = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if family.name.startswith("specdec_") and not s.name.endswith("_created"):
                samples.append((s.name, dict(s.labels), float(s.value)))
    assert {s[1].get("policy") for s in samples} >= set(POLICIES), "traffic did not reach every policy"
    return samples


def test_dashboard_reads_only_exported_metrics_and_labels(exported):
    labels_of: dict[str, set[str]] = {}
    for name, labels, _ in exported:
        labels_of.setdefault(name, set()).update(labels)
    targets = dashboard_targets()
    assert len(targets) >= 12
    queried = set()
    for title, expr in targets:
        names = metric_names(expr)
        assert names, f"panel {title!r}: no metric in {expr!r}"
        for name in names:
            assert name in labels_of, f"panel {title!r} queries {name}, which the server does not export"
            missing = label_names(expr) - labels_of[name]
            assert not missing, f"panel {title!r}: {name} has no label {sorted(missing)}"
        queried |= names
    # Every exported family is on the dashboard (strip the histogram/counter sample suffixes).
    family = re.compile(r"_(bucket|sum|count)$")
    assert {family.sub("", n) for n in labels_of} - {family.sub("", n) for n in queried} == set()


GAUGES = ("specdec_queue_depth", "specdec_running_requests", "specdec_auto_candidate_budget")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (make system-deps)")
def test_every_dashboard_query_returns_data(exported, tmp_path):
    """Evaluate each query with promtool over the exported series, growing as live counters do."""
    series = []
    for name, labels, value in exported:
        text = ",".join(f'{k}="{v}"' for k, v in sorted({**labels, "job": "specdecpp"}.items()))
        kind_gauge = name in GAUGES or name.startswith("specdec_cost_")
        v = f"{value:.12f}".rstrip("0").rstrip(".") or "0"  # no exponent: "1e+06" would read as a series step
        series.append({"series": f"{name}{{{text}}}", "values": f"{v}x40" if kind_gauge else f"0+{v}x40"})
    # Grafana's variables as it would fill them: all policies, or one (regex-escaped, as Grafana does).
    fills = [{"$policy": ".*"}, {"$policy": re.escape("specdec++").replace("\\", "\\\\")}]
    rules, alerts = [], []
    for i, (title, expr) in enumerate(dashboard_targets()):
        for j, fill in enumerate(fills if "$policy" in expr else fills[:1]):
            query = expr.replace("$__rate_interval", "5m").replace("$__range", "30m")
            for var, val in fill.items():
                query = query.replace(var, val)
            name = f"q{i}_{j}"
            rules.append({"alert": name, "expr": f"count(({query}) >= 0) > 0", "annotations": {"panel": title}})
            expected = {"exp_labels": {}, "exp_annotations": {"panel": title}}
            alerts.append({"eval_time": "35m", "alertname": name, "exp_alerts": [expected]})
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    test = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": alerts}],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test))
    check = subprocess.run(["promtool", "check", "rules", "rules.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    run = subprocess.run(["promtool", "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


# ---- static checks on the files --------------------------------------------------------


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (make system-deps)")
def test_promtool_accepts_prometheus_config():
    run = subprocess.run(["promtool", "check", "config", str(PROMETHEUS)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed (make system-deps)")
def test_compose_file_validates():
    for profile in ("gpu", "cpu"):
        run = subprocess.run(
            ["docker-compose", "-f", str(COMPOSE), "--profile", profile, "config", "-q"],
            capture_output=True, text=True, cwd=ROOT,
        )
        assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed (make system-deps)")
def test_tensor_parallel_override_validates_and_splits_the_target():
    run = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "-f", str(COMPOSE_TP), "--profile", "gpu", "config"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "SPECDECPP_TP": "8"},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    gpu = yaml.safe_load(run.stdout)["services"]["specdecpp-gpu"]
    assert gpu["ipc"] == "host" and "--tensor-parallel-size 8" in str(gpu["command"])


def test_compose_stack_is_wired_together():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"specdecpp-gpu", "specdecpp-cpu", "prometheus", "grafana"} <= set(services)
    gpu = services["specdecpp-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    # Both server variants answer to the name Prometheus scrapes, on the port the image serves.
    scrape = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    targets = [t for job in scrape for cfg in job.get("static_configs", []) for t in cfg["targets"]]
    host, port = next(t for t in targets if t.startswith("specdecpp")).split(":")
    for name in ("specdecpp-gpu", "specdecpp-cpu"):
        assert host in services[name]["networks"]["default"]["aliases"]
        assert any(str(p).endswith(f":{port}") for p in services[name]["ports"])
        assert any(str(v).endswith(":/data") for v in services[name]["volumes"])
    assert f"EXPOSE {port}" in DOCKERFILE.read_text()
    # Every bind mount exists in the repo, and Grafana finds its provisioning and dashboard.
    for svc in services.values():
        for volume in svc.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"compose mounts missing {source}"
    grafana_mounts = dict(str(v).split(":")[:2] for v in services["grafana"]["volumes"])
    assert grafana_mounts["./docker/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load(DASHBOARD_PROVIDER.read_text())["providers"][0]
    assert grafana_mounts["./docker/grafana/dashboards"] == provider["options"]["path"]
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    datasource = yaml.safe_load(DATASOURCE.read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    uids |= {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    assert uids == {datasource["uid"]}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dockerfile_is_sane():
    text = DOCKERFILE.read_text()
    instructions = [line.split(None, 1) for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    ops = {op for op, *_ in instructions}
    assert {"FROM", "USER", "HEALTHCHECK", "VOLUME", "ENTRYPOINT"} <= ops
    user = [rest for op, *rest in instructions if op == "USER"][-1][0]
    assert user not in ("root", "0")
    assert "/health" in text and 'ENTRYPOINT ["specdecpp", "serve", "--host", "0.0.0.0"' in text
    assert "SPECDECPP_HOME=/data" in text and 'VOLUME ["/data"]' in text
    assert re.search(r"ARG VARIANT=cuda", text) and "base-cpu" in text and "whl/cpu" in text
    assert 'torch==${TORCH_VERSION}' in text and "ARG TORCH_VERSION=2.13.0" in text
    # Everything the image copies survives .dockerignore, and every package pip installs is copied.
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] == "!"}
    copied = set()
    for op, *rest in instructions:
        if op == "COPY":
            copied |= set(rest[0].split()[:-1])
    assert copied <= allowed
    pyproject = (ROOT / "pyproject.toml").read_text()
    packages = re.search(r"include = \[([^\]]*)\]", pyproject).group(1)
    for pattern in re.findall(r'"([^"]+)\*"', packages):
        assert pattern in copied, f"package {pattern} is installed by pyproject but not copied into the image"
