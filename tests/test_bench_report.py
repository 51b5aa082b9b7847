"""Results files: JSON with meta and rows, a markdown table per temperature, PNG plots."""

from __future__ import annotations

import json

import pytest

from specdecpp.bench.machine import command_line, machine_record
from specdecpp.bench.report import merge_offline, write_offline_report, write_serving_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(policy: str, knob, temperature: float, tps: float, discard: float | None, verification: float | None):
    return {"policy": policy, "knob_name": None if knob is None else "k", "knob": knob, "temperature": temperature,
            "tokens_per_s": tps, "speedup": tps / 3.0, "discard_rate": discard, "verification_rate": verification,
            "acceptance_rate": None if policy == "none" else 0.7, "mean_candidate_length": 3.0, "prompts": 2,
            "generated_tokens": 100}


ROWS = [
    _row("none", None, 1.0, 3.0, 0.0, 1.0),
    _row("constant", 2, 1.0, 5.0, 0.2, 0.4),
    _row("constant", 4, 1.0, 6.0, 0.5, 0.3),
    _row("specdec++", 0.3, 1.0, 6.5, 0.3, 0.3),
    _row("specdec++-post", 0.3, 1.0, 6.2, 0.3, 0.3),
    _row("heuristic", 4, 1.0, 5.5, 0.4, 0.35),
    _row("hf-dynamic", 0.4, 1.0, 4.0, None, None),
    _row("none", None, 0.0, 3.0, 0.0, 1.0),
    _row("constant", 4, 0.0, 7.0, 0.3, 0.25),
]


def test_offline_report_files(tmp_path):
    meta = {"command": "specdecpp bench offline --quick", "git_commit": "abc", "dataset": "humaneval",
            "machine": machine_record()}
    paths = write_offline_report(tmp_path / "offline-test.json", ROWS, meta)
    assert [p.name for p in paths] == ["offline-test.json", "offline-test.md", "offline-test-frontier.png",
                                       "offline-test-speedup.png"]
    data = json.loads(paths[0].read_text())
    assert data["rows"] == ROWS and data["meta"]["command"] == meta["command"]
    md = paths[1].read_text()
    assert "## temperature 1" in md and "## temperature 0" in md
    assert md.count("| constant |") == 3 + 2  # the full tables, and the best k in each headline
    assert "specdec++ (best threshold) vs best constant k: +8.3% tokens/s." in md  # 6.5 / 6.0
    assert "| specdec++ | k=0.3 | **6.50** | **2.17** | - |" in md  # best row of its policy in bold
    assert "| hf-dynamic | k=0.4 | **4.00** | **1.33** | - | - | - |" in md  # unmeasured rates print as '-'
    assert "| specdec++-post | k=0.3 | **6.20** |" in md  # the post head row beside the default head
    assert "abc" in md and str(meta["machine"]["cpu_count"]) in md
    for png in paths[2:]:
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000


def test_offline_report_lists_the_comparisons(tmp_path):
    comparisons = [
        {"temperature": 1.0, "a": "T=1 specdec++ threshold=0.3", "b": "T=1 constant k=4", "ratio": 1.0833,
         "ci_low": 1.02, "ci_high": 1.15, "a_knob_interior": True, "b_knob_interior": False, "prompts": 2,
         "resamples": 2000},
        {"temperature": 1.0, "a": "T=1 constant k=4", "b": "T=1 none", "ratio": 2.0, "ci_low": None, "ci_high": None,
         "a_knob_interior": False, "b_knob_interior": False, "prompts": 2, "resamples": 2000},
    ]
    paths = write_offline_report(tmp_path / "offline.json", ROWS, {"dataset": "humaneval"}, comparisons)
    assert json.loads(paths[0].read_text())["comparisons"] == comparisons
    md = paths[1].read_text()
    assert "## Comparisons (paired bootstrap 95% CI by prompt)" in md
    assert "| T=1 specdec++ threshold=0.3 | T=1 constant k=4 | 1.083 | [1.020, 1.150] | yes | no | 2 |" in md
    assert "| T=1 constant k=4 | T=1 none | 2.000 | - | no | no | 2 |" in md
    assert md.index("## Comparisons") < md.index("## temperature 1")
    paths = write_offline_report(tmp_path / "bare.json", ROWS, {"dataset": "humaneval"})
    assert json.loads(paths[0].read_text())["comparisons"] == []  # the key is always there
    assert "## Comparisons" not in paths[1].read_text()


def test_merge_keeps_each_runs_speedup(tmp_path):
    meta = {"dataset": "humaneval", "settings": {"max_tokens": 8, "seed": 0}, "prompt_ids": ["a"], "command": "x",
            "git_commit": "abc", "created": "now", "machine": {}}
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    write_offline_report(first, ROWS[:3], meta)
    write_offline_report(second, [_row("none", None, 1.0, 2.0, 0.0, 1.0), _row("constant", 4, 1.0, 5.0, 0.4, 0.3)],
                         meta)
    rows, merged = merge_offline([first, second])
    assert [(r["policy"], r["knob"], r["run"]) for r in rows] == [
        ("none", None, "second"), ("constant", 2, "first"), ("constant", 4, "second")]
    assert [r["run"] for r in merged["runs"]] == ["first", "second"]
    write_offline_report(tmp_path / "merged.json", rows, merged)
    assert "| second |" in (tmp_path / "merged.md").read_text()
    other = tmp_path / "other.json"
    write_offline_report(other, ROWS[:1], {**meta, "prompt_ids": ["b"]})
    with pytest.raises(ValueError, match="prompt_ids"):
        merge_offline([first, other])


def test_machine_record_names_the_environment(monkeypatch):
    record = machine_record()
    assert record["cpu_count"] >= 1 and record["torch"] and record["transformers"]
    assert "memory_bytes" in record and "native_bf16" in record["cpu_features"]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # a run capped to AVX2 says so
    assert machine_record()["isa_caps"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_serving_report_files(tmp_path):
    row = {"policy": "specdec++", "concurrency": 2, "request_rate": None, "batching": "none", "requests": 4,
           "errors": 1, "throughput_tokens_per_s": 10.5, "request_throughput": 0.2, "ttft_p50_s": 0.5,
           "ttft_p99_s": 0.9, "tpot_p50_s": 0.1, "itl_p50_s": 0.2, "itl_p99_s": 0.4, "acceptance_rate": 0.8,
           "discard_rate": 0.1, "verification_rate": 0.3}
    json_path, md = write_serving_report(tmp_path / "serving.json", [row], {"command": "x", "machine": {}})
    assert json.loads(json_path.read_text())["rows"] == [row]
    assert "| specdec++ | 2 | - | none | 4 | 1 | 10.50 |" in md.read_text()


def test_the_command_line_stays_one_line_and_reruns_in_bash():
    import subprocess

    argv = ["bench", "offline", "--stop", "\n```\n", "--note", "it's a b"]
    line = command_line(argv)
    assert "\n" not in line and line.startswith("specdecpp bench offline --stop $'\\n```\\n'")
    echoed = subprocess.run(["bash", "-c", "printf '%s\\0' " + line.removeprefix("specdecpp ")],
                            capture_output=True, text=True, check=True).stdout.split("\0")[:-1]
    assert echoed == argv
