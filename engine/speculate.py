"""One speculation round over a batch of sequences: propose, verify, accept, roll back.

This is the algorithm of docs/design.md. Every policy (including the target alone, which proposes
nothing) goes through it; only the stop decision differs, and it is taken per sequence:
draft steps run batched over the sequences still proposing, a sequence whose stop rule
fired waits, then the target verifies every sequence's candidates in one forward pass with
per-sequence lengths. Acceptance and cache rollback are per sequence.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.head import CANDIDATE_FEATURES, candidate_features
from engine.policies import ProposalStep
from engine.runner import ModelRunner, crop_cache
from engine.sampling import processed_probs, sample, verify
from engine.sequence import Sequence

LOG_Q = CANDIDATE_FEATURES.index("log_q")  # the draft's log-probability of its candidate (`confidence` reads it)


@dataclass
class Proposal:
    """One sequence's candidates in the current round, and what the draft knew when it drew each."""

    seq: Sequence
    budget: int
    tokens: list[torch.Tensor] = field(default_factory=list)  # y_s, each [1], left on the device
    draft_probs: list[torch.Tensor] = field(default_factory=list)  # q_s (processed) y_s was drawn from, each [V]
    states: list[torch.Tensor] = field(default_factory=list)  # draft hidden state [H] that produced q_s
    features: list[torch.Tensor] = field(default_factory=list)  # candidate_features of y_s, each [F]
    state: torch.Tensor | None = None  # hidden state [H] of the draft's last forward
    logits: torch.Tensor | None = None  # its logits [V]: they give the next candidate
    done: bool = False


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


def draw(proposals: list[Proposal], record: bool, judged: bool = True) -> None:
    """Sample each proposal's next candidate y_s from its draft's last logits; record it, the q it
    came from, the state that produced q, and its features where a policy will judge it (`judged`
    and the policy reads them) or `record` keeps them."""
    for p in proposals:
        q = processed_probs(p.logits.unsqueeze(0), p.seq.params)
        p.tokens.append(sample(q, p.seq.draft_generator))
        p.draft_probs.append(q[0])
        p.states.append(p.state)
    wanting = [p for p in proposals if record or (judged and p.seq.policy.needs_features)]
    if wanting:  # one batched pass over the vocabulary
        params = [p.seq.params for p in wanting]
        device = wanting[0].logits.device
        features = candidate_features(
            torch.stack([p.logits for p in wanting]),
            torch.cat([p.tokens[-1] for p in wanting]),
            torch.tensor([len(p.tokens) for p in wanting], device=device),
            torch.tensor([x.temperature for x in params], device=device),
            torch.tensor([x.top_p for x in params], device=device),
        )
        for p, row in zip(wanting, features, strict=True):
            p.features.append(row)


def judge(proposals: list[Proposal], after_forward: bool) -> None:
    """Ask each policy whether its round stops at its latest candidate y_s; mark those that do."""
    asked = [p for p in proposals if p.seq.policy.judges_after_forward == after_forward]
    heads: dict[int, list[Proposal]] = {}
    for p in asked:
        if p.seq.head is not None:
            heads.setdefault(id(p.seq.head), []).append(p)
    accept_probs: dict[int, float] = {}
    for group in heads.values():  # one batched head call per head; "after" heads read the new state
        head = group[0].seq.head
        states = torch.stack([p.state if after_forward else p.states[-1] for p in group])
        probs = head.accept_prob(states, torch.stack([p.features[-1] for p in group])).tolist()
        accept_probs.update({id(p): prob for p, prob in zip(group, probs, strict=True)})
    for p in asked:
        draft_prob = float(p.features[-1][LOG_Q].exp()) if p.features else 1.0
        step = ProposalStep(index=len(p.tokens), draft_prob=draft_prob, accept_prob=accept_probs.get(id(p)))
        if p.seq.policy.should_stop(step):
            p.done = True


def propose(proposals: list[Proposal], draft: ModelRunner, record: bool = False) -> None:
    """Draft candidates for every sequence, one batched draft forward per step.

    Step s: draw y_s; policies judging before the forward may stop there (y_s is submitted,
    the draft never runs on it); the rest run the draft on y_s, whose logits give y_{s+1};
    policies judging after that forward may stop then, submitting y_{s+1} as their last.
    `record` keeps every candidate's features (for RoundRecord) whatever the policy.
    """
    if not proposals:
        return
    t0 = time.perf_counter()
    for p in proposals:
        ensure_draft_cache(p.seq, draft)
        p.seq.policy.start_round()
    # The first forward feeds what the draft cache lacks (the tokens accepted last round).
    feeds = [p.seq.all_ids[p.seq.draft_cached :] for p in proposals]
    forward_draft(proposals, feeds, draft)
    active = list(proposals)
    while active:
        draw(active, record)
        for p in active:
            p.done = len(p.tokens) >= p.budget
        judge([p for p in active if not p.done], after_forward=False)
        going = [p for p in active if not p.done]
        if going:
            forward_draft(going, [p.tokens[-1] for p in going], draft)
            judge(going, after_forward=True)
            # Stopped after the forward on y_s: y_{s+1} comes from logits already paid for.
            draw([p for p in going if p.done], record, judged=False)
        active = [p for p in active if not p.done]
    elapsed = time.perf_counter() - t0
    for p in proposals:
        p.seq.stats.draft_seconds += elapsed


def forward_draft(proposals: list[Proposal], feeds: list, draft: ModelRunner) -> None:
    """One batched draft forward; each proposal keeps its last hidden state and logits."""
    hidden, logits = draft.forward_batch(feeds, [p.seq.draft_cache for p in proposals], [1] * len(proposals))
    for p, feed, h, row in zip(proposals, feeds, hidden, logits, strict=True):
        p.seq.draft_cached += len(feed)
        p.state, p.logits = h[-1], row[-1]


def run_round(
    seqs: list[Sequence],
    target: ModelRunner,
    draft: ModelRunner | None,
    candidate_cap: int | None = None,
    max_draft_feed: int | None = None,
    recorder: Callable[[RoundRecord], None] | None = None,
) -> list[list[int]]:
    """One round for every sequence in `seqs`; appends their new tokens (stop conditions applied)
    and returns them, one list per sequence.

    `candidate_cap` bounds every sequence's candidates this round (the scheduler's share of a
    batch's budget). At 0 (a large batch) the target decodes one token per sequence alone and
    the draft falls behind. It catches up when speculation resumes: in the first forward of the
    next proposal, or, when it lags by more than `max_draft_feed` tokens, by chunks of that size
    first (without proposing meanwhile), so catching up stalls the batch no longer than a prefill
    chunk would. `recorder`, if given, receives every proposing sequence's verified round.
    """
    proposals = []
    lagging: list[Sequence] = []
    for seq in seqs:
        budget = min(seq.policy.max_candidates(), seq.remaining_tokens - 1) if draft is not None else 0
        if candidate_cap is not None:
            budget = min(budget, candidate_cap)
        lag = draft_lag(seq) if budget > 0 else 0
        if lag > seq.remaining_tokens:
            budget = 0  # catching the draft up would cost more than speculating could save
        elif max_draft_feed is not None and lag > max_draft_feed:
            lagging.append(seq)
            budget = 0
        proposals.append(Proposal(seq, max(budget, 0)))
    if lagging:
        catch_up_draft(lagging, draft, max_draft_feed)
    propose([p for p in proposals if p.budget > 0], draft, record=recorder is not None)

    # Verify: one target forward over each sequence's uncached tokens plus all its candidates.
    t0 = time.perf_counter()
    for seq in seqs:
        if seq.target_cache is None:
            seq.target_cache, seq.target_cached = target.new_cache(), 0
    lengths = [len(seq.all_ids) for seq in seqs]
    candidates = [
        torch.cat(p.tokens).to(target.device) if p.tokens else torch.zeros(0, dtype=torch.long, device=target.device)
        for p in proposals
    ]
    feeds = [
        torch.cat([torch.tensor(seq.all_ids[seq.target_cached :], dtype=torch.long, device=target.device), cand])
        for seq, cand in zip(seqs, candidates, strict=True)
    ]
    _, logits = target.forward_batch(feeds, [s.target_cache for s in seqs], [len(p.tokens) + 1 for p in proposals])
    verdicts = []
    for p, cand, row in zip(proposals, candidates, logits, strict=True):
        target_probs = processed_probs(row, p.seq.params)
        q = torch.stack(p.draft_probs).to(target_probs.device) if p.tokens else None
        verdicts.append(verify(cand, q, target_probs, p.seq.generator))
        if recorder is not None and p.tokens:
            recorder(round_record(p, cand, q, target_probs, verdicts[-1].num_accepted))
    elapsed = time.perf_counter() - t0

    results = []
    for p, cand, verdict, n in zip(proposals, candidates, verdicts, lengths, strict=True):
        seq = p.seq
        seq.stats.target_seconds += elapsed
        # Accept left to right; stop conditions may cut inside the block (one sync per round here).
        new_tokens: list[int] = []
        for token in cand[: verdict.num_accepted].tolist() + [verdict.next_token]:
            new_tokens.append(token)
            if seq.append_token(token):
                break
        seq.stats.record_round(len(p.tokens), min(verdict.num_accepted, len(new_tokens)))
        seq.policy.end_round(len(p.tokens), verdict.num_accepted)
        # Roll back both caches to the accepted length.
        if seq.finished:
            seq.free_caches()
        else:
            seq.target_cached = n + verdict.num_accepted
            crop_cache(seq.target_cache, seq.target_cached)
            if seq.draft_cache is not None:
                seq.draft_cached = min(seq.draft_cached, n + verdict.num_accepted)
                crop_cache(seq.draft_cache, seq.draft_cached)
        results.append(new_tokens)
    return results


def round_record(
    p: Proposal, candidates: torch.Tensor, q: torch.Tensor, target_probs: torch.Tensor, accepted: int
) -> RoundRecord:
    """Exact per-candidate labels of a verified round: the target's p at every candidate position is known."""
    k = len(p.tokens)
    idx = candidates.view(-1, 1)
    p_tok, q_tok = target_probs[:k].gather(-1, idx).squeeze(-1), q.gather(-1, idx).squeeze(-1)
    return RoundRecord(
        request_id=p.seq.request_id,
        round_index=p.seq.stats.rounds,
        states=torch.stack(p.states).float().cpu(),
        features=torch.stack(p.features).cpu(),
        accept_prob=(p_tok / q_tok.clamp_min(1e-30)).clamp(max=1.0).cpu(),
        overlap=torch.minimum(target_probs[:k], q).sum(-1).cpu(),
        accepted=accepted,
    )


def draft_lag(seq: Sequence) -> int:
    """Tokens of the sequence the draft cache does not hold yet (`draft_cached` is 0 without a cache)."""
    return len(seq.prompt_ids) + len(seq.output_ids) - seq.draft_cached


def ensure_draft_cache(seq: Sequence, draft: ModelRunner) -> None:
    if seq.draft_cache is None:
        seq.draft_cache, seq.draft_cached = draft.new_cache(), 0


def catch_up_draft(seqs: list[Sequence], draft: ModelRunner, chunk: int) -> None:
    """Feed each sequence's draft cache its next `chunk` missing tokens, in one batched forward."""
    t0 = time.perf_counter()
    for seq in seqs:
        ensure_draft_cache(seq, draft)
    feeds = [seq.all_ids[seq.draft_cached : seq.draft_cached + chunk] for seq in seqs]
    draft.hidden_batch(feeds, [seq.draft_cache for seq in seqs], [1] * len(seqs))
    elapsed = time.perf_counter() - t0
    for seq, feed in zip(seqs, feeds, strict=True):
        seq.draft_cached += len(feed)
        seq.stats.draft_seconds += elapsed


def prefill_chunk(
    seq: Sequence, target: ModelRunner, draft: ModelRunner | None, chunk: int, with_draft: bool = True
) -> bool:
    """Feed the next `chunk` prompt tokens (all but the last) to the target and draft caches.

    Returns True when the prompt is prefilled; the last prompt token goes into the first round.
    `with_draft` False (speculation is off for the batch it joins) leaves the draft cache to be
    filled only if speculation resumes (`catch_up_draft`, then the first proposal).
    """
    goal = len(seq.prompt_ids) - 1
    with_draft = with_draft and draft is not None and seq.spec.speculates
    for runner, attr in ((target, "target"), (draft, "draft")):
        if runner is None or (attr == "draft" and not with_draft):
            continue
        if getattr(seq, f"{attr}_cache") is None:
            setattr(seq, f"{attr}_cache", runner.new_cache())
            setattr(seq, f"{attr}_cached", 0)
        cached = getattr(seq, f"{attr}_cached")
        if cached < goal:
            t0 = time.perf_counter()
            end = min(goal, cached + chunk)
            ids = torch.tensor([seq.prompt_ids[cached:end]], dtype=torch.long)
            runner.forward(ids, getattr(seq, f"{attr}_cache"))
            setattr(seq, f"{attr}_cached", end)
            elapsed = time.perf_counter() - t0
            if attr == "target":
                seq.stats.target_seconds += elapsed
            else:
                seq.stats.draft_seconds += elapsed
    return seq.target_cached >= goal and (not with_draft or seq.draft_cached >= goal)
