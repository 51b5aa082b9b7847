"""The offline evaluator's replay along the text: every rule's rounds start where its own rounds end.

Replaying logged rounds one by one (`stop_rules.round_outcomes`) starts every rule's rounds where the
logging rule's started. But how a round starts depends on the rule: after a rejection the next
candidates sit among tokens the draft guesses badly, after a fully accepted round among tokens it
guesses well, and a rule that stops early starts its next round at the very token it refused. So the
rounds replay scores a short rule on the logging rule's harder starts, and a rule that stops early on
easier starts than its own.

This replay walks the text the logging run generated instead. The accepted candidates of a logged
round and its first rejected one are text positions, each with its exact label a (given the text
before it) and the head's estimate; the candidates after the first rejection follow a token the text
does not hold and are left out. A round of a rule starts at a text position, proposes the next
positions as its candidates (its length from the same rule functions as the rounds replay), accepts
each with probability a (a uniform draw per position, the same draws for every rule: paired
comparisons), and the next round starts after its accepted candidates and the target's token.
Threshold "auto" plans each round as the engine does, learning as it goes (`stop_rules.auto_round`), and
runs the target alone where its plan proposes nothing.

Approximations: the text after a replayed rejection is the logged text, not a fresh correction
(only that one token differs); the target's bonus token after a fully accepted logged round was
never drafted, so its position gets the mean label and estimate of the deepest logged candidates
(`Text.imputed` counts them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.costs import CostModel, LiveCosts
from engine.tuning import SelfTuning
from specdecpp.bench.stop_rules import Rounds, auto_round, round_seconds, stop_lengths


@dataclass
class Text:
    """Each prompt's generated text as positions, and for every position the round a rule would start there.

    `windows` holds one row per position: its next K positions (K, the logged k) as a Rounds row, its length
    the positions a round there may propose (leaving the last one to the target). `spans` gives each prompt's
    rows [start, end)."""

    windows: Rounds
    labels: torch.Tensor  # [T] each position's own label a
    spans: list[tuple[int, int]]
    imputed: int  # positions with imputed values (the target's bonus token after a fully accepted logged round)


def text_positions(rounds: Rounds) -> Text:
    """The text of each prompt, from logged rounds in order with their realized accepted counts."""
    if rounds.accepted is None:
        raise ValueError("the data has no realized accepted counts (logged before they were kept): "
                         "log it again with `specdecpp heads gen-data` to replay along the text")
    k = rounds.accept.shape[1]
    values = {"accept": rounds.accept, "draft_prob": rounds.draft_prob, **rounds.head}  # [R, K] each
    deep = (rounds.accepted >= k - 1) & (rounds.length == k)  # candidate k followed k - 1 accepted text tokens
    rows, col = (deep, k - 1) if deep.any() else (torch.ones_like(deep), 0)
    fill = {name: grid[rows, col].nanmean() for name, grid in values.items()}
    columns: dict[str, list[torch.Tensor]] = {name: [] for name in values}
    seq, temperature, spans, imputed = [], [], [], 0
    order = torch.argsort(rounds.seq, stable=True).tolist()  # a batched run logs its prompts' rounds interleaved
    for i, r in enumerate(order):
        n, m = int(rounds.length[r]), int(rounds.accepted[r])
        labelled = min(m + 1, n)
        for name, grid in values.items():
            columns[name].append(grid[r, :labelled])
            if m >= n:  # all accepted: the target's bonus token, never drafted
                columns[name].append(fill[name].reshape(1))
        count = labelled + int(m >= n)
        imputed += int(m >= n)
        if i == 0 or rounds.seq[r] != rounds.seq[order[i - 1]]:
            spans.append((len(seq), len(seq)))
        seq += [int(rounds.seq[r])] * count
        temperature += [float(rounds.temperature[r])] * count
        spans[-1] = (spans[-1][0], len(seq))
    flat = {name: torch.cat(parts).double() for name, parts in columns.items()}
    total = len(seq)
    index = torch.arange(total).unsqueeze(1) + torch.arange(k).unsqueeze(0)  # [T, K]
    end = torch.empty(total, dtype=torch.long)
    for start, stop in spans:
        end[start:stop] = stop
    length = (end - 1 - torch.arange(total)).clamp(min=0, max=k)  # the text's last token is the target's
    inside = torch.arange(k).unsqueeze(0) < length.unsqueeze(1)
    safe = index.clamp(max=total - 1)

    def window(values: torch.Tensor, pad: float) -> torch.Tensor:
        return torch.where(inside, values[safe], torch.full_like(values[safe], pad))

    windows = Rounds(
        accept=window(flat["accept"], 0.0), length=length, seq=torch.tensor(seq),
        draft_prob=window(flat["draft_prob"], 0.0),
        temperature=torch.tensor(temperature, dtype=torch.float64),
        head={name: window(flat[name], float("nan")) for name in rounds.head}, head_timing=dict(rounds.head_timing),
    )
    return Text(windows, flat["accept"], spans, imputed)


def replay(
    text: Text, rule_at: Callable[[], Callable[[int], int]], costs: CostModel, features: bool, head_calls: int,
    sims: int = 32, seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Per prompt [P], averaged over `sims` walks of its text: tokens, accepted, proposed, seconds and rounds.

    `rule_at()` gives a walk its rule: the candidates of a round starting at a position (row of the windows).
    A rule with state (threshold "auto") starts fresh each walk and carries it from prompt to prompt."""
    w = text.windows
    seconds_by_length = round_seconds(torch.arange(w.accept.shape[1] + 1), costs, features, head_calls).tolist()
    g = torch.Generator().manual_seed(seed)
    passes_by_walk = (torch.rand(sims, len(w.length), generator=g, dtype=torch.float64) < text.labels).tolist()
    out = torch.zeros(5, len(text.spans), dtype=torch.float64)
    for passes in passes_by_walk:  # passes[t]: the candidate at position t is accepted in this walk
        rule = rule_at()
        for p, (start, stop) in enumerate(text.spans):
            t, tokens, accepted, proposed, seconds, rounds = start, 0, 0, 0, 0.0, 0
            while t < stop:
                length = rule(t)
                j = 0
                while j < length and passes[t + j]:
                    j += 1
                tokens, accepted, proposed = tokens + j + 1, accepted + j, proposed + length
                seconds += seconds_by_length[length]
                rounds += 1
                t += j + 1
            out[:, p] += torch.tensor([tokens, accepted, proposed, seconds, rounds], dtype=torch.float64)
    out /= sims
    return dict(zip(("tokens", "accepted", "proposed", "seconds", "rounds"), out, strict=True))


def fixed_rule(text: Text, rule: tuple) -> Callable[[], Callable[[int], int]]:
    """A rule without state: its length at every position, computed once (`stop_lengths` on the windows)."""
    lengths = stop_lengths(text.windows, rule).tolist()
    return lambda: lengths.__getitem__


def auto_rule(text: Text, name: str, costs: CostModel, bounds: tuple[int, int]) -> Callable[[], Callable[[int], int]]:
    """Threshold "auto" with head `name`: each walk from the engine's prior, planning every round (the target
    alone where the plan's budget is none) and learning the labels of the candidates it proposed (`auto_round`)."""
    w = text.windows
    pred = w.head[name].nan_to_num(1.0)
    after = w.head_timing[name] == "after"
    window_lengths = w.length.tolist()

    def start() -> Callable[[int], int]:
        tuning = SelfTuning(LiveCosts(costs))

        def length_at(t: int) -> int:
            length = window_lengths[t]
            if length == 0:
                return 0
            proposed = auto_round(tuning, pred[t], length, bounds, after, min_budget=0)
            tuning.observe_acceptance(w.accept[t, :proposed].tolist())
            return proposed

        return length_at

    return start
