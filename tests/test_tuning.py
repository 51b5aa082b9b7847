"""Self-tuning (engine/tuning.py, engine/costs.py): the derived stop level on synthetic costs and
acceptance (known answers), budgets against verification cost, the live cost model, and the engine
running threshold "auto"."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import CHEAP_DRAFT_COSTS, random_head

import engine.speculate as speculate
from engine import costs
from engine.costs import LONG_FORWARD, CostModel, LiveCosts, interpolate, measure_costs, monotone
from engine.llm_engine import LLMEngine
from engine.params import SamplingParams, SpecConfig
from engine.policies import ProposalStep, SpecDecPP, make_policy
from engine.runner import ModelRunner
from engine.speculate import ROUND_LAG
from engine.tuning import (
    MAX_LEVEL,
    MIN_LEVEL,
    PROBE_EVERY,
    SelfTuning,
    best_fixed,
    budget_at,
    candidate_budget,
    catch_up_pays,
    depth_levels,
    marginal_seconds,
    stop_level,
)


def flat(draft: float, target: float = 1.0, slope: float = 0.0, knee: int = 1) -> CostModel:
    """Draft step `draft` s, no per-candidate work, a target forward of `target` s up to `knee` tokens
    (memory-bound), then `slope` s more per token (compute-bound)."""
    return CostModel(draft_step=draft, draw=0.0, features=0.0, head=0.0,
                     target={1: target, knee: target, 256: target + (256 - knee) * slope})


def test_a_sequence_prices_its_runs_within_its_own_budget():
    """The same step as above (the 6th candidate takes the forward from 6 to 7 tokens): a sequence that may propose
    8 stays in at the 5th candidate, since the cheap 7th and 8th repay the step; one capped at 6 (tokens left, its
    bounds) cannot propose them, so its 5th-depth level is stricter, and every other depth is priced alike."""
    costs = CostModel(draft_step=0.03, draw=0.0, features=0.0, head=0.0,
                      target={1: 0.11, 6: 0.11, 7: 0.14, 8: 0.145, 16: 0.2})
    eight = SelfTuning(LiveCosts(costs), prior_acceptance=0.85).plan([8])
    six = SelfTuning(LiveCosts(costs), prior_acceptance=0.85).plan([6])
    assert six.budgets == [6] and six.rate == pytest.approx(eight.rate) and len(six.depth_levels[0]) == 6
    assert six.depth_levels[0][4] < eight.depth_levels[0][4]
    others = [n for n in range(6) if n != 4]
    assert [six.depth_levels[0][n] for n in others] == pytest.approx([eight.depth_levels[0][n] for n in others])
    batch = SelfTuning(LiveCosts(costs), prior_acceptance=0.85).plan([8, 6])  # one plan, a list per sequence
    assert [len(levels) for levels in batch.depth_levels] == batch.budgets == [8, 6]


def test_measured_curves_drop_upward_noise():
    """A spike (the first forward of a busy host) is lowered to the larger sizes' time, never propagated."""
    assert monotone({1: 0.58, 2: 0.30, 4: 0.31, 8: 0.29, 16: 0.40}) == {1: 0.29, 2: 0.29, 4: 0.29, 8: 0.29, 16: 0.40}


def test_target_cost_moves_from_one_sequence_to_the_full_batch_curve():
    costs = CostModel(draft_step=0.1, draw=0.0, features=0.0, head=0.0, target={1: 1.0, 32: 1.0},
                      target_full={8: 1.0, 32: 2.0}, full_batch=8)
    assert costs.target_seconds(16) == 1.0
    assert costs.target_seconds(16, 8) == pytest.approx(1 + 8 / 24)
    assert costs.target_seconds(16, 4) == pytest.approx(1 + 3 / 7 * 8 / 24)
    assert costs.target_seconds(16, 20) == costs.target_seconds(16, 8)


def test_interpolate_is_piecewise_linear_and_extrapolates():
    points = {1: 1.0, 4: 2.5, 8: 4.5}
    assert interpolate(points, 0.5) == 1.0
    assert interpolate(points, 2) == pytest.approx(1.5)
    assert interpolate(points, 6) == pytest.approx(3.5)
    assert interpolate(points, 12) == pytest.approx(6.5)
    assert interpolate({2: 3.0}, 4) == pytest.approx(6.0)


def test_level_is_the_break_even_of_one_more_candidate():
    """Known answer: draft 0.1 s, flat verification 1 s, a = 0.8. The best fixed k maximises
    (1 + a + ... + a^k) / (1 + 0.1 k): k = 6 at 2.4695 tokens/s; one more candidate costs 0.1 s, so the
    level is 1 - 2.4695 * 0.1 / 0.8 = 0.6913, where P(all accepted) * a equals rate * marginal cost."""
    costs = flat(0.1)
    k, rate = best_fixed(costs, 1, 0.8, 20)
    assert k == 6
    assert rate == pytest.approx(sum(0.8**j for j in range(7)) / 1.6)
    level = stop_level(rate, marginal_seconds(costs, 1, k + 1), 0.8)
    assert level == pytest.approx(1 - rate * 0.1 / 0.8)
    assert (1 - level) * 0.8 == pytest.approx(rate * 0.1)
    assert stop_level(100.0, 1.0, 0.5) == MIN_LEVEL and stop_level(0.0, 1.0, 0.5) == MAX_LEVEL


def simulated_rate(levels: float, costs: CostModel, accept: np.ndarray) -> float:
    """Tokens per second of the threshold rule fed the true a_s, on rounds of per-candidate acceptance
    probabilities `accept` [R, K] (expectations, exact): stop after candidate s once 1 - prod a_i > level."""
    prod = np.cumprod(accept, axis=1)
    stop = (1 - prod) > levels
    length = np.where(stop.any(1), stop.argmax(1) + 1, accept.shape[1])
    mask = np.arange(1, accept.shape[1] + 1)[None, :] <= length[:, None]
    tokens = (prod * mask).sum(1) + 1
    seconds = length * costs.draft_step + np.array([costs.target_seconds(n + 1) for n in length])
    return float(tokens.sum() / seconds.sum())


@pytest.mark.parametrize("draft", [0.05, 0.15, 0.3])
def test_auto_level_is_near_the_best_fixed_level(draft):
    """On bursty synthetic acceptance (easy stretches and hard ones, the head exact), the derived level
    reaches within 3% of the best level a sweep finds, for cheap and dear drafts."""
    rng = np.random.default_rng(0)
    easy = rng.random((4000, 1)) < 0.5
    accept = np.where(easy, rng.beta(18, 1, (4000, 24)), rng.beta(2, 2, (4000, 24)))
    costs = flat(draft, slope=0.002)
    tuning = SelfTuning(LiveCosts(costs), prior_acceptance=float(accept.mean()))
    level = tuning.plan([24]).levels[0]
    sweep = {t: simulated_rate(t, costs, accept) for t in np.linspace(0.02, 0.98, 49)}
    best = max(sweep.values())
    assert simulated_rate(level, costs, accept) >= 0.97 * best, (level, max(sweep, key=sweep.get))


def test_each_depth_gets_the_level_of_its_own_margin():
    """Known answer, the shape measured on the AMD EPYC with rows padded: the target costs 0.11 s from 1 to 6
    tokens and 0.14 s from 7. Only the candidate that takes the forward from 6 to 7 tokens (the 6th) pays
    the step, so the level of a round of 5 candidates is lower than the others'; one level for every depth
    (its value at the best fixed count) would have charged every candidate the step, or none."""
    costs = CostModel(draft_step=0.03, draw=0.0, features=0.0, head=0.0,
                      target={1: 0.11, 6: 0.11, 7: 0.14, 8: 0.145, 16: 0.2})
    plan = SelfTuning(LiveCosts(costs), prior_acceptance=0.85).plan([8])
    rate, by_depth = plan.rate, plan.depth_levels[0]
    assert plan.budgets == [8] and len(by_depth) == 8
    margins = [marginal_seconds(costs, 1, k) for k in range(1, 10)]
    for n, level in enumerate(by_depth, start=1):  # the best run of j more candidates, each at its own margin
        runs = [stop_level(rate, sum(margins[n : n + j]), sum(0.85**i for i in range(1, j + 1)))
                for j in range(1, max(8 - n, 1) + 1)]
        assert level == pytest.approx(max(runs))
    assert by_depth[4] < min(by_depth[:4]) and by_depth[4] < by_depth[5]  # the 6th candidate: the step
    assert by_depth[0] == pytest.approx(by_depth[3])  # flat below it: the same margin


def test_a_dear_candidate_is_priced_with_the_cheap_ones_after_it():
    """Known answer: the 6th candidate crosses a step (0.06 s more verification) and the 7th and 8th cost the
    draft step alone. One step at a time, a round of 5 stops where 1 - pi > 1 - r (0.03 + 0.06) / a; priced
    with the next two, its level is 1 - r (0.03 + 0.09 + 0.03 + 0.03 ...) over their expected gains, higher.
    Where every candidate costs the same, looking further changes nothing (j m / (a + ... + a^j) grows with j)."""
    stepped = CostModel(draft_step=0.03, draw=0.0, features=0.0, head=0.0,
                        target={1: 0.11, 6: 0.11, 7: 0.17, 8: 0.17, 9: 0.17, 16: 0.2})
    rate, a = 8.0, 0.9
    levels = depth_levels(stepped, 1, rate, a, 8)
    one_step = stop_level(rate, 0.09, a)
    three = stop_level(rate, 0.09 + 0.03 + 0.03, a + a**2 + a**3)
    assert levels[4] == pytest.approx(max(one_step, three, stop_level(rate, 0.12, a + a**2)))
    assert levels[4] > one_step + 0.1
    flat_costs = CostModel(draft_step=0.03, draw=0.0, features=0.0, head=0.0, target={1: 0.11, 16: 0.11})
    assert depth_levels(flat_costs, 1, rate, a, 8) == pytest.approx([stop_level(rate, 0.03, a)] * 8)


def test_a_budget_keeps_a_dear_candidate_that_the_cheap_ones_after_it_repay():
    """Known answer: at 12 tokens/s the 6th candidate (0.03 s of draft, 0.06 s more verification) costs
    1.08 tokens and the 7th and 8th 0.36 each, so rounds of 8 surely accepted candidates beat rounds of 5
    (-0.08 + 0.64 + 0.64 > 0) and the budget is 8, not 5, where the depth levels look too. A step of 0.2 s
    is not repaid by two cheap candidates (-1.76 + 1.28 < 0): the budget stays 5."""
    stepped = CostModel(draft_step=0.03, draw=0.0, features=0.0, head=0.0,
                        target={1: 0.11, 6: 0.11, 7: 0.17, 8: 0.17, 9: 0.17, 16: 0.2})
    assert 12.0 * marginal_seconds(stepped, 1, 6) > 1.0  # the 6th alone does not pay
    assert candidate_budget(stepped, 1, 12.0, 1, 8) == 8
    steep = replace(stepped, target={1: 0.11, 6: 0.11, 7: 0.31, 8: 0.31, 9: 0.31, 16: 0.4})
    assert candidate_budget(steep, 1, 12.0, 1, 8) == 5
    assert candidate_budget(steep, 1, 12.0, 6, 8) == 6  # never below the best fixed count


def test_specdecpp_stops_at_the_level_of_its_depth():
    policy = SpecDecPP("auto", (1, 8))
    # 0.9: the level at the best fixed count, alone it would never stop here; 0.5 the acceptance (unused: "before")
    policy.set_levels(0.9, [0.9, 0.9, 0.05, 0.9], 0.5)
    policy.start_round()
    steps = [ProposalStep(index=s, when="before", accept_prob=0.9) for s in (1, 2, 3, 4)]
    assert [policy.should_stop(step) for step in steps[:3]] == [False, False, True]  # 1 - 0.9^3 > 0.05
    policy.start_round()
    policy.set_levels(0.9, [], 0.5)
    assert not any(policy.should_stop(step) for step in steps)  # no depth's level: `threshold` for all


def test_a_head_judging_after_the_forward_prices_the_candidate_it_submits_unjudged():
    """Known answer: stopped after judging y_2, a round holds y_1..y_3, all accepted with 0.9^2 x a. At the
    3-candidate level 0.25 it stops at a = 0.9 (1 - 0.729 > 0.25) and goes on at a = 0.95 (1 - 0.7695 < 0.25);
    the judged product alone (1 - 0.81 = 0.19) would go on at both."""
    steps = [ProposalStep(index=s, when="after", accept_prob=0.9) for s in (1, 2, 3)]
    for accept, stops in ((0.9, [False, True]), (0.95, [False, False])):
        policy = SpecDecPP("auto", (1, 8), timing="after")
        policy.set_levels(0.9, [0.9, 0.9, 0.25, 0.9], accept)
        policy.start_round()
        assert [policy.should_stop(step) for step in steps[:2]] == stops
    with pytest.raises(TypeError, match="does not tune itself"):
        make_policy(SpecConfig(policy="constant", k=3)).set_levels(0.5, [], 0.7)


def test_budgets_shrink_as_verification_gets_dearer():
    """The same draft, verification from flat to steep: budgets never grow, and reach 0 (the target
    alone) once even the first candidate's expected gain does not pay for its rows of the forward."""
    budgets = []
    for slope in (0.0, 0.01, 0.1, 0.3, 0.6, 1.0):
        costs = flat(0.05, slope=slope, knee=16)
        k, rate = best_fixed(costs, 4, 0.7, 20)
        budgets.append(candidate_budget(costs, 4, rate, k, 20))
    assert budgets == sorted(budgets, reverse=True)
    assert budgets[0] == 20 and budgets[-1] == 3  # up to the knee (4 x 4 tokens), where rows are still free
    steep = flat(0.05, slope=1.0, knee=4)  # the batch alone fills the memory-bound part
    assert candidate_budget(steep, 4, *best_fixed(steep, 4, 0.7, 20)[::-1], 20) == 0


def test_a_first_candidate_dearer_than_the_rest_does_not_turn_speculation_off():
    """Known answer, the shape measured under AVX2 caps: a 1-token target forward 0.36 s, 2 tokens 0.5 s
    (another kernel from 2 rows on), then almost flat. The first candidate alone costs 0.095 + 0.14 s and
    at the best fixed rate does not pay on its margin, but rounds of 6 beat the target alone (4.6 against
    2.8 tokens/s at a = 0.9): the budget is not 0, and it is 0 where no round with candidates pays."""
    costs = CostModel(draft_step=0.095, draw=0.0, features=0.0, head=0.0,
                      target={1: 0.36, 2: 0.5, 4: 0.54, 8: 0.58, 16: 0.75})
    k, rate = best_fixed(costs, 1, 0.9, 20)
    assert k > 0 and rate > 1 / 0.36
    assert rate * marginal_seconds(costs, 1, 1) > 0.9  # the first candidate's margin alone: refused
    assert candidate_budget(costs, 1, rate, k, 20) >= k
    dear = replace(costs, draft_step=2.0)
    assert best_fixed(dear, 1, 0.9, 20)[0] == 0 and budget_at(dear, 1, 0.9, 20) == 0


def test_budgets_and_level_shrink_with_the_batch_where_verification_is_compute_bound():
    costs = flat(0.05, slope=0.05, knee=8)
    tuning = SelfTuning(LiveCosts(costs), prior_acceptance=0.7)
    plans = [tuning.plan([20] * b) for b in (1, 2, 4, 8)]
    budgets = [p.budgets[0] for p in plans]
    levels = [p.levels[0] for p in plans]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[-1]
    assert levels == sorted(levels, reverse=True) and levels[0] > levels[-1]


def test_a_round_is_priced_at_the_load_to_come():
    """A burst is admitted one prefill a step: the first sequence decodes alone while seven more wait. Verification
    is compute-bound past 8 tokens, so speculating pays at batch 1 but not at 8; priced at the load to come, the
    lone sequence neither proposes nor catches its draft up (it would stop speculating a few steps later)."""
    costs = flat(0.05, slope=0.2, knee=8)
    tuning = SelfTuning(LiveCosts(costs), prior_acceptance=0.7)
    assert tuning.plan([8]).budgets[0] > 0
    assert tuning.plan([8], [(64, 40)]).budgets[0] > 0
    assert tuning.plan([8], load=8).budgets == [0]
    assert tuning.plan([8], [(64, 40)], load=8).budgets == [0]
    assert tuning.plan([8] * 8, load=1).budgets == tuning.plan([8] * 8).budgets  # never below the round's own batch


def test_a_draft_measured_too_dear_is_probed_and_relearnt():
    """A draft timed at 100x its cost (a busy host at start) turns speculation off; probe rounds re-time it,
    and the live model brings speculation back."""
    live = LiveCosts(flat(5.0))
    tuning = SelfTuning(live, prior_acceptance=0.8)
    plans = [tuning.plan([8]) for _ in range(PROBE_EVERY)]
    assert all(p.budgets == [0] for p in plans[:-1]) and plans[-1].budgets == [1]
    live.observe_draft([1], 1, 0.05, featured=1, judged=1)  # the probe's draft step: the first observation
    assert live.current.draft_step == pytest.approx(0.05)
    assert tuning.plan([8]).budgets[0] > 1


def test_live_costs_follow_the_observed_level_and_keep_the_shape():
    measured = CostModel(draft_step=0.1, draw=0.0, features=0.0, head=0.0, target={1: 1.0, 16: 2.0},
                         draft_batch={1: 0.1, 4: 0.2})
    live = LiveCosts(measured)
    for _ in range(300):
        live.observe_target(16, 4.0)  # the host got twice as slow for the target
        live.observe_draft([4, 1], 5, 0.3, featured=5, judged=5)  # the draft as measured
    assert live.current.target_seconds(1) == pytest.approx(2.0, rel=0.01)
    assert live.current.target_seconds(16) == pytest.approx(4.0, rel=0.01)
    assert live.current.draft_seconds(4) == pytest.approx(0.2, rel=0.01)
    live.observe_target(16, 1e6)  # one stalled forward moves the level by a bounded factor only
    assert live.current.target_seconds(16) < 8.0


def test_state_carries_every_decision_input_to_another_rank():
    """A follower rank of a tensor-parallel target takes rank 0's state and then plans exactly alike."""
    leader = SelfTuning(LiveCosts(flat(0.1, slope=0.01, knee=8)), prior_acceptance=0.7)
    for _ in range(5):
        leader.costs.observe_target(16, 1.7, 8)
        leader.costs.observe_draft([8, 4], 12, 0.4, featured=12, judged=12)
        leader.observe_acceptance([0.9, 0.2])
    follower = SelfTuning(LiveCosts(flat(0.3)), prior_acceptance=0.5)
    follower.load_state(leader.state())
    assert follower.plan([20] * 4) == leader.plan([20] * 4)
    assert follower.costs.current == leader.costs.current


def test_acceptance_estimate_follows_the_labels_and_moves_the_level():
    tuning = SelfTuning(LiveCosts(flat(0.1)), prior_acceptance=0.5)
    low = tuning.plan([20]).levels[0]
    for _ in range(300):
        tuning.observe_acceptance([0.9, 0.9, 0.9])
    assert tuning.acceptance == pytest.approx(0.9, abs=0.01)
    assert tuning.plan([20]).levels[0] != low


def test_a_catch_up_pays_where_the_tokens_left_save_more_than_it_costs():
    """Known answer: a 0.1-s target forward whatever its size, a 0.01-s draft step, a 64-token catch-up of 0.2 s.
    At k=4 and acceptance 0.8 a token costs (4 x 0.01 + 0.1) / (1 + .8 + .8^2 + .8^3 + .8^4) = 0.04165 s against
    0.1 s alone: 0.0583 s saved per token, so 0.2 s pays from 4 tokens left (3.43) on. A batch of two waits for
    the catch-up together: twice the price, from 7 tokens (6.86)."""
    costs = replace(flat(0.01, target=0.1), draft_tokens={1: 0.01, 64: 0.2})
    assert [catch_up_pays(costs, 1, 0.8, 4, 64, left) for left in (3, 4)] == [False, True]
    two = replace(costs, target_full={2: 0.1, 256: 0.1}, full_batch=2, draft_batch={1: 0.01, 2: 0.01})
    assert [catch_up_pays(two, 2, 0.8, 4, 64, left) for left in (6, 7)] == [False, True]
    assert not catch_up_pays(costs, 1, 0.8, 0, 64, 1000)  # nothing to save without candidates
    unmeasured = flat(0.01, target=0.1)  # an older cost file: the target's curve times the draft / target ratio
    assert unmeasured.draft_feed_seconds(64) == pytest.approx(0.01)


def test_plan_refuses_a_catch_up_that_does_not_pay_and_probes_only_short_ones():
    tuning = SelfTuning(LiveCosts(replace(flat(0.01, target=0.1), draft_tokens={1: 0.01, 64: 0.2})), 0.8)
    assert tuning.plan([4, 4], [(64, 3), None]).budgets == [0, 4]  # lags 64 with 3 tokens left / caught up
    assert tuning.plan([4], [(64, 40)]).budgets == [4]
    dear = SelfTuning(LiveCosts(flat(10.0, target=0.1)), 0.8)  # nothing pays: only probes propose
    probes = [dear.plan([4, 4, 4], [None, (8, 40), (64, 40)]).budgets for _ in range(PROBE_EVERY)]
    assert probes[-1] == [1, 1, 0] and not any(map(any, probes[:-1]))  # a probe never feeds 64 for 40 tokens


def test_cost_model_round_trips_and_reads_files_without_draft_batch(tmp_path):
    costs = CostModel(draft_step=0.1, draw=0.001, features=0.002, head=0.003, target={1: 1.0, 8: 1.5},
                      draft_batch={1: 0.1, 2: 0.12}, target_full={2: 1.2, 8: 1.9}, full_batch=2,
                      draft_tokens={1: 0.1, 16: 0.3})
    costs.save(tmp_path / "c.json")
    assert CostModel.load(tmp_path / "c.json") == costs
    old = CostModel(draft_step=0.1, draw=0.0, features=0.0, head=0.0, target={1: 1.0})
    old.save(tmp_path / "old.json")
    assert CostModel.load(tmp_path / "old.json").draft_seconds(3) == pytest.approx(0.3)


@pytest.fixture(scope="module")
def engine(tiny_pair, tokenizer):
    target, draft = tiny_pair
    return LLMEngine(target, draft, tokenizer, heads={"default": random_head(target.config.hidden_size)},
                     costs=CHEAP_DRAFT_COSTS)


def test_engine_reports_the_levels_it_used_and_learns(engine):
    params = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True, seed=3)
    out = engine.generate("hello world", params, SpecConfig(policy="specdec++"))  # the default: auto
    stats = out.stats
    assert stats["proposed_tokens"] > 0
    assert len(stats["stop_levels"]) == stats["rounds"]
    assert MIN_LEVEL <= stats["mean_stop_level"] <= MAX_LEVEL
    fixed = engine.generate("hello world", params, SpecConfig(policy="specdec++", threshold=0.3)).stats
    assert fixed["stop_levels"] == [] and fixed["mean_stop_level"] is None
    assert engine.tuning.costs.target_scale == 1.0  # a model with refresh False is kept as given


def test_only_self_tuning_requests_teach_the_acceptance_estimate(engine):
    """A constant k's deep candidates are rejected far more often than those auto proposes: learning from them
    would make auto stop early in the requests that follow."""
    params = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True, seed=4)
    before = engine.tuning.acceptance
    fixed = engine.generate("hello world", params, SpecConfig(policy="constant", k=8)).stats
    assert fixed["proposed_tokens"] > fixed["accepted_tokens"] and engine.tuning.acceptance == before
    engine.generate("hello world", params, SpecConfig(policy="specdec++"))
    assert engine.tuning.acceptance != before


def test_specdecpp_proposes_no_deeper_than_its_head_was_trained(tiny_pair, tokenizer):
    """A head trained on rounds of up to 3 candidates caps specdec++ rounds at 3, within the bounds (a fixed level
    and "auto" alike); a head without a recorded depth leaves the bounds as they are."""
    assert SpecDecPP(0.5, (1, 20), depth=8).max_candidates() == 8
    assert SpecDecPP(0.5, (1, 20)).max_candidates() == 20
    assert SpecDecPP(0.5, (1, 6), depth=8).max_candidates() == 6
    assert SpecDecPP(0.5, (5, 20), depth=3).max_candidates() == 5  # never below the lower bound
    target, draft = tiny_pair
    head = random_head(draft.config.hidden_size, seed=1)
    with torch.no_grad():
        head.out.bias.fill_(30.0)  # judges every candidate accepted: only a length cap ends a round
    head.config.max_position = 3
    engine = LLMEngine(target, draft, tokenizer, heads={"default": head}, costs=CHEAP_DRAFT_COSTS)
    params = SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True, seed=2)
    for threshold in (0.999, "auto"):  # a level that never stops reaches the cap; auto stays within it
        lengths = engine.generate("hello world", params, SpecConfig(policy="specdec++", threshold=threshold)
                                  ).stats["candidate_lengths"]
        assert max(lengths) == 3 if threshold != "auto" else 0 < max(lengths) <= 3, threshold
    head.config.max_position = 0
    lengths = engine.generate("hello world", params, SpecConfig(policy="specdec++", threshold=0.999)
                              ).stats["candidate_lengths"]
    assert max(lengths) > 3


def test_engine_refreshes_its_costs_from_its_own_forwards(tiny_pair, tokenizer):
    target, draft = tiny_pair
    engine = LLMEngine(target, draft, tokenizer, costs=replace(CHEAP_DRAFT_COSTS, refresh=True))
    engine.generate("hello", SamplingParams(temperature=0.0, max_tokens=6), SpecConfig(policy="none"))
    assert engine.tuning.costs.target_scale != 1.0  # the tiny target's forwards cost other than the model given
    assert engine.tuning.costs.current.target_seconds(1) != CHEAP_DRAFT_COSTS.target_seconds(1)


def test_engine_measures_its_costs_when_given_none(tiny_pair, tokenizer):
    target, draft = tiny_pair
    engine = LLMEngine(target, draft, tokenizer)
    measured = engine.tuning.costs.measured
    assert measured.draft_step > 0 and all(s > 0 for s in measured.target.values())
    assert sorted(measured.target)[:11] == [*range(1, 10), 12, 16]  # every size a round of up to 8 verifies
    assert sorted(measured.draft_batch) == [1, 2, 4, 8]
    assert measured.full_batch == 8 and min(measured.target_full) == 8
    assert sorted(measured.draft_tokens)[:4] == [1, 16, 64, 256] and min(measured.draft_tokens.values()) > 0
    assert LLMEngine(target, None, tokenizer).tuning is None


def test_target_costs_are_timed_as_verifications(tiny_pair, tokenizer, monkeypatch):
    """The target's forwards are measured as a round verifies: logits at every token (each row's probabilities
    computed from them), up to LONG_FORWARD tokens; longer ones, prefill chunks, with their last token's only."""
    target, draft = tiny_pair
    engine = LLMEngine(target, draft, tokenizer, costs=CHEAP_DRAFT_COSTS)
    calls, processed = [], []
    forward_batch = ModelRunner.forward_batch

    def recording(runner, feeds, caches, num_logits):
        if runner is engine.target:
            calls.append((sum(len(f) for f in feeds), list(num_logits)))
        return forward_batch(runner, feeds, caches, num_logits)

    monkeypatch.setattr(ModelRunner, "forward_batch", recording)
    monkeypatch.setattr(costs, "processed_logits", lambda rows, params: processed.append(len(rows)) or rows)
    measure_costs(engine.target, engine.draft, context=8, max_tokens=96)
    verifications = [(n, logits) for n, logits in calls if n < LONG_FORWARD]
    assert verifications and all(sum(logits) == n for n, logits in verifications)
    assert sum(n for n, _ in verifications) == sum(processed)
    assert all(logits == [1] * len(logits) for n, logits in calls if n >= LONG_FORWARD)
    assert any(n >= LONG_FORWARD for n, _ in calls)


def test_reported_budget_is_the_budget_at_the_best_fixed_rate():
    """`budget_at` (the engine's reported budget): cheap verification allows up to the cap, dear none."""
    for slope in (0.0, 0.1, 1.0):
        costs = flat(0.05, slope=slope, knee=16)
        rate = best_fixed(costs, 4, 0.7, 20)[1]
        assert budget_at(costs, 4, 0.7, 20) == candidate_budget(costs, 4, rate, best_fixed(costs, 4, 0.7, 20)[0], 20)
    assert budget_at(flat(0.05), 1, 0.7, 20) == 20
    assert budget_at(flat(0.05, slope=1.0, knee=4), 4, 0.7, 20) == 0


def test_a_mismeasured_size_is_corrected_by_forwards_of_that_size():
    """Start-up timed 2..16 tokens at twice 1 token (a busy host), so one candidate looked as dear as a whole
    forward and auto proposed none; the probe round's 2-token forward corrects that point, and auto speculates."""
    truth = {1: 0.1, 2: 0.1, 4: 0.1, 8: 0.105, 16: 0.11, 64: 0.3}
    measured = CostModel(draft_step=0.02, draw=0.0, features=0.0, head=0.0,
                         target={**truth, 2: 0.2, 4: 0.2, 8: 0.2, 16: 0.2})
    live = LiveCosts(measured)
    tuning = SelfTuning(live, prior_acceptance=0.5)
    for _ in range(5):
        live.observe_target(1, 0.1)  # rounds without candidates: the level is right
    assert tuning.plan([8]).budgets == [0]
    live.observe_target(2, 0.1)  # a probe round: one candidate
    assert live.current.target_seconds(2) == pytest.approx(0.1, rel=0.01)
    assert tuning.plan([8]).budgets[0] > 0  # auto speculates again
    for _ in range(30):  # rounds of 0, 1, 3 and 7 candidates: every point the engine uses converges to the truth
        for tokens in (1, 2, 4, 8):
            live.observe_target(tokens, truth[tokens])
    for tokens in (1, 2, 4, 8):
        assert live.current.target_seconds(tokens) == pytest.approx(truth[tokens], rel=0.03)


def test_a_forward_between_measured_sizes_moves_the_segment_it_falls_in():
    """Start-up timed 16 tokens at twice 8 (a kernel step past 16 rows, or noise), but 11 tokens cost what 8 do:
    forwards of 11 tokens lower the 16-token end of the segment, and leave 11 tokens costing what they cost,
    without making 8 tokens cheaper than it is."""
    measured = CostModel(draft_step=0.02, draw=0.0, features=0.0, head=0.0, target={1: 0.1, 8: 0.1, 16: 0.2})
    live = LiveCosts(measured)
    for _ in range(300):
        live.observe_target(11, 0.1)
        live.observe_target(8, 0.1)
    assert live.current.target_seconds(11) == pytest.approx(0.1, rel=0.03)
    assert live.current.target_seconds(8) == pytest.approx(0.1, rel=0.03)
    assert live.current.target_seconds(16) < 0.2 * 0.6


def test_a_draft_level_pushed_up_by_a_busy_spell_recovers_in_a_few_probes():
    """A busy spell timed the draft at 3x (after many observations, so the running mean moves slowly); auto
    then stopped proposing. The probe that ends a spell without candidates weighs more, so speculation is
    back after two probes, not tens, and the rounds that follow bring the level home."""
    live = LiveCosts(flat(0.1, target=0.2))
    tuning = SelfTuning(live, prior_acceptance=0.8)
    for _ in range(100):
        live.observe_draft([1], 1, 0.1, featured=1, judged=1)
        live.observe_target(2, 0.2)
    for _ in range(40):
        live.observe_draft([1], 1, 0.3, featured=1, judged=1)
        live.observe_target(2, 0.2)
    assert live.draft_scale > 2.0 and tuning.plan([8]).budgets == [0]
    budgets = []
    for _ in range(2 * PROBE_EVERY + 40):
        budget = tuning.plan([8]).budgets[0]
        budgets.append(budget)
        live.observe_target(1 + budget, 0.2)
        if budget:
            live.observe_draft([1] * budget, budget, 0.1 * budget, featured=budget, judged=budget)
    probes = [i for i, b in enumerate(budgets) if b == 1]
    assert len(probes) <= 2 and budgets[2 * PROBE_EVERY] > 1 and budgets[-1] > 1
    assert live.draft_scale < 1.3


def test_shape_corrections_stay_bounded_where_the_curve_is_clamped():
    """2 tokens observed dearer than the measured 8 (noise, or a kernel step): the decisions' curve is clamped
    non-decreasing, but each point's correction converges to what its own sizes cost instead of growing
    without bound (a replayed ShareGPT run had reached e^6.8 on the 2-token point)."""
    measured = CostModel(draft_step=0.02, draw=0.0, features=0.0, head=0.0, target={1: 0.1, 2: 0.1, 4: 0.1, 8: 0.2})
    live = LiveCosts(measured)
    for _ in range(500):
        live.observe_target(2, 0.3)
        live.observe_target(1, 0.1)
    shape = live.state()["shape"]["target"]
    assert shape[2] == pytest.approx(np.log(3.0), abs=0.05) and abs(shape[1]) < 0.05
    assert live.current.target_seconds(2) <= live.current.target_seconds(8)


def test_a_probe_catches_the_draft_up_before_its_timed_step(tiny_pair, tokenizer, monkeypatch):
    """After rounds without candidates the draft lags by as many tokens. The probe round feeds them first,
    so that its proposal, timed to teach the cost model a draft step, feeds no more than a round leaves.
    (Timed together, a probe after 8 silent rounds measured an 8-token forward as a step, pushed the draft's
    cost up with a probe's large weight, and kept speculation off on a host where it paid.)"""
    target, draft = tiny_pair
    dear = replace(CHEAP_DRAFT_COSTS, draft_step=100.0)  # never pays: only probes propose
    engine = LLMEngine(target, draft, tokenizer, heads={"default": random_head(target.config.hidden_size)}, costs=dear)
    step_feeds, caught_up = [], []
    forward_batch, catch_up = engine.draft.forward_batch, speculate.catch_up_draft
    monkeypatch.setattr(engine.draft, "forward_batch",
                        lambda feeds, *a: step_feeds.extend(len(f) for f in feeds) or forward_batch(feeds, *a))
    monkeypatch.setattr(speculate, "catch_up_draft",
                        lambda seqs, d, chunk: caught_up.append(chunk) or catch_up(seqs, d, chunk))
    params = SamplingParams(temperature=1.0, max_tokens=5 * PROBE_EVERY, ignore_eos=True, seed=5)
    stats = engine.generate("hello world", params, SpecConfig(policy="specdec++")).stats
    assert stats["proposed_tokens"] >= 2  # the probes
    assert step_feeds and max(step_feeds) <= 2 == ROUND_LAG  # the token the target added, the last candidate
    assert caught_up and max(caught_up) >= PROBE_EVERY  # what the silent rounds left behind, fed before the step


def test_the_first_token_comes_before_the_drafts_prefill(engine):
    """A request's first round runs the target alone, as the target alone would: its first token waits for no
    draft prefill and no proposal. The draft catches up on the prompt in the next round and speculation starts."""
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    engine.add_request("first", "hello world", params, SpecConfig(policy="specdec++"))
    seq = engine.requests["first"]
    tokens = []
    while not tokens:
        tokens = [t for event in engine.step() for t in event.token_ids]
    assert len(tokens) == 1 and seq.draft_kv.cache is None and seq.stats.candidate_lengths == [0]
    while engine.has_unfinished():
        tokens += [t for event in engine.step() for t in event.token_ids]
    assert seq.stats.proposed_tokens > 0
    assert tokens == engine.generate("hello world", params, SpecConfig(policy="none")).token_ids


def test_auto_leaves_the_draft_out_where_its_catch_up_does_not_pay(tiny_pair, tokenizer, monkeypatch):
    """A draft whose prefill costs more than speculating could save over the tokens left is never fed: auto runs
    the target alone (and stays lossless). A constant k, asked for by the request, catches up regardless (control)."""
    target, draft = tiny_pair
    dear_prefill = replace(CHEAP_DRAFT_COSTS, draft_tokens={1: 0.01, 8: 100.0})
    engine = LLMEngine(target, draft, tokenizer, heads={"default": random_head(target.config.hidden_size)},
                       costs=dear_prefill)
    fed = []
    forward_batch = engine.draft.forward_batch
    monkeypatch.setattr(engine.draft, "forward_batch", lambda feeds, *a: fed.append(feeds) or forward_batch(feeds, *a))
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    auto = engine.generate("hello world", params, SpecConfig(policy="specdec++"))
    assert auto.stats["proposed_tokens"] == 0 and not fed
    assert auto.token_ids == engine.generate("hello world", params, SpecConfig(policy="none")).token_ids
    constant = engine.generate("hello world", params, SpecConfig(policy="constant", k=3))
    assert constant.stats["proposed_tokens"] > 0 and fed and constant.token_ids == auto.token_ids


def test_a_batched_forward_is_learnt_against_the_blend_it_is_predicted_by():
    """A forward of 4 sequences is predicted between the one-sequence and the full-batch curves: forwards that
    cost exactly that leave both curves as measured (learning them into the one-sequence curve alone made a lone
    sequence look as dear as the blend), and a host that got slower for such forwards moves both toward it."""
    measured = CostModel(draft_step=0.02, draw=0.0, features=0.0, head=0.0, target={1: 0.1, 8: 0.1, 16: 0.2},
                         target_full={8: 0.3, 16: 0.4}, full_batch=8)
    live = LiveCosts(measured)
    for _ in range(200):
        live.observe_target(8, measured.target_seconds(8, 4), 4)
    assert live.current.target_seconds(8, 4) == pytest.approx(measured.target_seconds(8, 4), rel=0.01)
    assert live.current.target_seconds(8) == pytest.approx(0.1, rel=0.01)
    assert live.current.target_seconds(8, 8) == pytest.approx(0.3, rel=0.01)
    for _ in range(300):
        live.observe_target(8, 1.5 * measured.target_seconds(8, 4), 4)
    assert live.current.target_seconds(8, 4) == pytest.approx(1.5 * measured.target_seconds(8, 4), rel=0.03)
    assert live.current.target_seconds(8) > 0.1 and live.current.target_seconds(8, 8) > 0.3


def test_a_verification_is_timed_without_the_bookkeeping_after_it(tiny_pair, tokenizer, monkeypatch):
    """The cost model's target is the forward and the acceptance test; the calibrator's refits, the labels and the
    logprobs after them are not: a slow refit (here 0.3 s per judged round) never reaches the observed timings."""
    import time

    target, draft = tiny_pair
    engine = LLMEngine(target, draft, tokenizer, heads={"default": random_head(target.config.hidden_size)},
                       costs=CHEAP_DRAFT_COSTS)
    observe = speculate.observe_judgements
    monkeypatch.setattr(speculate, "observe_judgements", lambda p, labels: time.sleep(0.3) or observe(p, labels))
    timings = []
    observe_target = engine.tuning.costs.observe_target
    monkeypatch.setattr(engine.tuning.costs, "observe_target",
                        lambda tokens, seconds, sequences=1: timings.append(seconds) or
                        observe_target(tokens, seconds, sequences))
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=3)
    stats = engine.generate("hello world", params, SpecConfig(policy="specdec++", threshold=0.9)).stats
    assert stats["proposed_tokens"] > 0 and timings
    assert max(timings) < 0.3


def test_a_proposal_is_priced_by_the_work_it_did():
    """A confidence rule's candidates read features but no head, and a candidate a budget stopped is drawn but not
    judged: a proposal is compared with what it ran, so a dear head does not make its draft look cheap."""
    measured = CostModel(draft_step=0.1, draw=0.01, features=0.02, head=0.5, target={1: 1.0, 16: 2.0})
    live = LiveCosts(measured)
    for _ in range(50):
        live.observe_draft([1, 1, 1], 3, 3 * 0.1 + 3 * 0.01 + 3 * 0.02, featured=3, judged=0)  # confidence, as measured
        live.observe_draft([1, 1], 2, 2 * 0.1 + 2 * 0.01 + 2 * 0.02 + 0.5, featured=2, judged=1)  # one judged
    assert live.draft_scale == pytest.approx(1.0, rel=1e-6)
