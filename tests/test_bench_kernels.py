"""The kernels report joins bench rows, their run's quantization, forward costs and TTFT."""

from __future__ import annotations

import json

import pytest

from specdecpp.bench.kernels import write_kernels_report


def write_run(tmp_path, name: str, quantization: str | None, rows: list[tuple[str, float | None, float, float]],
              firsts: dict[tuple[str, float | None], list[float]]):
    models = {"target": "t", "draft": "d"} | ({"draft_quantization": quantization} if quantization else {})
    bench = {"meta": {"models": models}, "rows": [
        {"label": f"{p} {k}", "policy": p, "knob": k, "tokens_per_s": tps, "speedup": sp} for p, k, tps, sp in rows]}
    run = tmp_path / f"{name}.json"
    run.write_text(json.dumps(bench))
    lines = [json.dumps({"settings": {}})]
    for (policy, knob), values in firsts.items():
        lines += [json.dumps({"policy": policy, "knob": knob, "stats": {"first_token_seconds": v}}) for v in values]
    run.with_suffix(".checkpoint.jsonl").write_text("\n".join(lines) + "\n")
    return run


def test_rows_carry_quantization_costs_and_ttft(tmp_path):
    plain = write_run(tmp_path, "plain", None, [("none", None, 2.0, 1.0), ("constant", 7, 3.0, 1.5)],
                      {("none", None): [1.0, 3.0], ("constant", 7): [2.0]})
    quant = write_run(tmp_path, "int8", "int8", [("none", None, 2.1, 1.0), ("constant", 7, 3.9, 1.857)],
                      {("none", None): [1.5], ("constant", 7): [1.0, 2.0]})
    costs = []
    for name, draft in (("c0", 0.15), ("c1", 0.08)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"draft_step": draft, "target": {"1": 0.37, "2": 0.38}}))
        costs.append(path)
    json_path, md_path = write_kernels_report([(plain, costs[0]), (quant, costs[1])], tmp_path / "k.json", ["n"])
    rows = json.loads(json_path.read_text())["rows"]
    assert [(r["draft_quantization"], r["policy"]) for r in rows] == [
        ("none", "none"), ("none", "constant"), ("int8", "none"), ("int8", "constant")]
    assert rows[0]["ttft_s"] == 2.0 and rows[3]["ttft_s"] == 1.5
    assert rows[1]["draft_forward_ms"] == 150.0 and rows[3]["draft_forward_ms"] == 80.0
    assert rows[3]["target_forward_ms"] == 370.0 and rows[3]["speedup"] == 1.857
    assert "| int8.json | constant 7 | int8 | none | 3.90 | 1.857 | 80 | 370 | 1.50 |" in md_path.read_text()


def test_costs_come_from_the_run_when_no_file_is_given(tmp_path):
    run = write_run(tmp_path, "recorded", "int8", [("none", None, 2.0, 1.0)], {("none", None): [1.0]})
    bench = json.loads(run.read_text())
    bench["meta"]["cost_model_at_start"] = {"draft_step": 0.07, "target": {"1": 0.3}}
    run.write_text(json.dumps(bench))
    json_path, _ = write_kernels_report([(run, None)], tmp_path / "k.json", [])
    row = json.loads(json_path.read_text())["rows"][0]
    assert (row["draft_forward_ms"], row["target_forward_ms"]) == (70.0, 300.0)
    old = write_run(tmp_path, "old", None, [("none", None, 2.0, 1.0)], {("none", None): [1.0]})
    with pytest.raises(ValueError, match="records no cost model"):
        write_kernels_report([(old, None)], tmp_path / "k2.json", [])
