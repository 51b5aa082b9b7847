"""One speculation round over a batch of sequences: budget, propose, verify, accept and roll back.

This is the algorithm of docs/design.md. Every policy (including the target alone, which proposes
nothing) goes through it; only the stop decision differs, and it is taken per sequence:
draft steps run batched over the sequences still proposing, a sequence whose policy stopped
waits, then the target verifies every sequence's candidates in one forward pass with
per-sequence lengths. Acceptance and cache rollback are per sequence.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.head import HeadTiming, candidate_features
from engine.multidraft import DraftPath, draft_paths, path_budget, verify_draft_paths
from engine.policies import ProposalStep
from engine.runner import ModelRunner
from engine.sampling import (
    Verdict,
    acceptance_overlap,
    emitted_logprobs,
    probs_of_processed,
    processed_logits,
    processed_probs,
    sample,
    verify,
)
from engine.sequence import KVState, Sequence
from engine.tuning import SelfTuning

# Tokens the draft cache lacks after a round: the token the target added and, when every candidate was
# accepted, the last candidate (the draft never ran on it).
ROUND_LAG = 2


@dataclass
class Proposal:
    """One sequence's candidates in the current round, and what the draft knew when it drew each."""

    seq: Sequence
    budget: int  # most candidates this round
    tokens: list[torch.Tensor] = field(default_factory=list)  # y_s, each [1], left on the device
    draft_probs: list[torch.Tensor] = field(default_factory=list)  # q_s (processed) y_s was drawn from, each [V]
    states: list[torch.Tensor] = field(default_factory=list)  # draft hidden state [H] that produced q_s
    features: list[torch.Tensor] = field(default_factory=list)  # candidate_features of y_s, each [F], where wanted
    state: torch.Tensor | None = None  # hidden state [H] of the draft's last forward
    logits: torch.Tensor | None = None  # its logits [V]: they give the next candidate
    judgements: dict[int, tuple[float, float]] = field(default_factory=dict)  # judged candidate -> (head logit, P)
    done: bool = False
    other_candidates: int = 0  # a multi-draft sequence's candidates on its other paths (engine/multidraft.py)


@dataclass
class RoundRecord:
    """One sequence's verified round, for head training data and offline evaluation (labels exact)."""

    request_id: str
    round_index: int
    states: torch.Tensor  # [K, H] draft hidden state that produced q_s
    features: torch.Tensor  # [K, F]
    accept_prob: torch.Tensor  # [K] a_s = min(1, p_s(y_s) / q_s(y_s))
    overlap: torch.Tensor  # [K] sum over the vocabulary of min(p_s, q_s)
    accepted: int  # candidates accepted in this round


def run_round(
    seqs: list[Sequence],
    target: ModelRunner,
    draft: ModelRunner | None,
    candidate_cap: int | None = None,
    max_draft_feed: int | None = None,
    recorder: Callable[[RoundRecord], None] | None = None,
    tuning: SelfTuning | None = None,
    load: int = 0,
) -> list[list[int]]:
    """One round for every sequence in `seqs`; appends their new tokens (stop conditions applied)
    and returns them, one list per sequence.

    `candidate_cap` bounds every sequence's candidates this round (the scheduler's share of a
    batch's budget); `max_draft_feed` is the chunk a lagging draft catches up by (`plan_budgets`).
    `recorder`, if given, receives every proposing sequence's verified round. `tuning`, if given,
    sets the budget and stop level of self-tuning policies and learns from the round's timings and labels,
    pricing the batch at no less than `load` (`SelfTuning.plan`).
    """
    budgets, lagging = plan_budgets(seqs, draft, candidate_cap, max_draft_feed, tuning, load)
    # A draft further behind than a round leaves it (its deferred prefill, rounds at budget 0) catches up
    # first, so that the proposal's timing, which teaches the cost model a draft step, is one.
    behind = [seq for seq, budget in zip(seqs, budgets, strict=True) if budget > 0 and draft_lag(seq) > ROUND_LAG]
    if lagging or behind:
        chunk = max_draft_feed if max_draft_feed is not None else max(draft_lag(seq) for seq in behind)
        catch_up_draft(lagging + behind, draft, chunk)
    proposals = [Proposal(seq, budget) for seq, budget in zip(seqs, budgets, strict=True)]
    groups = [with_paths(p, target, draft, candidate_cap) for p in proposals]
    rows = [row for group in groups for row in group]
    propose([p for p in rows if p.budget > 0], draft, record=recorder is not None, tuning=tuning)
    row_verdicts = verify_candidates(rows, target, recorder, tuning)  # None for draft paths: verified jointly here
    verdicts, start = [], 0
    for p, group in zip(proposals, groups, strict=True):
        verdicts.append(row_verdicts[start] if group[0] is p else verify_draft_paths(p, group))
        start += len(group)
    return [accept_and_roll_back(p, verdict) for p, verdict in zip(proposals, verdicts, strict=True)]


def with_paths(p: Proposal, target: ModelRunner, draft: ModelRunner | None, candidate_cap: int | None
               ) -> list[Proposal]:
    """The rows a proposal takes in the round: itself, or for a sequence with num_drafts M > 1 its M draft paths
    (engine/multidraft.py), verified jointly after the target's forward."""
    num_drafts = p.seq.spec.num_drafts
    budget = path_budget(p.budget, num_drafts, candidate_cap) if num_drafts > 1 else 0
    if budget == 0 or draft is None:
        return [p]
    return [Proposal(path, budget) for path in draft_paths(p.seq, target, draft)]  # type: ignore[arg-type]


# ----- budget ---------------------------------------------------------------------------------
def plan_budgets(
    seqs: list[Sequence],
    draft: ModelRunner | None,
    candidate_cap: int | None,
    max_draft_feed: int | None,
    tuning: SelfTuning | None = None,
    load: int = 0,
) -> tuple[list[int], list[Sequence]]:
    """Each sequence's candidate budget this round, and the sequences whose draft must catch up first.

    A budget is the policy's maximum, within the tokens left and `candidate_cap`; a self-tuning policy's
    is also within what the cost model says pays at this batch size (`tuning`), which sets its stop
    level for the round too. A sequence's first round runs the target alone, so its first token comes
    as soon as the target alone would give it: the draft's prefill is deferred to the rounds after, where
    the draft catches up on the prompt. It catches up the same way after rounds at budget 0 (a large
    batch): in the round's first draft forwards, or, when it lags by more than `max_draft_feed` tokens, by
    chunks of that size first (without proposing meanwhile), so catching up stalls the batch no longer
    than a prefill chunk would. A self-tuning policy catches up only where that pays (`catch_up_pays`).
    """
    maxima = [min(seq.policy.max_candidates(), seq.remaining_tokens - 1) if draft is not None and seq.output_ids
              else 0 for seq in seqs]
    if candidate_cap is not None:
        maxima = [min(m, candidate_cap) for m in maxima]
    if tuning is not None and draft is not None and any(seq.policy.self_tuning for seq in seqs):
        catch_ups = [(lag, seq.remaining_tokens) if (lag := draft_lag(seq)) > ROUND_LAG else None for seq in seqs]
        plan = tuning.plan(maxima, catch_ups, load)
        for i, seq in enumerate(seqs):
            if seq.policy.self_tuning:
                maxima[i] = plan.budgets[i]
                seq.policy.set_levels(plan.levels[i], plan.depth_levels[i], tuning.acceptance)
                seq.stats.stop_levels.append(plan.levels[i])
    budgets, lagging = [], []
    for seq, budget in zip(seqs, maxima, strict=True):
        if budget > 0 and max_draft_feed is not None and draft_lag(seq) > max_draft_feed:
            lagging.append(seq)
            budget = 0
        budgets.append(budget)
    return budgets, lagging


def draft_lag(seq: Sequence) -> int:
    """Tokens of the sequence that its draft cache lacks."""
    return len(seq.all_ids) - seq.draft_kv.cached


def catch_up_draft(seqs: list[Sequence], draft: ModelRunner, chunk: int) -> None:
    """Feed each sequence's draft cache its next `chunk` missing tokens, in one batched forward; never the
    last token, which a proposal's first forward feeds for the logits of its first candidate."""
    t0 = time.perf_counter()
    caches = [seq.draft_kv.ensure(draft) for seq in seqs]
    feeds = [seq.all_ids[seq.draft_kv.cached : min(seq.draft_kv.cached + chunk, len(seq.all_ids) - 1)]
             for seq in seqs]
    draft.hidden_batch(feeds, caches, [1] * len(seqs))
    draft.synchronize()
    elapsed = time.perf_counter() - t0
    for seq, feed in zip(seqs, feeds, strict=True):
        seq.draft_kv.cached += len(feed)
        seq.stats.draft_seconds += elapsed


# ----- propose --------------------------------------------------------------------------------
def propose(
    proposals: list[Proposal], draft: ModelRunner, record: bool = False, tuning: SelfTuning | None = None
) -> None:
    """Draft candidates for every sequence, one batched draft forward per step.

    Step s: draw y_s; every policy is asked "before" the draft runs on y_s (a stop submits y_s,
    the draft never runs on it); the rest run the draft on y_s, whose logits give y_{s+1}, and
    every policy is asked "after" (a stop submits y_{s+1}, from the forward already paid for).
    `record` keeps every candidate's features (for RoundRecord) whatever the policy; `tuning` learns
    what the proposal cost.
    """
    if not proposals:
        return
    t0 = time.perf_counter()
    for p in proposals:
        p.seq.policy.start_round()
    # The first forward feeds what the draft cache lacks (the tokens accepted last round).
    forward_draft(proposals, [p.seq.all_ids[p.seq.draft_kv.cached :] for p in proposals], draft)
    batch_sizes = [len(proposals)]
    active = proposals
    while active:
        draw(active)
        add_features([p for p in active if record or p.seq.policy.reads_features])
        for p in active:
            p.done = len(p.tokens) >= p.budget
        judge([p for p in active if not p.done], "before")
        going = [p for p in active if not p.done]
        if going:
            forward_draft(going, [p.tokens[-1] for p in going], draft)
            batch_sizes.append(len(going))
            judge(going, "after")
            free = [p for p in going if p.done]  # y_{s+1} of these comes from the forward just made
            draw(free)
            add_features(free if record else [])
        active = [p for p in active if not p.done]
    draft.synchronize()
    elapsed = time.perf_counter() - t0
    for p in proposals:
        p.seq.stats.draft_seconds += elapsed
    if tuning is not None:
        tuning.costs.observe_draft(batch_sizes, sum(len(p.tokens) for p in proposals), elapsed,
                                   featured=sum(len(p.features) for p in proposals),
                                   judged=sum(len(p.judgements) for p in proposals))


def forward_draft(proposals: list[Proposal], feeds: list, draft: ModelRunner) -> None:
    """One batched draft forward; each proposal keeps its last hidden state and logits."""
    caches = [p.seq.draft_kv.ensure(draft) for p in proposals]
    hidden, logits = draft.forward_batch(feeds, caches, [1] * len(proposals))
    for p, feed, h, row in zip(proposals, feeds, hidden, logits, strict=True):
        p.seq.draft_kv.cached += len(feed)
        p.state, p.logits = h[-1], row[-1]


def draw(proposals: list[Proposal]) -> None:
    """Sample each proposal's next candidate y_s from its draft's last logits; keep the q it came
    from and the state that produced q. q sees the history y_s follows: the output and y_1..y_{s-1}."""
    for p in proposals:
        q = processed_probs(p.seq.adjusted_logits(p.logits.unsqueeze(0), p.tokens), p.seq.params)
        p.tokens.append(sample(q, p.seq.draft_generator))
        p.draft_probs.append(q[0])
        p.states.append(p.state)


def add_features(proposals: list[Proposal]) -> None:
    """candidate_features of each proposal's latest candidate, in one batched pass over the vocabulary."""
    if not proposals:
        return
    device = proposals[0].logits.device
    features = candidate_features(
        torch.stack([p.logits for p in proposals]),
        torch.cat([p.tokens[-1] for p in proposals]),
        torch.tensor([len(p.tokens) for p in proposals], device=device),
        torch.tensor([p.seq.params.temperature for p in proposals], device=device),
        torch.tensor([p.seq.params.top_p for p in proposals], device=device),
    )
    for p, row in zip(proposals, features, strict=True):
        p.features.append(row)


def judge(proposals: list[Proposal], when: HeadTiming) -> None:
    """Ask each policy whether its round stops at its latest candidate y_s at this point; mark those that do."""
    accept_probs = head_accept_probs(proposals, when)
    for p in proposals:
        step = ProposalStep(len(p.tokens), when, p.features[-1] if p.features else None, accept_probs.get(id(p)))
        p.done = p.seq.policy.should_stop(step)


def head_accept_probs(proposals: list[Proposal], when: HeadTiming) -> dict[int, float]:
    """P(y_s accepted) by proposal id, from the heads whose timing is `when`: one batched call per head,
    each logit calibrated by its request's online calibrator (else the head's shipped calibration).
    Each judged candidate's logit and probability are kept on its proposal (`judgements`).

    Each reads the draft's latest state: "before", the one that produced q_s; "after", the forward on y_s.
    """
    groups: dict[int, list[Proposal]] = {}
    for p in proposals:
        if p.seq.head is not None and p.seq.head.timing == when:
            groups.setdefault(id(p.seq.head), []).append(p)
    accept_probs: dict[int, float] = {}
    for group in groups.values():
        head = group[0].seq.head
        with torch.inference_mode():
            logits = head(torch.stack([p.state for p in group]), torch.stack([p.features[-1] for p in group]))
        logits = logits.float().cpu()  # one device sync per head
        for p, z in zip(group, logits, strict=True):
            calibrator = p.seq.calibrator
            prob = float(calibrator.probabilities(z) if calibrator is not None else head.calibrated(z))
            p.judgements[len(p.tokens) - 1] = (float(z), prob)
            accept_probs[id(p)] = prob
    return accept_probs


# ----- verify ---------------------------------------------------------------------------------
def verify_candidates(
    proposals: list[Proposal],
    target: ModelRunner,
    recorder: Callable[[RoundRecord], None] | None = None,
    tuning: SelfTuning | None = None,
) -> list[Verdict | None]:
    """One target forward over each sequence's uncached tokens plus all its candidates, then exact
    rejection sampling per sequence (a multi-draft path's verdict is None: its sequence's paths are verified
    together, `verify_draft_paths`). p_s sees the history q_s saw; the logprobs a request asks for come
    from the same p, at no extra forward. `tuning` learns the forward's cost and every candidate's exact
    acceptance probability."""
    t0 = time.perf_counter()
    device = target.device
    caches = [p.seq.target_kv.ensure(target) for p in proposals]
    candidates = [torch.cat(p.tokens).to(device) if p.tokens else torch.zeros(0, dtype=torch.long, device=device)
                  for p in proposals]
    feeds = [torch.cat([torch.tensor(p.seq.all_ids[p.seq.target_kv.cached :], dtype=torch.long, device=device), cand])
             for p, cand in zip(proposals, candidates, strict=True)]
    _, logits = target.forward_batch(feeds, caches, [len(p.tokens) + 1 for p in proposals])
    verdicts, checked = [], []
    for p, cand, feed, rows in zip(proposals, candidates, feeds, logits, strict=True):
        p.seq.target_kv.cached += len(feed)
        # Under a layer map the LM head may sit on another GPU than the embedding: compare on the
        # embedding's device, where the candidates and the request's generator are.
        rows = rows.to(device)
        target_logits = processed_logits(p.seq.adjusted_logits(rows, p.tokens), p.seq.params)
        target_probs = probs_of_processed(target_logits, p.seq.params)
        if isinstance(p.seq, DraftPath):  # verified with its sibling paths (engine/multidraft.py)
            p.seq.target_logits, p.seq.target_probs = target_logits, target_probs
            verdicts.append(None)
            continue
        q = torch.stack(p.draft_probs).to(target_probs.device) if p.tokens else None
        verdicts.append(verify(cand, q, target_probs, p.seq.generator, p.seq.spec.over_acceptance))
        checked.append((p, cand, q, target_logits, target_probs, verdicts[-1]))
    target.synchronize()
    elapsed = time.perf_counter() - t0
    if tuning is not None:  # the forward and the rejection sampling (the cost model's `target`), not what follows
        tuning.costs.observe_target(sum(len(feed) for feed in feeds), elapsed, len(feeds))
    for p in proposals:
        p.seq.stats.target_seconds += elapsed
    for p, cand, q, target_logits, target_probs, verdict in checked:
        labels = acceptance_labels(cand, q, target_probs).tolist() if p.tokens else []
        if tuning is not None and labels and p.seq.policy.self_tuning:  # a fixed k's long rounds would bias it
            tuning.observe_acceptance(labels)
        if p.judgements:
            observe_judgements(p, labels)
        if p.seq.params.logprobs is not None:
            verdict.logprobs = emitted_logprobs(cand, verdict, target_logits, p.seq.params.logprobs)
        if recorder is not None and p.tokens:
            recorder(round_record(p, cand, q, target_probs, verdict.num_accepted))
    return verdicts


def observe_judgements(p: Proposal, labels: list[float]) -> None:
    """Compare each candidate the head judged with its exact label: the request's calibrator learns
    from them (for later rounds only), the request's stats keep predicted and realized acceptance."""
    judged = sorted(p.judgements)
    logits = [p.judgements[i][0] for i in judged]
    predicted = [p.judgements[i][1] for i in judged]
    realized = [labels[i] for i in judged]
    if p.seq.calibrator is not None:
        p.seq.calibrator.observe(logits, predicted, realized)
    p.seq.stats.record_judgements(predicted, realized)


def acceptance_labels(candidates: torch.Tensor, q: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """[K] exact a_s = min(1, p_s(y_s) / q_s(y_s)): P(y_s accepted | every earlier candidate was), known for
    every candidate once the target's p is (its forward gives p at every candidate position)."""
    idx = candidates.view(-1, 1)
    p_tok = target_probs[: len(candidates)].gather(-1, idx).squeeze(-1)
    q_tok = q.gather(-1, idx).squeeze(-1)
    return (p_tok / q_tok.clamp_min(1e-30)).clamp(max=1.0)


def round_record(
    p: Proposal, candidates: torch.Tensor, q: torch.Tensor, target_probs: torch.Tensor, accepted: int
) -> RoundRecord:
    """Exact per-candidate labels of a verified round: the target's p at every candidate position is known."""
    k = len(p.tokens)
    return RoundRecord(
        request_id=p.seq.request_id,
        round_index=p.seq.stats.rounds,
        states=torch.stack(p.states).float().cpu(),
        features=torch.stack(p.features).cpu(),
        accept_prob=acceptance_labels(candidates, q, target_probs).cpu(),
        overlap=acceptance_overlap(target_probs[:k], q).cpu(),
        accepted=accepted,
    )


# ----- accept and roll back -------------------------------------------------------------------
def accept_and_roll_back(p: Proposal, verdict: Verdict) -> list[int]:
    """Append the accepted candidates and the target's next token, left to right until a stop
    condition fires (it may cut inside the block); roll both caches back to the accepted length.
    Returns the tokens appended."""
    seq, accepted = p.seq, verdict.num_accepted
    context = len(seq.all_ids)
    drafted = torch.cat(p.tokens[:accepted]).tolist() if accepted else []  # one device sync per round
    new_tokens: list[int] = []
    for token in drafted + [verdict.next_token]:
        new_tokens.append(token)
        if seq.append_token(token):
            break
    if verdict.logprobs is not None:
        seq.add_logprobs(new_tokens, verdict.logprobs)
    seq.stats.record_round(len(p.tokens) + p.other_candidates, min(accepted, len(new_tokens)))
    seq.stats.record_verification(verdict.tested, verdict.expected_accepted, verdict.rejected)
    seq.policy.end_round(len(p.tokens), accepted)
    if seq.finished:
        seq.free_caches()
    else:
        seq.target_kv.crop(context + accepted)
        seq.draft_kv.crop(context + accepted)
    return new_tokens


# ----- prefill --------------------------------------------------------------------------------
def prefill_chunk(seq: Sequence, target: ModelRunner, chunk: int) -> bool:
    """Feed the target's cache the next `chunk` prompt tokens (all but the last); True once it holds them.

    The last prompt token goes into the first round, which runs the target alone and gives the first token.
    The draft's cache is filled after that, when the sequence first proposes (`plan_budgets`).
    """
    prompt = seq.prompt_ids[:-1]
    seq.stats.target_seconds += prefill_kv(seq.target_kv, target, prompt, chunk)
    return seq.target_kv.cached >= len(prompt)


def prefill_kv(kv: KVState, runner: ModelRunner, prompt: list[int], chunk: int) -> float:
    """Feed `kv` the next `chunk` tokens of `prompt` it lacks; returns the seconds it took."""
    cache = kv.ensure(runner)
    if kv.cached >= len(prompt):
        return 0.0
    t0 = time.perf_counter()
    end = min(len(prompt), kv.cached + chunk)
    runner.forward(torch.tensor([prompt[kv.cached : end]], dtype=torch.long), cache)
    runner.synchronize()
    kv.cached = end
    return time.perf_counter() - t0
