"""Offline benchmark: one engine, every policy and knob on the same prompts and seeds.

The loop is prompt-major (for each prompt, every configuration) so machine noise lands on
all configurations alike. Every finished (prompt, configuration) is appended to a JSONL
checkpoint; a restart skips those. Aggregates follow docs/design.md: counts are summed over
prompts and every rate is a ratio of sums; tokens/s = generated tokens / wall seconds;
speedup = tokens/s over the `none` row at the same temperature.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np

from engine.llm_engine import DEFAULT_HEAD, LLMEngine
from engine.params import AUTO, SamplingParams, SpecConfig
from specdecpp.bench.peers import HF_DYNAMIC_THRESHOLD, HF_POLICIES, hf_assisted_generate
from specdecpp.bench.report import best_row, knob_text
from specdecpp.bench.runs import Checkpoint, ratio
from specdecpp.datasets import Prompt

log = logging.getLogger(__name__)

# `specdec++-post`: the paper's timing (a head that judges after the draft's forward on the
# candidate), loaded as the engine head "post", beside our default head.
ENGINE_POLICIES = ("none", "constant", "heuristic", "confidence", "specdec++", "specdec++-post")
HEAD_POLICIES = {"specdec++": DEFAULT_HEAD, "specdec++-post": "post"}  # row -> the engine head it needs
ALL_POLICIES = ENGINE_POLICIES + HF_POLICIES
KNOB_NAMES = {
    "none": None,
    "constant": "k",
    "heuristic": "k0",
    "confidence": "p_min",
    "specdec++": "threshold",
    "specdec++-post": "threshold",
    "hf-constant": "k",
    "hf-dynamic": "confidence_threshold",
    "hf-heuristic": "k0",
}


@dataclass(frozen=True)
class BenchConfig:
    """One row of the table: a policy, its knob, a temperature; for the theory rows (`constant` only) the draft
    paths per round, k then counting the candidates of all paths, and the lossy over-acceptance epsilon."""

    policy: str
    knob: float | str | None  # str: "auto" (specdec++)
    temperature: float
    num_drafts: int = 1
    over_acceptance: float = 0.0

    @property
    def label(self) -> str:
        knob = "" if self.knob is None else f" {KNOB_NAMES[self.policy]}={knob_text(self.knob)}"
        return f"T={self.temperature:g} {self.policy}{knob}{self.theory_suffix}"

    @property
    def theory_suffix(self) -> str:
        """How a theory row's label and record key differ from the plain row's (empty for a plain row)."""
        drafts = f" M={self.num_drafts}" if self.num_drafts > 1 else ""
        return drafts + (f" eps={self.over_acceptance:g}" if self.over_acceptance else "")

    def spec(self, bounds: tuple[int, int]) -> SpecConfig:
        """The engine's SpecConfig for this row (engine policies only)."""
        fields: dict = {"policy": self.policy, "bounds": bounds, "num_drafts": self.num_drafts,
                        "over_acceptance": self.over_acceptance}
        if self.policy == "constant":
            fields["k"] = int(self.knob) // self.num_drafts  # the same candidates per round, over the paths
        elif self.policy == "heuristic":
            fields["k"] = int(self.knob)
        elif self.policy == "confidence":
            fields["p_min"] = float(self.knob)
        elif self.policy in HEAD_POLICIES:
            fields["threshold"] = self.knob if self.knob == AUTO else float(self.knob)
            fields["policy"] = "specdec++"
            head = HEAD_POLICIES[self.policy]
            fields["head"] = None if head == DEFAULT_HEAD else head
        return SpecConfig.model_validate(fields)


@dataclass
class Sweep:
    """Knob values per policy; `configs()` expands them over the temperatures."""

    temperatures: tuple[float, ...] = (1.0, 0.0)
    ks: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8)
    heuristic_k: int = 4
    p_mins: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)
    thresholds: tuple[float | str, ...] = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
    hf_ks: tuple[int, ...] = (2, 4, 6)
    hf_dynamic_threshold: float = HF_DYNAMIC_THRESHOLD
    policies: tuple[str, ...] = ("none", "constant", "heuristic", "confidence", "specdec++", "hf-constant",
                                 "hf-dynamic")
    bounds: tuple[int, int] = SpecConfig().bounds
    greedy_policies: tuple[str, ...] | None = None  # a smaller set of rows at temperature 0 (None: the same)
    greedy_ks: tuple[int, ...] | None = None  # constant / hf-constant k values at temperature 0 (None: the same)
    greedy_thresholds: tuple[float | str, ...] | None = None  # specdec++ thresholds at temperature 0 (None: the same)
    num_drafts: tuple[int, ...] = (1,)  # constant rows with M draft paths, at each k (candidates of all paths)
    over_acceptances: tuple[float, ...] = (0.0,)  # constant rows with lossy over-acceptance epsilon, at each k

    def configs(self) -> list[BenchConfig]:
        knobs: dict[str, Iterable[float | None]] = {
            "none": [None],
            "constant": self.ks,
            "heuristic": [self.heuristic_k],
            "confidence": self.p_mins,
            **{policy: self.thresholds for policy in HEAD_POLICIES},
            "hf-constant": self.hf_ks,
            "hf-dynamic": [self.hf_dynamic_threshold],
            "hf-heuristic": [self.heuristic_k],
        }
        unknown = (set(self.policies) | set(self.greedy_policies or ())) - set(ALL_POLICIES)
        if unknown:
            raise ValueError(f"unknown policies {sorted(unknown)}; choose from {', '.join(ALL_POLICIES)}")
        if "none" not in self.policies or (self.greedy_policies is not None and "none" not in self.greedy_policies):
            raise ValueError("the `none` row (target alone) is required: every speedup is relative to it")
        configs = []
        for t in self.temperatures:
            greedy = t == 0
            policies = self.greedy_policies if greedy and self.greedy_policies is not None else self.policies
            for policy in ALL_POLICIES:
                if policy not in policies:
                    continue
                values = knobs[policy]
                if greedy and self.greedy_ks is not None and policy in ("constant", "hf-constant"):
                    values = [k for k in self.greedy_ks if policy == "constant" or k in self.hf_ks]
                if greedy and self.greedy_thresholds is not None and policy in HEAD_POLICIES:
                    values = self.greedy_thresholds
                configs += [BenchConfig(policy, knob, float(t)) for knob in values]
                if policy == "constant":
                    configs += self.theory_configs(values, float(t))
        return configs

    def theory_configs(self, ks: Iterable[float | None], temperature: float) -> list[BenchConfig]:
        """The constant rows of the theory sweeps: M draft paths sharing k candidates (k // M each, where
        that is at least 1), and over-acceptance epsilon with one path."""
        out = [BenchConfig("constant", k, temperature, num_drafts=m)
               for k in ks for m in self.num_drafts if m > 1 and int(k) >= m]
        return out + [BenchConfig("constant", k, temperature, over_acceptance=eps)
                      for k in ks for eps in self.over_acceptances if eps > 0]


def record_key(config: BenchConfig, prompt_id: str) -> str:
    return f"{config.temperature:g}|{config.policy}|{config.knob}{config.theory_suffix}|{prompt_id}"


def run_engine(engine: LLMEngine, prompt: Prompt, config: BenchConfig, max_tokens: int, seed: int,
               bounds: tuple[int, int], stop: tuple[str, ...] = ()) -> dict:
    """One request through our engine; its stats record plus the wall time around it."""
    params = SamplingParams(temperature=config.temperature, seed=seed, max_tokens=max_tokens, stop=stop)
    spec = config.spec(bounds)
    start = time.perf_counter()
    completion = engine.generate(prompt.messages, params, spec)
    wall = time.perf_counter() - start
    stats = dict(completion.stats)
    stats["finish_reason"] = completion.finish_reason
    if stats["accepted_lengths"]:  # the first round's tokens: its accepted drafts plus one, unless cut
        stats["first_round_tokens"] = min(stats["accepted_lengths"][0] + 1, stats["generated_tokens"])
    stats["token_ids"] = completion.token_ids
    return {"stats": stats, "wall_seconds": wall}


def run_peer(engine: LLMEngine, prompt: Prompt, config: BenchConfig, max_tokens: int, seed: int) -> dict:
    """One request through transformers' assisted generation on the engine's own models.

    Deliberately the same modules: the engine packed their CPU linears (engine/loading/cpu_linear.py,
    results identical to nn.Linear), so both sides run the same kernels and the rows compare the
    decoding algorithms, not the kernels.
    """
    assert engine.draft is not None
    stats = hf_assisted_generate(
        engine.target.model,
        engine.draft.model,
        engine.encode(prompt.messages),
        config.policy,
        config.knob,
        config.temperature,
        max_tokens,
        seed,
        engine.eos_token_ids,
        engine.tokenizer.pad_token_id,
    )
    return {"stats": stats, "wall_seconds": stats["total_seconds"]}


def run_one(engine: LLMEngine, prompt: Prompt, config: BenchConfig, max_tokens: int, seed: int,
            bounds: tuple[int, int], stop: tuple[str, ...] = ()) -> dict:
    if config.policy in HF_POLICIES:
        return run_peer(engine, prompt, config, max_tokens, seed)
    return run_engine(engine, prompt, config, max_tokens, seed, bounds, stop)


def warm_up(engine: LLMEngine, configs: list[BenchConfig], bounds: tuple[int, int], prompt: Prompt) -> None:
    """One short request per policy so first-call costs (allocations, kernels) hit no measured row."""
    seen: set[str] = set()
    for config in configs:
        if config.policy in seen:
            continue
        seen.add(config.policy)
        run_one(engine, prompt, config, max_tokens=8, seed=0, bounds=bounds)


def run_offline(
    engine: LLMEngine,
    prompts: list[Prompt],
    configs: list[BenchConfig],
    max_tokens: int,
    checkpoint: Checkpoint,
    base_seed: int = 0,
    bounds: tuple[int, int] = SpecConfig().bounds,
    warmup: bool = True,
    progress: Callable[[str], None] = print,
    run: bool = True,
    stop: tuple[str, ...] = (),
) -> list[dict]:
    """Run every (prompt, configuration) not yet in the checkpoint; return the grid's finished records.

    `run=False` only reads the checkpoint (a report from a partial run: `aggregate` keeps the
    prompts every configuration finished). `stop` strings end every request of every row alike; they
    apply to our engine's rows only, so hf-* rows are refused with them.
    """
    if stop and any(c.policy in HF_POLICIES for c in configs):
        raise ValueError("stop strings apply to our engine's rows only: drop them or the hf-* rows")
    todo = [(i, p, c) for i, p in enumerate(prompts) for c in configs if record_key(c, p.id) not in checkpoint]
    total = len(prompts) * len(configs)
    done = total - len(todo)
    if done:
        progress(f"{'resuming: ' if run else ''}{done}/{total} results already in {checkpoint.path}")
    if not run:
        todo = []
    if todo and warmup:
        warm_up(engine, configs, bounds, prompts[0])
    started = time.perf_counter()
    for n, (i, prompt, config) in enumerate(todo, start=1):
        seed = base_seed + i  # one seed per prompt, the same for every configuration
        result = run_one(engine, prompt, config, max_tokens, seed, bounds, stop)
        record = {
            "key": record_key(config, prompt.id),
            "prompt_id": prompt.id,
            "prompt_index": i,
            "seed": seed,
            **asdict(config),
            **result,
        }
        checkpoint.add(record)
        elapsed = time.perf_counter() - started
        eta = elapsed / n * (len(todo) - n)
        s = result["stats"]
        progress(
            f"[{done + n}/{total}] prompt {i} ({prompt.id}) {config.label}: {s['generated_tokens']} tokens in "
            f"{result['wall_seconds']:.1f}s ({s['generated_tokens'] / max(result['wall_seconds'], 1e-9):.2f} tok/s)"
            f"  eta {eta / 60:.1f} min"
        )
    keys = (record_key(c, p.id) for p in prompts for c in configs)
    return [checkpoint.records[key] for key in keys if key in checkpoint]


# ----- aggregation ---------------------------------------------------------------------------
def _sum(records: list[dict], field: str) -> float | None:
    values = [r["stats"].get(field) for r in records]
    return None if any(v is None for v in values) else sum(values)


def complete_records(records: list[dict], configs: list[BenchConfig]) -> dict[BenchConfig, list[dict]]:
    """Per configuration, its records of the prompts every configuration finished, in prompt-id order.

    Rows compare only on the same prompts; the shared order lets comparisons pair them by index.
    """
    by_config: dict[BenchConfig, dict[str, dict]] = {c: {} for c in configs}
    for r in records:
        config = BenchConfig(r["policy"], r["knob"], r["temperature"], r.get("num_drafts", 1),
                             r.get("over_acceptance", 0.0))
        if config in by_config:
            by_config[config][r["prompt_id"]] = r
    common = set.intersection(*(set(v) for v in by_config.values())) if by_config else set()
    return {c: [r for pid, r in sorted(by_config[c].items()) if pid in common] for c in configs}


def aggregate(records: list[dict], configs: list[BenchConfig]) -> list[dict]:
    """One row per configuration, over the prompts every configuration finished.

    Sums of counts over prompts; every rate is a ratio of those sums (docs/design.md). A count a
    peer cannot measure stays None, and so do the rates built on it.
    """
    complete = complete_records(records, configs)
    rows = []
    for config in configs:
        rs = complete[config]
        generated = _sum(rs, "generated_tokens") or 0
        proposed, accepted = _sum(rs, "proposed_tokens"), _sum(rs, "accepted_tokens")
        discarded = None if proposed is None or accepted is None else proposed - accepted
        calls, rounds = _sum(rs, "target_calls"), _sum(rs, "rounds")
        expected_rejections, rejections = _sum(rs, "expected_rejections"), _sum(rs, "rejections")
        wall = sum(r["wall_seconds"] for r in rs)
        decode_tokens, decode_seconds = _decode_totals(rs)
        speculates = config.policy != "none"
        rows.append({
            "label": config.label,
            "policy": config.policy,
            "knob_name": KNOB_NAMES[config.policy],
            "knob": config.knob,
            "temperature": config.temperature,
            "tokens_per_s": ratio(generated, wall),
            "speedup": None,  # filled below
            "discard_rate": ratio(discarded, generated),
            "verification_rate": ratio(calls, generated),
            "acceptance_rate": ratio(accepted, proposed) if speculates else None,
            "mean_candidate_length": ratio(proposed, rounds),
            "mean_accepted_length": ratio(accepted, rounds),
            "tokens_per_target_call": ratio(generated, calls),
            "accepted_per_target_call": ratio(accepted, calls),
            "num_drafts": config.num_drafts,
            "over_acceptance": config.over_acceptance,
            "lossless": config.over_acceptance == 0,
            "expected_rejections": expected_rejections,
            "rejections": rejections,
            "decode_tokens_per_s": ratio(decode_tokens, decode_seconds),
            "decode_speedup": None,
            "prompts": len(rs),
            "generated_tokens": generated,
            "proposed_tokens": proposed,
            "accepted_tokens": accepted,
            "discarded_tokens": discarded,
            "target_calls": calls,
            "rounds": rounds,
            "wall_seconds": wall,
        })
    for key in ("", "decode_"):
        baseline = {r["temperature"]: r[f"{key}tokens_per_s"] for r in rows if r["policy"] == "none"}
        for row in rows:
            row[f"{key}speedup"] = ratio(row[f"{key}tokens_per_s"], baseline.get(row["temperature"]))
    return rows


def _decode_totals(records: list[dict]) -> tuple[float | None, float | None]:
    """Tokens and seconds after each request's first round (which carries the prompt's prefill).

    Short benchmark outputs make the prefill a large share of the wall time; this rate leaves
    it out. None when any record lacks the first-round timing.
    """
    tokens = seconds = 0.0
    for r in records:
        s = r["stats"]
        if s.get("first_token_seconds") is None or s.get("first_round_tokens") is None:
            return None, None
        tokens += s["generated_tokens"] - s["first_round_tokens"]
        seconds += s["total_seconds"] - s["first_token_seconds"]
    return tokens, seconds


# ----- comparisons ---------------------------------------------------------------------------
# (a, b) policy pairs compared at each temperature, each at its fastest knob; "specdec++:auto" is the
# row whose threshold the engine derives, "specdec++:fixed" the fastest numeric threshold.
COMPARISONS = (
    ("specdec++:auto", "constant"),
    ("specdec++:auto", "specdec++:fixed"),
    ("specdec++:auto", "none"),
    ("specdec++", "constant"),
    ("specdec++", "confidence"),
    ("specdec++-post", "constant"),
    ("specdec++", "none"),
    ("constant", "none"),
    ("confidence", "none"),
)


def paired_bootstrap_ratio(
    a_tokens: list[float], a_seconds: list[float], b_tokens: list[float], b_seconds: list[float],
    resamples: int = 2000, seed: int = 0,
) -> tuple[float | None, float | None, float | None]:
    """tokens/s of a over b (each a ratio of sums over prompts) and a 95% bootstrap interval.

    Both rows ran the same prompts with the same seeds, so a prompt's length and difficulty
    move both rates together. Resampling prompt indices jointly for the two rows keeps that
    shared part out of the interval, which resampling each row on its own would count as noise.
    """
    tokens_a, seconds_a, tokens_b, seconds_b = (np.asarray(x, dtype=np.float64)
                                                for x in (a_tokens, a_seconds, b_tokens, b_seconds))
    n = len(tokens_a)
    if not n == len(seconds_a) == len(tokens_b) == len(seconds_b):
        raise ValueError("a paired comparison needs the same prompts, in the same order, for both rows")
    observed = ratio(ratio(tokens_a.sum(), seconds_a.sum()), ratio(tokens_b.sum(), seconds_b.sum()))
    if observed is None:
        return None, None, None
    index = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = (tokens_a[index].sum(1) * seconds_b[index].sum(1)) / (seconds_a[index].sum(1) * tokens_b[index].sum(1))
    boot = boot[np.isfinite(boot)]
    if not len(boot):
        return float(observed), None, None
    low, high = np.percentile(boot, [2.5, 97.5])
    return float(observed), float(low), float(high)


def _interior(rows: list[dict], best: dict) -> bool:
    """Whether the best knob lies strictly inside its policy's numeric sweep (an edge may hide a better
    knob); an "auto" knob is no point of a sweep."""
    knobs = [r["knob"] for r in rows if r["policy"] == best["policy"] and r["temperature"] == best["temperature"]
             and isinstance(r["knob"], int | float)]
    return isinstance(best["knob"], int | float) and min(knobs) < best["knob"] < max(knobs)


def best_selected(rows: list[dict], selector: str, temperature: float) -> dict | None:
    """The fastest row of a COMPARISONS name: a policy, or "specdec++:auto" / "specdec++:fixed"."""
    policy, _, kind = selector.partition(":")
    if kind == "auto":
        rows = [r for r in rows if r["knob"] == AUTO]
    elif kind == "fixed":
        rows = [r for r in rows if isinstance(r["knob"], int | float)]
    return best_row(rows, policy, temperature)


def compare(records: list[dict], rows: list[dict], configs: list[BenchConfig], resamples: int = 2000,
            seed: int = 0) -> list[dict]:
    """The COMPARISONS pairs at each temperature: best row of a over best row of b, with a paired
    bootstrap interval by prompt on the records behind the rows (the prompts every row finished)."""
    complete = {c.label: rs for c, rs in complete_records(records, configs).items()}
    out, seen = [], set()
    for temperature in sorted({r["temperature"] for r in rows}, reverse=True):
        for policy_a, policy_b in COMPARISONS:
            a, b = best_selected(rows, policy_a, temperature), best_selected(rows, policy_b, temperature)
            if a is None or b is None or a is b or (temperature, a["label"], b["label"]) in seen:
                continue  # auto is also the best threshold when it is the only one: each pair once
            seen.add((temperature, a["label"], b["label"]))
            ra, rb = complete[a["label"]], complete[b["label"]]
            ratio, low, high = paired_bootstrap_ratio(
                [r["stats"]["generated_tokens"] for r in ra], [r["wall_seconds"] for r in ra],
                [r["stats"]["generated_tokens"] for r in rb], [r["wall_seconds"] for r in rb],
                resamples=resamples, seed=seed,
            )
            out.append({
                "temperature": temperature, "a": a["label"], "b": b["label"], "ratio": ratio,
                "ci_low": low, "ci_high": high, "a_knob_interior": _interior(rows, a),
                "b_knob_interior": _interior(rows, b), "prompts": len(ra), "resamples": resamples,
            })
    return out
