"""One speculation round over a batch of sequences: propose, verify, accept, roll back.

This is DESIGN.md's algorithm. Every policy (including the target alone, which proposes
nothing) goes through it; only the stop decision differs, and it is taken per sequence:
draft steps run batched over the sequences still proposing, a sequence whose stop rule
fired waits, then the target verifies every sequence's candidates in one forward pass with
per-sequence lengths. Acceptance and cache rollback are per sequence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from engine.policies import ProposalStep
from engine.runner import ModelRunner, crop_cache
from engine.sampling import processed_probs, raw_token_prob, sample, verify
from engine.sequence import Sequence
from heads.model import AcceptanceHead, draft_stats


@dataclass
class Proposal:
    """One sequence's candidates in the current round."""

    seq: Sequence
    budget: int
    tokens: list[torch.Tensor] = field(default_factory=list)  # each [1], left on the device
    draft_probs: list[torch.Tensor] = field(default_factory=list)  # q_i, each [V]
    last_logits: torch.Tensor | None = None  # draft logits [V] for the next proposal
    done: bool = False


def draw(p: Proposal) -> torch.Tensor:
    """Sample the next candidate from the draft's last logits; record it and the q it came from."""
    q = processed_probs(p.last_logits.unsqueeze(0), p.seq.params)
    token = sample(q, p.seq.draft_generator)
    p.tokens.append(token)
    p.draft_probs.append(q[0])
    return token


def propose(proposals: list[Proposal], draft: ModelRunner, head: AcceptanceHead | None) -> None:
    """Draft candidates for every sequence, batching the draft forwards across sequences."""
    if not proposals:
        return
    t0 = time.perf_counter()
    head_seconds = 0.0
    for p in proposals:
        ensure_draft_cache(p.seq, draft)
        p.seq.policy.start_round()
    feeds = [p.seq.all_ids[p.seq.draft_cached :] for p in proposals]
    _, logits = draft.forward_batch(feeds, [p.seq.draft_cache for p in proposals], [1] * len(proposals))
    for p, row in zip(proposals, logits, strict=True):
        p.seq.draft_cached = len(p.seq.all_ids)
        p.last_logits = row[-1]
    active = list(proposals)
    while active:
        forward: list[tuple[Proposal, ProposalStep]] = []
        for p in active:
            policy = p.seq.policy
            token = draw(p)
            step = ProposalStep(index=len(p.tokens), draft_prob=1.0)
            if len(p.tokens) >= p.budget:
                p.done = True
                continue
            if policy.needs_draft_prob:
                step.draft_prob = float(raw_token_prob(p.last_logits.unsqueeze(0), token)[0])
            if not policy.uses_head and policy.should_stop(step):
                p.done = True
                continue
            forward.append((p, step))
        if forward:
            # The forward on y_s is needed for the next proposal anyway; its hidden state feeds the head.
            hidden = draft.hidden_batch(
                [p.tokens[-1] for p, _ in forward], [p.seq.draft_cache for p, _ in forward], [1] * len(forward)
            )
            asking = [i for i, (p, step) in enumerate(forward) if p.seq.policy.uses_head and step.index > 1]
            if asking:
                assert head is not None
                th = time.perf_counter()
                stats = None
                if head.uses_draft_stats:  # heads trained with the draft's view of y_s (heads/model.py)
                    stats = draft_stats(
                        torch.stack([forward[i][0].last_logits for i in asking]),
                        torch.cat([forward[i][0].tokens[-1] for i in asking]),
                    )
                probs = head.accept_prob(torch.stack([hidden[i][-1] for i in asking]), stats).tolist()
                head_seconds += time.perf_counter() - th
                for i, prob in zip(asking, probs, strict=True):
                    forward[i][1].accept_prob = prob
            going_on, final = [], []
            for i, (p, step) in enumerate(forward):
                p.seq.draft_cached += 1
                if p.seq.policy.uses_head and p.seq.policy.should_stop(step):
                    p.done = True  # y_s is in the draft cache
                    if p.seq.spec.free_final_token and len(p.tokens) < p.budget:
                        final.append(i)  # the forward on y_s is paid for: its logits give y_{s+1}
                else:
                    going_on.append(i)
            if going_on or final:
                rows = going_on + final
                logits = draft.logits(torch.stack([hidden[i][-1] for i in rows]))
                for i, row in zip(rows, logits, strict=True):
                    forward[i][0].last_logits = row
                for i in final:
                    draw(forward[i][0])
        active = [p for p in active if not p.done]
    elapsed = time.perf_counter() - t0
    for p in proposals:
        p.seq.stats.draft_seconds += elapsed - head_seconds
        p.seq.stats.head_seconds += head_seconds


def run_round(
    seqs: list[Sequence],
    target: ModelRunner,
    draft: ModelRunner | None,
    head: AcceptanceHead | None,
    candidate_cap: int | None = None,
    max_draft_feed: int | None = None,
) -> list[list[int]]:
    """One round for every sequence in `seqs`; appends their new tokens (stop conditions applied)
    and returns them, one list per sequence.

    `candidate_cap` bounds every sequence's candidates this round (the scheduler's share of a
    batch's budget). At 0 (a large batch) the target decodes one token per sequence alone and
    the draft falls behind. It catches up when speculation resumes: in the first forward of the
    next proposal, or, when it lags by more than `max_draft_feed` tokens, by chunks of that size
    first (without proposing meanwhile), so catching up stalls the batch no longer than a prefill
    chunk would.
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
    propose([p for p in proposals if p.budget > 0], draft, head)

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


def speculation_round(
    seq: Sequence, target: ModelRunner, draft: ModelRunner | None, head: AcceptanceHead | None
) -> list[int]:
    """One round for a single sequence."""
    return run_round([seq], target, draft, head)[0]


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
