"""The offline evaluator's replay along the text (specdecpp/bench/text_replay.py) on hand-built rounds:
the text it reads from logged rounds, exact walks where every label is 0 or 1, and predict's figures."""

from __future__ import annotations

import pytest
import torch

from engine.tuning import PROBE_EVERY
from specdecpp.bench.stop_rules import CostModel, Rounds, predict
from specdecpp.bench.text_replay import auto_rule, fixed_rule, replay, text_positions

NAN = float("nan")
COSTS = CostModel(draft_step=0.1, draw=0.0, features=0.0, head=0.0, target={1: 1.0, 9: 1.8})  # 1 + 0.1 (n - 1)


def logged(accept: list[list[float]], length: list[int], accepted: list[int], seq: list[int]) -> Rounds:
    """Rounds logged at k = 4; the head knows each candidate's label."""
    a = torch.tensor(accept, dtype=torch.float64)
    return Rounds(accept=a, length=torch.tensor(length), seq=torch.tensor(seq), draft_prob=a.clone(),
                  temperature=torch.ones(len(length), dtype=torch.float64),
                  head={"default": a.masked_fill(torch.arange(4) >= torch.tensor(length).unsqueeze(1), NAN)},
                  head_timing={"default": "before"}, accepted=torch.tensor(accepted))


def two_prompts() -> Rounds:
    return logged(
        accept=[[1, 0, 1, 1], [1, 1, 1, 0], [0, 1, 1, 1], [1, 1, 1, 1]],
        length=[4, 3, 4, 4],
        accepted=[1, 3, 0, 4],
        seq=[0, 0, 1, 1],
    )


def test_the_text_is_the_accepted_candidates_the_first_rejected_one_and_the_bonus_tokens():
    text = text_positions(two_prompts())
    # Prompt 0: round 1 accepted one then lost one (its last two candidates follow a token the text lacks);
    # round 2 accepted all three, then the target's bonus token (imputed from the deepest candidates: 1.0).
    # Prompt 1: the first candidate lost; then four accepted and the bonus.
    assert text.labels.tolist() == [1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1]
    assert text.spans == [(0, 6), (6, 12)] and text.imputed == 2
    # A round may propose up to the logged k, never the text's last token (the target's).
    assert text.windows.length.tolist() == [4, 4, 3, 2, 1, 0, 4, 4, 3, 2, 1, 0]
    assert text.windows.accept[2].tolist() == [1, 1, 1, 0]  # positions 2, 3, 4 and padding
    assert text.windows.head["default"][4, 1:].isnan().all()


def test_a_walk_starts_each_round_where_the_last_one_ended():
    text = text_positions(two_prompts().only(torch.tensor([0, 2, 1, 3])))  # a batched run interleaves its prompts
    assert text.spans == [(0, 6), (6, 12)]
    out = replay(text, fixed_rule(text, ("constant", 2)), COSTS, features=False, head_calls=0, sims=3)
    # Prompt 0, labels 1 0 1 1 1 1: round at 0 proposes 2, loses the 2nd (2 tokens); round at 2 proposes 2, both
    # accepted (3 tokens); round at 5 is the text's last token, the target's alone.
    # Prompt 1, labels 0 1 1 1 1 1: the first lost (1 token); 2 accepted (3 tokens); at 4 one candidate fits
    # before the last token, accepted (2 tokens).
    assert out["tokens"].tolist() == [6, 6]  # every rule walks the whole text
    assert out["rounds"].tolist() == [3, 3] and out["proposed"].tolist() == [4, 5]
    assert out["accepted"].tolist() == [3, 3]
    assert out["seconds"].tolist() == pytest.approx([1.4 + 1.4 + 1.0, 1.4 + 1.4 + 1.2])


def test_a_head_that_sees_a_lost_candidate_coming_proposes_none_after_it():
    # One prompt, labels 1 1 0 0 1 1 1 1 1: a perfect head at threshold 0.5 submits the first lost candidate as its
    # round's last (it is judged before the draft runs on it), then proposes the second lost one alone; a constant
    # k = 4 proposes past both.
    r = logged(accept=[[1, 1, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1]], length=[4, 4, 4], accepted=[2, 0, 4],
               seq=[0, 0, 0])
    text = text_positions(r)
    assert text.labels.tolist() == [1, 1, 0, 0, 1, 1, 1, 1, 1]
    head = replay(text, fixed_rule(text, ("specdec++", "default", 0.5, 1, 4)), COSTS, True, 1, sims=2)
    constant = replay(text, fixed_rule(text, ("constant", 4)), COSTS, False, 0, sims=2)
    assert head["rounds"].tolist() == [3] and head["proposed"].tolist() == [3 + 1 + 4]
    assert constant["rounds"].tolist() == [3] and constant["proposed"].tolist() == [4 + 4 + 4]
    assert head["tokens"].tolist() == constant["tokens"].tolist() == [9]


def test_auto_walks_the_whole_text_and_learns_along_it():
    text = text_positions(two_prompts())
    out = replay(text, auto_rule(text, "default", COSTS, (1, 4)), COSTS, True, 1, sims=4)
    assert out["tokens"].tolist() == [6, 6] and (out["proposed"] > 0).all()


def test_auto_runs_the_target_alone_where_no_candidate_pays():
    # A draft step dearer than a target step: no round with candidates beats the target alone. Walking the text,
    # auto runs the target alone but for a probe round now and then (engine/tuning.py); the rounds replay, whose
    # logged rounds all proposed, cannot.
    dear = CostModel(draft_step=1.5, draw=0.0, features=0.0, head=0.0, target={1: 1.0, 9: 1.8})
    rounds = logged(accept=[[1, 1, 1, 1]] * 6, length=[4] * 6, accepted=[4] * 6, seq=[0, 0, 0, 1, 1, 1])
    text = text_positions(rounds)
    out = replay(text, auto_rule(text, "default", dear, (1, 4)), dear, True, 1, sims=2)
    assert out["tokens"].sum() == 30 and out["proposed"].sum() <= out["rounds"].sum() / PROBE_EVERY + 1
    result = predict(rounds, dear, (1, 4), resamples=10, replay="text")
    assert result["best"]["specdec++ auto"]["speedup"] > 0.9 > result["best"]["constant"]["speedup"]


def test_predict_along_the_text():
    rounds = two_prompts()
    result = predict(rounds, COSTS, (1, 4), resamples=50, replay="text")
    assert result["replay"] == "text" and result["text_positions"] == 12 and result["imputed_positions"] == 2
    assert result["best"]["none"]["speedup"] == pytest.approx(1.0)
    k2 = next(r for r in result["rows"] if r["policy"] == "constant" and r["knob"] == 2)
    assert k2["tokens_per_round"] == pytest.approx(2.0) and k2["verification_rate"] == pytest.approx(0.5)
    assert k2["speedup"] == pytest.approx(12 / 7.8, abs=1e-4)
    assert {"specdec++ auto", "oracle"} <= set(result["best"])
    rounds.accepted = None
    with pytest.raises(ValueError, match="accepted counts"):
        predict(rounds, COSTS, (1, 4), resamples=10, replay="text")
