"""Serving benchmark: percentiles, summaries, counter diffs, and a run against a tiny live server."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random

import numpy as np
import pytest
from conftest import random_head
from live_server import LiveServer, save_tiny_pair

from engine.stats import RequestStats
from server.metrics import ServerMetrics
from specdecpp.bench.serving import (
    RequestResult,
    acceptance_from_counters,
    bench_row,
    check_loopback,
    parse_counters,
    parse_sse_data,
    percentile,
    scrape,
    summarize,
)
from specdecpp.cli import main


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_percentile_matches_numpy(n):
    rng = random.Random(n)
    values = [rng.expovariate(1.0) for _ in range(n)]
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 50) is None


def test_summarize_hand_made():
    results = [
        RequestResult(ok=True, output_tokens=5, ttft=1.0, latency=3.0, itls=[0.5, 0.5, 1.0]),
        RequestResult(ok=True, output_tokens=3, ttft=2.0, latency=3.0, itls=[1.0]),
        RequestResult(ok=False, error="HTTP 429: busy", latency=0.1),
    ]
    row = summarize(results, duration=4.0)
    assert row["requests"] == 3 and row["completed"] == 2 and row["errors"] == 1
    assert row["error_samples"] == ["HTTP 429: busy"]
    assert row["output_tokens"] == 8
    assert row["throughput_tokens_per_s"] == pytest.approx(2.0)
    assert row["ttft_p50_s"] == pytest.approx(1.5)
    assert row["tpot_p50_s"] == pytest.approx((0.5 + 0.5) / 2)  # (3-1)/4 and (3-2)/2
    assert row["itl_p50_s"] == pytest.approx(0.75)  # gaps pooled over requests: 0.5 0.5 1 1
    assert row["itl_p99_s"] == pytest.approx(1.0)


def test_counter_diff_gives_paper_rates():
    metrics = ServerMetrics()
    stats = RequestStats(policy="constant", generated_tokens=10, proposed_tokens=12, accepted_tokens=8,
                         target_calls=3, candidate_lengths=[4, 4, 4], accepted_lengths=[4, 2, 2],
                         first_token_seconds=0.1, total_seconds=1.0)
    assert stats.discarded_tokens == 4
    metrics.observe_request(stats, "stop")
    before = parse_counters(metrics.render().decode())
    metrics.observe_request(stats, "stop")
    metrics.observe_request(dataclasses.replace(stats, policy="specdec++"), "length")
    after = parse_counters(metrics.render().decode())
    assert after["generated_tokens"] == 30 and after["requests"] == 3
    rates = acceptance_from_counters(before, after)
    assert rates["server_counters"]["generated_tokens"] == 20
    assert rates["acceptance_rate"] == pytest.approx(16 / 24)
    assert rates["discard_rate"] == pytest.approx(8 / 20)
    assert rates["verification_rate"] == pytest.approx(6 / 20)


def test_sse_lines_and_loopback_only():
    assert parse_sse_data('data: {"a": 1}') == {"a": 1}
    assert parse_sse_data("data: [DONE]") == "[DONE]"
    assert parse_sse_data(": keep-alive") is None
    check_loopback("http://127.0.0.1:8000")
    with pytest.raises(ValueError, match="loopback"):
        check_loopback("http://example.com:8000")


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory, tiny_pair, tokenizer):
    root = tmp_path_factory.mktemp("bench-serving")
    target, draft = tiny_pair
    return save_tiny_pair(root, target, draft, tokenizer, random_head(32, seed=3))


@pytest.fixture(scope="module")
def live(tiny_paths):
    server = LiveServer(tiny_paths, tiny_paths["head"].parent / "server.log")
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


def test_load_against_a_live_server(live):
    prompts = [[{"role": "user", "content": "hello there"}], [{"role": "user", "content": "a cat sat"}]]
    row = asyncio.run(bench_row(live.url, prompts, num_requests=4, max_tokens=8, temperature=1.0, concurrency=2,
                                request_rate=None, specdec={"policy": "constant", "k": 2}))
    assert row["completed"] == 4 and row["errors"] == 0, row["error_samples"]
    assert 4 <= row["output_tokens"] <= 32
    assert row["server_counters"]["generated_tokens"] == row["output_tokens"]  # the server saw what we counted
    assert row["server_counters"]["draft_tokens"] > 0
    assert 0.0 <= row["acceptance_rate"] <= 1.0
    assert row["ttft_p50_s"] <= row["latency_p50_s"]
    assert row["ttft_p50_s"] <= row["ttft_p90_s"] <= row["ttft_p99_s"]


def test_cli_serving_writes_results(live, tmp_path):
    out = tmp_path / "serving.json"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello there"}\n{"prompt": "a cat sat"}\n')
    argv = ["bench", "serving", "--base-url", live.url, "--quick", "--concurrency", "1", "2",
            "--dataset", f"jsonl:{prompts}", "--baseline",
            "--configs", "none", "specdec++:threshold=0.5", "--output", str(out)]
    code = main(argv)
    assert code == 0
    data = json.loads(out.read_text())
    assert [(r["policy"], r["concurrency"], r["baseline"]) for r in data["rows"]] == [
        ("none", 1, True), ("none", 1, False), ("none", 2, False), ("specdec++", 1, False), ("specdec++", 2, False)]
    assert [r["throughput_vs_concurrency_1"] for r in data["rows"][1:4:2]] == [1.0, 1.0]
    assert all(r["slowest_request_vs_target_alone"] > 0 for r in data["rows"])
    # Against the target alone under the same load: the none rows compare with themselves.
    assert [r["throughput_vs_target_alone_same_load"] for r in data["rows"][1:3]] == [1.0, 1.0]
    spec_c2 = data["rows"][4]
    assert spec_c2["throughput_vs_target_alone_same_load"] == pytest.approx(
        spec_c2["throughput_tokens_per_s"] / data["rows"][2]["throughput_tokens_per_s"])
    assert spec_c2["slowest_request_vs_target_alone_same_load"] == pytest.approx(
        spec_c2["request_tokens_per_s_min"] / data["rows"][2]["request_tokens_per_s_mean"])
    assert data["meta"]["server"]["None"]["specdec"]["scheduler"]["batching"] is True
    errors = [r["error_samples"] for r in data["rows"]]
    assert all(r["errors"] == 0 and r["requests"] == 2 for r in data["rows"]), errors
    none = data["rows"][0]
    assert none["server_counters"]["draft_tokens"] == 0 and none["verification_rate"] == 1.0
    assert data["meta"]["machine"]["cpu_count"] >= 1 and "bench serving" in data["meta"]["command"]
    assert out.with_suffix(".md").is_file()

    # The same command again resumes from the checkpoint: same rows, no request sent.
    before = asyncio.run(scrape(live.url))
    assert main(argv) == 0
    assert asyncio.run(scrape(live.url))["generated_tokens"] == before["generated_tokens"]
    assert json.loads(out.read_text())["rows"] == data["rows"]


SERVING_FIELDS = ("policy", "knob", "concurrency", "batching", "throughput_tokens_per_s", "ttft_p50_s", "itl_p50_s",
                  "errors")  # what docs/benchmarks/serving-auto.json's rows must carry


def test_cli_serving_auto_rows(live, tmp_path):
    """The committed auto run's shape: the target alone and specdec++ at threshold auto (and a fixed one) at
    the same concurrencies, each row with its knob as it ran: "auto", the number, or none."""
    out = tmp_path / "serving-auto.json"
    argv = ["bench", "serving", "--base-url", live.url, "--quick", "--concurrency", "1", "2", "--dataset", "mixed",
            "--configs", "none", "specdec++:threshold=auto", "specdec++:threshold=0.4", "server-default",
            "--output", str(out)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["policy"], r["knob"], r["concurrency"]) for r in rows] == [
        ("none", None, 1), ("none", None, 2), ("specdec++", "auto", 1), ("specdec++", "auto", 2),
        ("specdec++", 0.4, 1), ("specdec++", 0.4, 2),
        ("server-default", "auto", 1), ("server-default", "auto", 2)]  # the server's default: auto
    for row in rows:
        assert all(field in row for field in SERVING_FIELDS), sorted(set(SERVING_FIELDS) - set(row))
        assert row["batching"] == "on" and row["errors"] == 0 and row["throughput_tokens_per_s"] > 0
        assert row["ttft_p50_s"] > 0 and row["itl_p50_s"] > 0
    assert rows[2]["throughput_vs_target_alone_same_load"] == pytest.approx(
        rows[2]["throughput_tokens_per_s"] / rows[0]["throughput_tokens_per_s"])
    assert "| specdec++ (auto) | 1 |" in out.with_suffix(".md").read_text()


def test_spec_configs_and_row_knobs():
    from specdecpp.bench.serving_run import parse_config, row_knob

    assert parse_config("specdec++:threshold=auto,bounds=2-9") == {"policy": "specdec++", "threshold": "auto",
                                                                    "bounds": [2, 9]}
    assert parse_config("specdec++:threshold=0.3") == {"policy": "specdec++", "threshold": 0.3}
    assert parse_config("server-default") is None
    with pytest.raises(ValueError):
        parse_config("specdec++:threshold=1.5")
    default = {"policy": "specdec++", "k": 4, "threshold": "auto", "p_min": 0.4}
    assert row_knob(None, default) == "auto"
    assert row_knob({"policy": "specdec++", "threshold": 0.3}, default) == 0.3
    assert row_knob({"policy": "constant"}, default) == 4 and row_knob({"policy": "confidence"}, default) == 0.4
    assert row_knob({"policy": "none"}, default) is None and row_knob({"policy": "constant", "k": 2}, {}) == 2


def test_cli_serving_batching_modes(tiny_paths, tmp_path):
    """One server per batching mode, started by the benchmark; rows labelled by mode."""
    out = tmp_path / "serving.json"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello there"}\n{"prompt": "a cat sat"}\n')
    code = main(["bench", "serving", "--start-server", "--target", str(tiny_paths["target"]),
                 "--draft", str(tiny_paths["draft"]), "--head", str(tiny_paths["head"]), "--dtype", "fp32",
                 "--batching-modes", "on", "off", "--quick", "--concurrency", "2", "--dataset", f"jsonl:{prompts}",
                 "--configs", "constant:k=2", "--output", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert [(r["batching"], r["concurrency"], r["errors"]) for r in data["rows"]] == [("on", 2, 0), ("off", 2, 0)]
    assert data["meta"]["server"]["on"]["specdec"]["scheduler"]["batching"] is True
    assert data["meta"]["server"]["off"]["specdec"]["scheduler"]["batching"] is False


def test_started_server_gets_the_engine_flags():
    """`bench serving --start-server` passes every engine flag given on to the server it starts."""
    from specdecpp.bench.serving_run import serve_args
    from specdecpp.cli import build_parser
    from specdecpp.model_args import engine_config_from_args

    given = ["--target", "t", "--draft", "d", "--head", "h", "--extra-head", "post=p", "--dtype", "fp16",
             "--draft-dtype", "fp32", "--draft-device", "cpu", "--target-devices", "cuda:1,cuda:2",
             "--max-model-len", "256", "--max-num-seqs", "3", "--max-num-batched-tokens", "64", "--kv-cache-tokens",
             "999", "--speculative-disable-by-batch-size", "4", "--speculative-batch-candidates", "8",
             "--cpu-fp32-gemm", "off"]
    args = build_parser().parse_args(["bench", "serving", "--start-server", *given, "--api-key", "k"])
    flags = serve_args(args)
    for flag, value in (("--max-num-seqs", "3"), ("--max-num-batched-tokens", "64"),
                        ("--speculative-disable-by-batch-size", "4"), ("--speculative-batch-candidates", "8"),
                        ("--cpu-fp32-gemm", "off"), ("--target-devices", "cuda:1,cuda:2"), ("--api-key", "k")):
        assert flags[flags.index(flag) + 1] == value
    serve = build_parser().parse_args(["serve", *flags])
    assert (serve.max_num_seqs, serve.max_num_batched_tokens, serve.spec_disable_batch_size) == (3, 64, 4)
    assert (serve.spec_batch_candidates, serve.cpu_fp32_gemm) == (8, "off")
    assert engine_config_from_args(serve) == engine_config_from_args(args)  # the server builds the same engine
    assert serve.batching and "--no-batching" not in flags
    off = serve_args(build_parser().parse_args(["bench", "serving", "--start-server", "--no-batching"]))
    assert build_parser().parse_args(["serve", *off]).batching is False
    modes = serve_args(build_parser().parse_args(["bench", "serving", "--start-server", "--no-batching",
                                                  "--batching-modes", "on", "off"]))
    assert "--no-batching" not in modes  # each mode adds its own


def test_started_server_flags_of_the_defaults():
    """The defaults' flags, as serving checkpoints record them (a rerun of the same command resumes)."""
    from specdecpp.bench.serving_run import serve_args
    from specdecpp.cli import build_parser

    assert serve_args(build_parser().parse_args(["bench", "serving", "--start-server"])) == [
        "--dtype", "bf16", "--tensor-parallel-size", "1", "--max-num-seqs", "8", "--max-num-batched-tokens", "512",
        "--kv-cache-tokens", "131072", "--cpu-fp32-gemm", "auto", "--cpu-row-padding", "auto",
        "--draft-quantization", "auto", "--target-quantization", "none", "--head-quantization", "auto",
        "--max-over-acceptance", "0.0"]
