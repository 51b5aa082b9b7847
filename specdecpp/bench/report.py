"""Results files: JSON (`meta`, `rows`, offline `comparisons`), a markdown table, and PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import json
from pathlib import Path

# One colour and marker per policy across every plot.
STYLE = {
    "none": ("black", "*"),
    "constant": ("tab:blue", "o"),
    "heuristic": ("tab:purple", "D"),
    "confidence": ("tab:green", "^"),
    "specdec++": ("tab:red", "s"),
    "specdec++-post": ("tab:pink", "D"),
    "specdec++-exact": ("tab:gray", "d"),  # results written before the post head replaced this row
    "hf-constant": ("tab:cyan", "v"),
    "hf-dynamic": ("tab:orange", "P"),
    "hf-heuristic": ("tab:brown", "X"),
}


def write_json(path: Path, rows: list[dict], meta: dict, comparisons: list[dict] | None = None) -> None:
    data = {"meta": meta, "rows": rows}
    if comparisons is not None:
        data["comparisons"] = comparisons
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _fmt(value: object, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def knob_text(knob: float | str) -> str:
    """A knob as tables and plots print it: a number compactly, "auto" as is."""
    return knob if isinstance(knob, str) else f"{knob:g}"


def _numeric(knob: object) -> bool:
    return isinstance(knob, int | float)


def _knob(row: dict) -> str:
    if row.get("knob") is None:
        return "-"
    return f"{row['knob_name']}={knob_text(row['knob'])}"


def best_row(rows: list[dict], policy: str, temperature: float) -> dict | None:
    """The fastest row of `policy` at `temperature` (its best knob); theory rows (several draft paths, lossy
    over-acceptance) compete only among themselves."""
    candidates = [r for r in rows if r["policy"] == policy and r["temperature"] == temperature
                  and r["tokens_per_s"] is not None and r.get("num_drafts", 1) == 1 and r.get("lossless", True)]
    return max(candidates, key=lambda r: r["tokens_per_s"], default=None)


def headline(rows: list[dict], temperature: float) -> list[dict]:
    """Target alone, each policy at its best knob, and hf-constant at the best constant k."""
    out = []
    for policy in ("none", "constant", "heuristic", "confidence", "specdec++", "specdec++-post", "specdec++-exact",
                   "hf-dynamic", "hf-heuristic"):
        row = best_row(rows, policy, temperature)
        if row is not None:
            out.append(row)
    best_constant = best_row(rows, "constant", temperature)
    if best_constant is not None:
        same_k = [r for r in rows if r["policy"] == "hf-constant" and r["temperature"] == temperature
                  and r["knob"] == best_constant["knob"]]
        out += same_k or [r for r in [best_row(rows, "hf-constant", temperature)] if r is not None]
    return out


def headline_markdown(rows: list[dict], temperature: float) -> str:
    """The short table for the README: best knob per policy, speedups, specdec++ over best constant."""
    lines = ["| policy | best knob | tokens/s | speedup vs target alone | decode speedup | discard rate "
             "| verification rate |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in headline(rows, temperature):
        lines.append(f"| {r['policy']} | {_knob(r)} | {_fmt(r['tokens_per_s'], 2)} | {_fmt(r['speedup'], 2)}x | "
                     f"{_fmt(r.get('decode_speedup'), 2)}x | {_fmt(r['discard_rate'])} | "
                     f"{_fmt(r['verification_rate'])} |")
    sdpp, constant = best_row(rows, "specdec++", temperature), best_row(rows, "constant", temperature)
    if sdpp is not None and constant is not None and constant["tokens_per_s"]:
        gain = sdpp["tokens_per_s"] / constant["tokens_per_s"] - 1
        lines += ["", f"specdec++ (best threshold) vs best constant k: {gain:+.1%} tokens/s."]
    return "\n".join(lines) + "\n"


def comparisons_markdown(comparisons: list[dict]) -> str:
    """The comparisons table; an edge knob is flagged since a wider sweep might beat it."""
    lines = ["| a | b | ratio (a / b tokens/s) | 95% CI | a knob interior | b knob interior | prompts |",
             "|---|---|---:|---|---|---|---:|"]
    for c in comparisons:
        interval = "-" if c["ci_low"] is None else f"[{c['ci_low']:.3f}, {c['ci_high']:.3f}]"
        lines.append(f"| {c['a']} | {c['b']} | {_fmt(c['ratio'])} | {interval} | {_yes_no(c['a_knob_interior'])} | "
                     f"{_yes_no(c['b_knob_interior'])} | {_fmt(c.get('prompts'))} |")
    return "\n".join(lines) + "\n"


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def offline_markdown(rows: list[dict], meta: dict, comparisons: list[dict] | None = None) -> str:
    """A headline table, the comparisons, and one full table per temperature; the best row of each
    policy in bold."""
    out = [f"# Offline benchmark: {meta.get('dataset', '')}", ""]
    out.append(_meta_lines(meta))
    for temperature in sorted({r["temperature"] for r in rows}, reverse=True):
        out += ["", f"## headline, temperature {temperature:g}", "", headline_markdown(rows, temperature).rstrip()]
    if comparisons:
        out += ["", "## Comparisons (paired bootstrap 95% CI by prompt)", "",
                "Each policy at its fastest knob; tokens/s are ratios of sums over prompts, and the interval "
                "resamples prompts jointly for both rows. A knob that is not interior sits at an end of its sweep.",
                "", comparisons_markdown(comparisons).rstrip()]
    if "theory" in meta:
        out += ["", theory_markdown(rows, meta["theory"]).rstrip()]
    for temperature in sorted({r["temperature"] for r in rows}, reverse=True):
        rs = [r for r in rows if r["temperature"] == temperature]
        best = {}
        for r in rs:
            if r["tokens_per_s"] is not None and r["tokens_per_s"] > best.get(r["policy"], (-1.0, None))[0]:
                best[r["policy"]] = (r["tokens_per_s"], id(r))
        out += ["", f"## temperature {temperature:g}", ""]
        runs = any("run" in r for r in rs)
        out.append("| policy | knob | tokens/s | speedup | decode speedup | discard rate | verification rate "
                   "| acceptance rate | mean candidates | prompts | generated tokens |" + (" run |" if runs else ""))
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if runs else ""))
        for r in rs:
            bold = "**" if best.get(r["policy"], (None, None))[1] == id(r) and r["policy"] != "none" else ""
            out.append(
                f"| {r['policy']} | {_knob(r)} | {bold}{_fmt(r['tokens_per_s'], 2)}{bold} | "
                f"{bold}{_fmt(r['speedup'], 2)}{bold} | {_fmt(r.get('decode_speedup'), 2)} | "
                f"{_fmt(r['discard_rate'])} | "
                f"{_fmt(r['verification_rate'])} | {_fmt(r['acceptance_rate'])} | "
                f"{_fmt(r['mean_candidate_length'], 2)} | {r['prompts']} | {r['generated_tokens']} |"
                + (f" {r.get('run', '-')} |" if runs else "")
            )
    return "\n".join(out) + "\n"


def theory_markdown(rows: list[dict], theory: dict) -> str:
    """The theory rows side by side (draft paths, over-acceptance, pass@1, expected vs realized rejections,
    predicted speedups) and the tiny model's over-acceptance bias."""
    out = ["## Theory rows", "",
           "M: draft paths sharing the round's k candidates (k // M each); eps: over-acceptance (lossy above 0). "
           "Predicted: decode speedup from each row's tokens per target call, priced by this host's live cost "
           "model and by a memory-bound GPU's (a draft step a tenth of a target forward, both flat in rows).", "",
           "| row | M | eps | lossless | tokens/s | speedup | tokens per target call | acceptance rate "
           "| rejections | expected rejections | pass@1 | predicted here | predicted GPU |",
           "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in (r for r in rows if r["policy"] in ("none", "constant")):
        out.append(f"| {r['label']} | {r['num_drafts']} | {r['over_acceptance']:g} | {r['lossless']} | "
                   f"{_fmt(r['tokens_per_s'], 2)} | {_fmt(r['speedup'], 2)} | {_fmt(r['tokens_per_target_call'], 2)} | "
                   f"{_fmt(r['acceptance_rate'])} | {_fmt(r['rejections'], 0)} | {_fmt(r['expected_rejections'], 1)} | "
                   f"{_fmt(r.get('pass_at_1'))} | {_fmt(r.get('predicted_speedup_here'), 2)} | "
                   f"{_fmt(r.get('predicted_speedup_gpu'), 2)} |")
    if theory.get("comparisons"):
        out += ["", "Each theory row over the plain constant row of its k (tokens/s, paired bootstrap 95% CI by "
                "prompt):", "", "| row | over | ratio | 95% CI | prompts |", "|---|---|---:|---|---:|"]
        for c in theory["comparisons"]:
            out.append(f"| {c['a']} | {c['b']} | {_fmt(c['ratio'])} | [{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}] "
                       f"| {c['prompts']} |")
    if theory.get("tiny_model_bias"):
        out += ["", "Over-acceptance bias TV(output, target) on a tiny 6-token pair, one-candidate rounds through the "
                "engine's acceptance rule, next to the theory's value (the Pareto line: bias + rejection = TV(p, q)) "
                "and Decoding-UNO's (a rejection redrawn from the target):", "",
                "| eps | measured bias | theory bias | theory rejection | TV(p, q) | Decoding-UNO bias | samples |",
                "|---:|---:|---:|---:|---:|---:|---:|"]
        for b in theory["tiny_model_bias"]:
            out.append(f"| {b['epsilon']:g} | {b['tv_measured']:.4f} | {b['tv_theory']:.4f} | "
                       f"{b['rejection_theory']:.4f} | {b['tv_pq']:.4f} | {b['tv_uno']:.4f} | {b['samples']} |")
    return "\n".join(out) + "\n"


def _meta_lines(meta: dict) -> str:
    machine = meta.get("machine", {})
    parts = [f"- command: `{meta.get('command', '')}`", f"- git commit: `{meta.get('git_commit')}`"]
    if "runs" in meta:
        parts = [f"- run `{r['run']}`: `{r['command']}` at `{r['git_commit']}` ({r['created']})" for r in meta["runs"]]
    parts += [
        f"- machine: {machine.get('cpu_count')} cores, {machine.get('cpu_model', '?')}, "
        f"{(machine.get('memory_bytes') or 0) / 2**30:.0f} GiB; torch {machine.get('torch')}, "
        f"transformers {machine.get('transformers')}",
    ]
    for key in ("models", "settings"):
        if key in meta:
            parts.append(f"- {key}: `{json.dumps(meta[key])}`")
    for note in meta.get("notes", []):
        parts.append(f"- {note}")
    return "\n".join(parts)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_frontier(rows: list[dict], path: Path, title: str = "") -> None:
    """Discard rate vs verification rate, one curve per policy (the paper's Figure 4).

    Lower-left is better: fewer wasted draft tokens and fewer target calls per token. The
    target alone (discard 0, verification 1) is left out, as in the paper.
    """
    plt = _plt()
    temps = sorted({r["temperature"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(temps), figsize=(6 * len(temps), 4.5), squeeze=False)
    for ax, temperature in zip(axes[0], temps, strict=True):
        for policy, (colour, marker) in STYLE.items():
            if policy == "none":
                continue
            pts = [
                (r["discard_rate"], r["verification_rate"], r)
                for r in rows
                if r["policy"] == policy and r["temperature"] == temperature
                and r["discard_rate"] is not None and r["verification_rate"] is not None
            ]
            if not pts:
                continue
            pts.sort(key=lambda p: p[0])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=colour, label=policy,
                    linestyle="-" if len(pts) > 1 else "none")
            for x, y, r in pts:
                if r["knob"] is not None:
                    ax.annotate(knob_text(r["knob"]), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("discard rate (discarded draft tokens / generated tokens)")
        ax.set_ylabel("verification rate (target calls / generated tokens)")
        ax.set_title(f"{title} T={temperature:g}".strip())
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_speedup(rows: list[dict], path: Path, title: str = "") -> None:
    """Speedup over the target alone against each policy's knob (one panel per knob kind)."""
    plt = _plt()
    temps = sorted({r["temperature"] for r in rows}, reverse=True)
    panels = [("k", ("constant", "hf-constant")), ("p_min", ("confidence",)),
              ("threshold", ("specdec++", "specdec++-post", "specdec++-exact"))]
    fig, axes = plt.subplots(len(temps), len(panels), figsize=(5 * len(panels), 3.8 * len(temps)), squeeze=False)
    for row_axes, temperature in zip(axes, temps, strict=True):
        singles = [r for r in rows if r["temperature"] == temperature and r["speedup"] is not None
                   and (r["policy"] in ("heuristic", "hf-dynamic", "hf-heuristic") or isinstance(r["knob"], str))]
        for ax, (knob, policies) in zip(row_axes, panels, strict=True):
            for policy in policies:
                pts = sorted((r["knob"], r["speedup"]) for r in rows if r["policy"] == policy and _numeric(r["knob"])
                             and r["temperature"] == temperature and r["speedup"] is not None)
                if pts:
                    colour, marker = STYLE[policy]
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=colour, label=policy)
            for r in singles:  # knob-free adaptive rows (and "auto" knobs) as horizontal references
                colour, _ = STYLE[r["policy"]]
                label = r["policy"] if r["knob"] is None or _numeric(r["knob"]) else f"{r['policy']} {r['knob']}"
                ax.axhline(r["speedup"], color=colour, linestyle="--", linewidth=1, label=label)
            ax.axhline(1.0, color="black", linewidth=0.8, label="target alone")
            ax.set_xlabel(knob)
            ax.set_ylabel("speedup over target alone")
            ax.set_title(f"{title} T={temperature:g}".strip())
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_offline_report(json_path: Path, rows: list[dict], meta: dict,
                         comparisons: list[dict] | None = None) -> list[Path]:
    """JSON, markdown and the two plots next to each other; returns the paths written."""
    stem = json_path.with_suffix("")
    md, frontier, speedup = stem.with_suffix(".md"), Path(f"{stem}-frontier.png"), Path(f"{stem}-speedup.png")
    write_json(json_path, rows, meta, comparisons if comparisons is not None else [])
    md.write_text(offline_markdown(rows, meta, comparisons))
    title = meta.get("dataset", "")
    plot_frontier(rows, frontier, title)
    plot_speedup(rows, speedup, title)
    return [json_path, md, frontier, speedup]


def merge_offline(paths: list[Path]) -> tuple[list[dict], dict]:
    """Rows of several offline results on the same prompts, seeds and max_tokens, as one table.

    Each row keeps its own run's speedup (relative to that run's `none` row) and says which
    run it came from (`run`); a (policy, knob, temperature) present in several inputs is taken
    from the last. Rates are counts, not timings, so the frontier compares across runs.
    """
    results = [json.loads(Path(p).read_text()) for p in paths]
    keys = [("dataset",), ("settings", "max_tokens"), ("settings", "seed"), ("prompt_ids",)]
    for key in keys:
        values = {json.dumps(_get(r["meta"], key)) for r in results}
        if len(values) > 1:
            raise ValueError(f"cannot merge runs with different {'.'.join(key)}: {sorted(values)}")
    merged: dict[tuple, dict] = {}
    for path, result in zip(paths, results, strict=True):
        for row in result["rows"]:
            merged[(row["policy"], row["knob"], row["temperature"])] = {**row, "run": Path(path).stem}
    order = {p: i for i, p in enumerate(STYLE)}
    rows = sorted(merged.values(), key=lambda r: (-r["temperature"], order.get(r["policy"], 99),
                                                   r["knob"] if _numeric(r["knob"]) else -1))
    first = results[-1]["meta"]
    meta = {
        **{k: first[k] for k in ("dataset", "settings", "prompt_ids", "seeds", "models", "machine") if k in first},
        "runs": [{"run": Path(p).stem, **{k: r["meta"].get(k) for k in ("command", "git_commit", "created",
                                                                       "threads", "sweep")}}
                 for p, r in zip(paths, results, strict=True)],
        "notes": [
            "rows come from several runs (`run`); each row's speedup is relative to the `none` row of its own run",
            *first.get("notes", [])[:1],
        ],
        "greedy_agreement": [r["meta"].get("greedy_agreement") for r in results],
    }
    return rows, meta


def _get(data: dict, key: tuple) -> object:
    for part in key:
        data = (data or {}).get(part)
    return data


# ----- serving --------------------------------------------------------------------------------
def serving_markdown(rows: list[dict], meta: dict) -> str:
    out = ["# Serving benchmark", "", _meta_lines(meta), ""]
    out.append("policy (knob): the knob the requests ran with (k, p_min or threshold; `auto`: the engine's self-tuned "
               "level). `x c=1`: output tokens/s over the same policy's concurrency-1 row with the same batching mode. "
               "`slowest / alone`: the slowest request's own tokens/s over the mean request's tokens/s of the "
               "target alone (the baseline row), both prefill included. `vs none, same load` (throughput) and "
               "`slowest vs none, same load`: over the target alone's row at the same concurrency and batching "
               "mode, where the run has one: what the same traffic would get without speculation.")
    out.append("")
    out.append("| policy | concurrency | rate | batching | requests | errors | output tok/s | x c=1 | slowest / alone "
               "| vs none, same load | slowest vs none, same load "
               "| req/s | TTFT p50 | TTFT p99 | TPOT p50 | ITL p50 | ITL p99 | acceptance | discard rate "
               "| verification rate |")
    out.append("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        knob = f" ({knob_text(r['knob'])})" if r.get("knob") is not None else ""
        policy = (r.get("policy") or "-") + knob + (" (baseline)" if r.get("baseline") else "")
        out.append(
            f"| {policy} | {_fmt(r.get('concurrency'))} | {_fmt(r.get('request_rate'), 2)} | "
            f"{r.get('batching') or '-'} | {r['requests']} | {r['errors']} | "
            f"{_fmt(r['throughput_tokens_per_s'], 2)} | {_fmt(r.get('throughput_vs_concurrency_1'), 2)} | "
            f"{_fmt(r.get('slowest_request_vs_target_alone'), 2)} | "
            f"{_fmt(r.get('throughput_vs_target_alone_same_load'), 2)} | "
            f"{_fmt(r.get('slowest_request_vs_target_alone_same_load'), 2)} | {_fmt(r['request_throughput'], 3)} | "
            f"{_fmt(r['ttft_p50_s'], 2)} | {_fmt(r['ttft_p99_s'], 2)} | {_fmt(r['tpot_p50_s'], 3)} | "
            f"{_fmt(r['itl_p50_s'], 3)} | {_fmt(r['itl_p99_s'], 3)} | {_fmt(r.get('acceptance_rate'))} | "
            f"{_fmt(r.get('discard_rate'))} | {_fmt(r.get('verification_rate'))} |"
        )
    return "\n".join(out) + "\n"


def write_serving_report(json_path: Path, rows: list[dict], meta: dict) -> list[Path]:
    md = json_path.with_suffix(".md")
    write_json(json_path, rows, meta)
    md.write_text(serving_markdown(rows, meta))
    return [json_path, md]
