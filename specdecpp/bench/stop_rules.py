"""Offline evaluator: score any stop rule on rounds the engine logged, without rerunning models.

Data: rounds logged by `specdecpp heads gen-data` (a long constant k, so every candidate a
shorter rule could stop at carries its exact label a_s = P(y_s accepted | y_<s accepted)).
For a rule that stops round r after L candidates, the accepted count has expectation
    E[accepted] = sum_{j<=L} prod_{i<=j} a_i,
and the round produces E[accepted] + 1 tokens (the correction or bonus token). It costs, under
a cost model measured on the host, L draft forwards (the first feeds the tokens accepted last
round, then one per candidate but the last; a head judging after the forward submits the token
of its last forward for free, so the count is the same), L draws, L feature computations for
rules that read them, one head call per judged candidate, and one target forward over L + 1
tokens.
Time per token = sum of round costs / sum of expected tokens; the predicted speedup is the
target's one-token step over that (prefill excluded). Intervals are bootstraps by prompt.

Limits: a rule is capped at the logged k; heuristic k depends on realised outcomes and is not
scored. Scored one by one, each logged round is a round start of the logging rule, but a rule's
rounds start where its own end, and how a round starts matters (after a rejection its candidates
are accepted far less often): `predict(..., replay="text")` walks the logged text instead
(specdecpp/bench/text_replay.py), the default of `specdecpp heads predict`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.costs import CostModel, LiveCosts
from engine.factory import build_engine, resolve_paths
from engine.head import CANDIDATE_FEATURES, AcceptanceHead, load_head
from engine.params import AUTO
from engine.policies import ProposalStep, SpecDecPP
from engine.tuning import SelfTuning
from heads.data import concat_columns, load_shards
from heads.evaluate import head_predictions, soft_auc
from heads.train import head_inputs
from specdecpp.bench.machine import machine_record

log = logging.getLogger(__name__)


@dataclass
class Rounds:
    """Logged rounds, padded to the logged k: [R, K] per candidate, [R] per round."""

    accept: torch.Tensor  # a_s (0 past a round's end)
    length: torch.Tensor  # candidates logged in the round
    seq: torch.Tensor  # prompt index
    draft_prob: torch.Tensor  # q(y_s), temperature 1
    temperature: torch.Tensor  # [R]
    head: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> calibrated a-hat [R, K] (nan: not judged)
    head_timing: dict[str, str] = field(default_factory=dict)
    accepted: torch.Tensor | None = None  # [R] candidates the logging run accepted (None: not logged)

    def only(self, keep: torch.Tensor) -> Rounds:
        """The rounds where `keep` [R] is true."""
        return Rounds(self.accept[keep], self.length[keep], self.seq[keep], self.draft_prob[keep],
                      self.temperature[keep], {k: v[keep] for k, v in self.head.items()}, dict(self.head_timing),
                      None if self.accepted is None else self.accepted[keep])


def load_rounds(data_dirs: list[str | Path], heads: dict[str, AcceptanceHead] | None = None) -> Rounds:
    """Rounds of every directory; the heads' predictions for each candidate they can judge."""
    parts = [load_shards(d) for d in data_dirs]
    data = concat_columns(parts)
    for i, p in enumerate(parts):  # sequence and round ids unique across directories
        p["seq"] = p["seq"].long() + i * 1_000_000
        p["round"] = p["round"].long() + i * 1_000_000_000_000
    data["seq"] = torch.cat([p["seq"] for p in parts])
    data["round"] = torch.cat([p["round"] for p in parts])
    _, round_index = torch.unique_consecutive(data["round"], return_inverse=True)
    num_rounds, k = int(round_index.max()) + 1, int(data["position"].max())
    col = data["position"].long() - 1

    def grid(values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        out = torch.full((num_rounds, k), fill, dtype=torch.float64)
        out[round_index, col] = values.double()
        return out

    rounds = Rounds(
        accept=grid(data["accept_prob"]),
        length=torch.zeros(num_rounds, dtype=torch.long).scatter_reduce_(0, round_index, col + 1, "amax"),
        seq=torch.zeros(num_rounds, dtype=torch.long).index_copy_(0, round_index, data["seq"].long()),
        draft_prob=grid(data["features"][:, CANDIDATE_FEATURES.index("log_q")].exp()),
        temperature=torch.zeros(num_rounds, dtype=torch.float64).index_copy_(
            0, round_index, data["features"][:, CANDIDATE_FEATURES.index("temperature")].double()),
    )
    if "round_accepted" in data:
        rounds.accepted = torch.zeros(num_rounds, dtype=torch.long).index_copy_(
            0, round_index, data["round_accepted"].long())
    for name, head in (heads or {}).items():
        rows = head_inputs(data, head.timing)
        judged = torch.arange(len(data["accept_prob"]))
        if head.timing == "after":
            judged = judged[data["has_next"].bool()]
        pred = torch.full((num_rounds, k), float("nan"), dtype=torch.float64)
        pred[round_index[judged], col[judged]] = head_predictions(head, rows["hidden"], rows["features"]).double()
        rounds.head[name], rounds.head_timing[name] = pred, head.timing
    return rounds


HEADROOM_WEIGHTS = (0.025, 0.05, 0.1, 0.2)  # weight of the true a_s in a headroom head's logit (`add_headroom_heads`)


def add_headroom_heads(rounds: Rounds, weights: tuple[float, ...] = HEADROOM_WEIGHTS) -> dict[str, dict]:
    """Heads between the default head and a perfect one, `headroom<w>`: logit (1 - w) logit(a-hat) + w logit(a_s)
    on the candidates the default head judges, at its timing. Their rows show what a better head would buy on
    this traffic (the oracle is w = 1). Returns each one's weight and soft AUC of rejection, the default's too."""
    base, truth = rounds.head["default"], rounds.accept
    judged = ~base.isnan()

    def auc(pred: torch.Tensor) -> float:
        return round(soft_auc(1 - pred[judged], 1 - truth[judged]), 4)

    summary = {"default": {"weight": 0.0, "auc": auc(base)}}
    for w in weights:
        name = f"headroom{w}"
        mixed = torch.sigmoid((1 - w) * torch.logit(base, eps=1e-3) + w * torch.logit(truth, eps=1e-3))
        rounds.head[name] = mixed.masked_fill(~judged, float("nan"))
        rounds.head_timing[name] = rounds.head_timing["default"]
        summary[name] = {"weight": w, "auc": auc(mixed)}
    return summary


def stop_lengths(rounds: Rounds, rule: tuple) -> torch.Tensor:
    """Candidates per round [R] under `rule`: ("constant", k), ("confidence", p_min, low, high),
    ("specdec++", head name, threshold, low, high) or ("oracle", None, threshold, low, high). Threshold "auto"
    plans each round from what came before (`auto_lengths`)."""
    kind = rule[0]
    cap = rounds.length
    positions = torch.arange(1, rounds.accept.shape[1] + 1).expand_as(rounds.accept)
    if kind == "none":
        return torch.zeros_like(cap)
    if kind == "constant":
        return cap.clamp(max=int(rule[1]))
    if kind == "confidence":
        _, p_min, low, high = rule
        stop = (rounds.draft_prob < p_min) & (positions >= low)
        stop_at = positions
    elif kind in ("specdec++", "oracle"):
        _, name, threshold, low, high = rule
        # "oracle": the product rule fed the true a_s, the bound a perfect "before" head would reach
        pred = rounds.accept.masked_fill(positions > cap.unsqueeze(1), float("nan")) if kind == "oracle" \
            else rounds.head[name]
        after = kind == "specdec++" and rounds.head_timing[name] == "after"
        reject = 1 - torch.cumprod(pred.nan_to_num(1.0), dim=1)
        stop_at = positions + int(after)  # a head judging after the forward on y_s submits y_{s+1} too
        stop = (reject > threshold) & (stop_at >= low) & ~pred.isnan()
    else:
        raise ValueError(f"unknown rule {rule!r}")
    first = torch.where(stop.any(1), stop.int().argmax(1), torch.full_like(cap, 10_000))
    chosen = stop_at.gather(1, first.clamp(max=stop_at.shape[1] - 1).unsqueeze(1)).squeeze(1)
    chosen = torch.where(stop.any(1), chosen, torch.full_like(cap, 10_000))
    return torch.minimum(torch.minimum(chosen, cap), torch.full_like(cap, int(high)))


def round_outcomes(
    rounds: Rounds, lengths: torch.Tensor, costs: CostModel, features: bool = False, head_calls: int = 0
) -> dict[str, torch.Tensor]:
    """Per round: expected tokens, accepted, proposed and seconds. `features`: the rule reads every
    candidate's features; `head_calls`: head calls per round relative to its length (0: none, 1: L,
    -1: L - 1 for a head judging after the forward, whose last candidate is not judged)."""
    mask = torch.arange(1, rounds.accept.shape[1] + 1).unsqueeze(0) <= lengths.unsqueeze(1)
    accepted = (torch.cumprod(rounds.accept, dim=1) * mask).sum(1)
    return {"tokens": accepted + 1, "accepted": accepted, "proposed": lengths.double(),
            "seconds": round_seconds(lengths, costs, features, head_calls)}


def round_seconds(lengths: torch.Tensor, costs: CostModel, features: bool = False, head_calls: int = 0) -> torch.Tensor:
    """Seconds of rounds of `lengths` candidates (`round_outcomes`); a round without candidates is the target alone's
    one-token step."""
    per_candidate = costs.draft_step + costs.draw + (costs.features if features else 0.0)
    heads = 0 * lengths if head_calls == 0 else (lengths - (1 if head_calls < 0 else 0)).clamp(min=0)
    return costs.target_cost(lengths + 1) + lengths * per_candidate + heads * costs.head


def summarise(outcome: dict[str, torch.Tensor], costs: CostModel) -> dict[str, float]:
    """Figures of a rule's outcome: per round (rows are rounds) or per prompt with a `rounds` count (rows are
    prompts, the replay along the text)."""
    tokens = float(outcome["tokens"].sum())
    rounds = float(outcome["rounds"].sum()) if "rounds" in outcome else len(outcome["tokens"])
    return {
        "speedup": float(costs.target_cost(torch.tensor([1]))[0]) * tokens / float(outcome["seconds"].sum()),
        "tokens_per_round": tokens / rounds,
        "discard_rate": float((outcome["proposed"] - outcome["accepted"]).sum()) / tokens,
        "verification_rate": rounds / tokens,
        "mean_candidate_length": float(outcome["proposed"].sum()) / rounds,
    }


def bootstrap_speedups(
    outcomes: list[dict[str, torch.Tensor]], seq: torch.Tensor, costs: CostModel, resamples: int = 1000, seed: int = 0
) -> torch.Tensor:
    """[resamples, len(outcomes)] predicted speedups on prompt resamples (the same resample for every rule)."""
    unique, inverse = torch.unique(seq, return_inverse=True)
    g = torch.Generator().manual_seed(seed)
    t1 = float(costs.target_cost(torch.tensor([1]))[0])
    per_prompt = [
        (torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, o["tokens"]),
         torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, o["seconds"]))
        for o in outcomes
    ]
    weights = torch.stack([torch.bincount(torch.randint(len(unique), (len(unique),), generator=g),
                                          minlength=len(unique)) for _ in range(resamples)]).double()
    return torch.stack([t1 * (weights @ tok) / (weights @ sec) for tok, sec in per_prompt], dim=1)


def auto_lengths(rounds: Rounds, name: str, costs: CostModel, bounds: tuple[int, int]) -> torch.Tensor:
    """Candidates per round [R] under threshold "auto", replaying the engine's self-tuning in logged order (one
    sequence per round, from the engine's prior): each round is planned from the acceptance learnt so far, which
    then learns the labels of the candidates the round proposed (`auto_round`)."""
    tuning = SelfTuning(LiveCosts(costs))
    lengths = torch.empty(len(rounds.length), dtype=torch.long)
    pred = rounds.head[name].nan_to_num(1.0)
    after = rounds.head_timing[name] == "after"
    for r in range(len(rounds.length)):
        lengths[r] = auto_round(tuning, pred[r], int(rounds.length[r]), bounds, after)
        tuning.observe_acceptance(rounds.accept[r, : int(lengths[r])].tolist())
    return lengths


def auto_round(
    tuning: SelfTuning, pred: torch.Tensor, length: int, bounds: tuple[int, int], after: bool, min_budget: int = 1
) -> int:
    """The candidates one round of threshold "auto" proposes over candidates whose head estimates are `pred` [K]
    (the first `length` available): the engine's `SpecDecPP`, given the levels `tuning` plans. A budget below
    `min_budget` is replayed as that: a logged round always proposed (1), while a walk along the text may run
    the target alone (0), as the engine does where no candidate pays."""
    timing = "after" if after else "before"
    plan = tuning.plan([bounds[1]])
    budget = max(plan.budgets[0], min_budget)
    policy = SpecDecPP(AUTO, bounds, timing=timing)
    policy.set_levels(plan.levels[0], plan.depth_levels[0], tuning.acceptance)
    policy.start_round()
    for s in range(1, length + 1):  # a stop on y_s holds s candidates, one more for a head judging after the forward
        if policy.should_stop(ProposalStep(index=s, when=timing, accept_prob=float(pred[s - 1]))):
            return min(s + after, length, budget)
    return min(bounds[1], length, budget)


def default_rules(
    rounds: Rounds, bounds: tuple[int, int], costs: CostModel | None = None
) -> list[tuple[str, float | str | None, tuple]]:
    """(policy, knob, rule) rows: every constant k the data allows, fine grids for the others, the
    "auto" level per head given `costs`, and `oracle` (the product rule on the true a_s: what a perfect
    head would reach)."""
    low, high = bounds
    rows: list[tuple[str, float | None, tuple]] = [("none", None, ("none",))]
    rows += [("constant", k, ("constant", k)) for k in range(1, rounds.accept.shape[1] + 1)]
    grid = [round(0.05 * i, 2) for i in range(1, 20)]
    rows += [("confidence", p, ("confidence", p, low, high)) for p in grid]
    for name in rounds.head:
        policy = "specdec++" if name == "default" else f"specdec++-{name}"
        rows += [(policy, t, ("specdec++", name, t, low, high)) for t in grid]
        if costs is not None:
            rows.append((policy, AUTO, ("auto", name, low, high)))
    rows += [("oracle", t, ("oracle", None, t, low, high)) for t in grid]
    return rows


def predict(rounds: Rounds, costs: CostModel, bounds: tuple[int, int], resamples: int = 1000,
            replay: str = "rounds") -> dict:
    """Every default rule's predicted figures, the best knob per policy (interior or not), and paired
    bootstrap ratios of the best specdec++ rows over the best constant and confidence rows.

    `replay`: "rounds" scores each logged round as a round of the rule; "text" walks the logged text, each
    rule's rounds starting where its own end (specdecpp/bench/text_replay.py)."""
    if replay not in ("rounds", "text"):
        raise ValueError(f"replay must be 'rounds' or 'text', not {replay!r}")
    from specdecpp.bench import text_replay  # it builds on this module

    text = text_replay.text_positions(rounds) if replay == "text" else None
    outcomes, rows = [], []
    for policy, knob, rule in default_rules(rounds, bounds, costs):
        head_calls = 0
        if rule[0] in ("specdec++", "auto"):
            head_calls = -1 if rounds.head_timing[rule[1]] == "after" else 1
        elif rule[0] == "oracle":
            head_calls = 1
        features = rule[0] not in ("none", "constant")
        if text is not None:
            rule_at = text_replay.auto_rule(text, rule[1], costs, bounds) if rule[0] == "auto" \
                else text_replay.fixed_rule(text, rule)
            outcome = text_replay.replay(text, rule_at, costs, features, head_calls)
        else:
            lengths = auto_lengths(rounds, rule[1], costs, bounds) if rule[0] == "auto" else stop_lengths(rounds, rule)
            outcome = round_outcomes(rounds, lengths, costs, features, head_calls)
        outcomes.append(outcome)
        rows.append({"policy": policy, "knob": knob, **{k: round(v, 4) for k, v in summarise(outcome, costs).items()}})
    seq = torch.arange(len(text.spans)) if text is not None else rounds.seq  # text: a row per prompt
    boot = bootstrap_speedups(outcomes, seq, costs, resamples)
    for row, column in zip(rows, boot.T, strict=True):
        row["speedup_ci95"] = [round(float(column.quantile(0.025)), 4), round(float(column.quantile(0.975)), 4)]
    best: dict[str, int] = {}  # by policy; an "auto" row is its own entry, "<policy> auto"
    for i, row in enumerate(rows):
        key = f"{row['policy']} {AUTO}" if row["knob"] == AUTO else row["policy"]
        if key not in best or row["speedup"] > rows[best[key]]["speedup"]:
            best[key] = i
    best_rows = {}
    for key, i in best.items():
        knobs = [r["knob"] for r in rows if r["policy"] == key and r["knob"] != AUTO]
        interior = len(knobs) > 2 and rows[i]["knob"] not in (min(knobs), max(knobs))
        best_rows[key] = {**rows[i], "interior": interior}
    comparisons = []
    for a in (p for p in best if p.startswith("specdec++")):
        fixed = [a.removesuffix(f" {AUTO}")] if a.endswith(AUTO) else []
        for b in ("constant", "confidence", *fixed):
            ratio = boot[:, best[a]] / boot[:, best[b]]
            comparisons.append({
                "a": f"{rows[best[a]]['policy']} {rows[best[a]]['knob']}", "b": f"{b} {rows[best[b]]['knob']}",
                "ratio": round(rows[best[a]]["speedup"] / rows[best[b]]["speedup"], 4),
                "ci_low": round(float(ratio.quantile(0.025)), 4), "ci_high": round(float(ratio.quantile(0.975)), 4),
            })
    return {
        "replay": replay, "rounds": len(rounds.length), "prompts": int(torch.unique(rounds.seq).numel()),
        **({"text_positions": len(text.windows.length), "imputed_positions": text.imputed} if text is not None else {}),
        "logged_k": int(rounds.accept.shape[1]), "bounds": list(bounds),
        "mean_accept": round(float(rounds.accept.sum() / rounds.length.sum()), 4),
        "costs": asdict(costs), "best": best_rows, "comparisons": comparisons, "rows": rows,
    }


def default_pair_costs(head_dir: str, head_quantization: str = "auto") -> CostModel:
    """The cost model of the default pair with `head_dir` as its head (its kernels chosen as `head_quantization`
    says), measured now on this host."""
    log.info("measuring the cost model with the default pair")
    engine = build_engine(EngineConfig(head=head_dir, head_quantization=head_quantization))
    return replace(engine.tuning.costs.measured, machine=machine_record())


def predict_from_data(
    data_dirs: list[str],
    output: str | Path,
    *,
    bounds: tuple[int, int],
    head: str | None = None,
    post_head: str | None = None,
    costs: str | None = None,
    save_costs: str | None = None,
    temperature: float | None = None,
    replay: str = "text",
    head_quantization: str = "auto",
    headroom: bool = False,
) -> dict:
    """`specdecpp heads predict`: every stop rule's predicted figures on the rounds of `data_dirs`
    (`predict`), written as JSON to `output`, the best row per policy printed.

    `head`: the acceptance head (default: the default pair's shipped one); `post_head`: a second one,
    scored as specdec++-post. `costs`: a cost model JSON (default: measure the default pair now),
    saved to `save_costs` if given. `temperature`: only rounds sampled at it. `replay`: "text" walks the logged
    text (each rule's rounds start where its own end), "rounds" scores the logged rounds one by one; data logged
    without the rounds' accepted counts is replayed by rounds. `head_quantization`: the head's kernels in the cost
    model measured now; the estimates come from the head as trained (a w8a8 head's differ by a hundredth of a logit
    at most on logged rounds, docs/benchmarks/README.md). `headroom`: also score heads between the head and a
    perfect one (`add_headroom_heads`), summarised under "headroom".
    """
    head_dir = head or resolve_paths(EngineConfig())[2]
    heads = {"default": load_head(head_dir)}
    if post_head:
        heads["post"] = load_head(post_head)
    cost_model = CostModel.load(costs) if costs else default_pair_costs(head_dir, head_quantization)
    if save_costs:
        cost_model.save(save_costs)
    rounds = load_rounds(data_dirs, heads)
    if temperature is not None:
        rounds = rounds.only((rounds.temperature - temperature).abs() < 1e-4)  # stored as float32
    if replay == "text" and rounds.accepted is None:
        log.warning("the data has no accepted counts per round (logged by an older gen-data): replaying by rounds")
        replay = "rounds"
    room = add_headroom_heads(rounds) if headroom else {}
    result = {"data": list(data_dirs), "heads": {k: str(v) for k, v in
                                                 (("default", head_dir), ("post", post_head)) if v},
              **predict(rounds, cost_model, bounds, replay=replay)}
    if room:
        result["headroom"] = headroom_summary(result, room)
    Path(output).write_text(json.dumps(result, indent=2) + "\n")
    print(format_best(result))
    return result


def headroom_summary(result: dict, room: dict[str, dict]) -> list[dict]:
    """Per head of `add_headroom_heads`: its AUC, and auto's and the best fixed threshold's speedup over the best
    constant k (auto's with its paired bootstrap interval)."""
    best, rows = result["best"], []
    for name, head in room.items():
        policy = "specdec++" if name == "default" else f"specdec++-{name}"
        versus = next(c for c in result["comparisons"]
                      if c["a"] == f"{policy} {AUTO}" and c["b"].startswith("constant"))
        rows.append({"head": name, **head, "auto_over_constant": versus["ratio"],
                     "auto_over_constant_ci95": [versus["ci_low"], versus["ci_high"]],
                     "best_threshold_over_constant": round(best[policy]["speedup"] / best["constant"]["speedup"], 4)})
    return rows


def format_best(result: dict) -> str:
    """The best knob of each policy and the paired comparisons of a `predict` result, one per line."""
    lines = [
        f"{policy:<16} best knob {row['knob']!s:<6} predicted speedup {row['speedup']:.3f} "
        f"[{row['speedup_ci95'][0]:.3f}, {row['speedup_ci95'][1]:.3f}] discard {row['discard_rate']:.3f} "
        f"verification {row['verification_rate']:.3f} interior={row['interior']}"
        for policy, row in result["best"].items()
    ]
    lines += [f"{c['a']} / {c['b']}: {c['ratio']:.3f} [{c['ci_low']:.3f}, {c['ci_high']:.3f}]"
              for c in result["comparisons"]]
    lines += [f"headroom w={h['weight']:<6} AUC {h['auc']:.4f}  auto / best constant {h['auto_over_constant']:.3f} "
              f"[{h['auto_over_constant_ci95'][0]:.3f}, {h['auto_over_constant_ci95'][1]:.3f}]  best threshold / "
              f"best constant {h['best_threshold_over_constant']:.3f}" for h in result.get("headroom", [])]
    return "\n".join(lines)
