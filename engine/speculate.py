"""One speculation round for one sequence: propose, verify, accept, roll back.

This is DESIGN.md's algorithm as one readable function. Every policy (including the
target alone, which proposes nothing) goes through it; only the stop decision differs.
"""

from __future__ import annotations

import time

import torch

from engine.policies import ProposalStep
from engine.runner import ModelRunner, crop_cache
from engine.sampling import processed_probs, raw_token_prob, sample, verify
from engine.sequence import Sequence
from heads.model import AcceptanceHead


def _ids(tokens: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([tokens], dtype=torch.long, device=device)


def propose(seq: Sequence, draft: ModelRunner, head: AcceptanceHead | None, budget: int) -> tuple[
    list[int], torch.Tensor | None
]:
    """Draft up to `budget` candidates, asking the policy after each one.

    Returns the candidate ids and their draft distributions q [K, V].
    """
    policy, params, stats = seq.policy, seq.params, seq.stats
    if seq.draft_cache is None:
        seq.draft_cache, seq.draft_cached = draft.new_cache(), 0
    ids = seq.all_ids
    policy.start_round()
    t0 = time.perf_counter()
    hidden, logits = draft.forward(_ids(ids[seq.draft_cached :], draft.device), seq.draft_cache)
    seq.draft_cached = len(ids)
    candidates: list[torch.Tensor] = []
    draft_probs: list[torch.Tensor] = []
    head_seconds = 0.0
    while True:
        last_logits = logits[:, -1]
        q = processed_probs(last_logits, params)
        token = sample(q, seq.generator)
        candidates.append(token)
        draft_probs.append(q[0])
        count = len(candidates)
        if count >= budget:
            break
        step = ProposalStep(index=count, draft_prob=1.0)
        if policy.needs_draft_prob:
            step.draft_prob = float(raw_token_prob(last_logits, token)[0])
        if policy.uses_head:
            # The forward on y_s is needed for the next proposal anyway; its hidden state feeds the head.
            hidden, logits = draft.forward(token.view(1, 1), seq.draft_cache)
            seq.draft_cached += 1
            if count > 1:  # the first candidate's factor is 1: no head call needed
                th = time.perf_counter()
                assert head is not None
                step.accept_prob = float(head.accept_prob(hidden[:, -1])[0])
                head_seconds += time.perf_counter() - th
            if policy.should_stop(step):
                break
        else:
            if policy.should_stop(step):
                break
            hidden, logits = draft.forward(token.view(1, 1), seq.draft_cache)
            seq.draft_cached += 1
    stats.draft_seconds += time.perf_counter() - t0 - head_seconds
    stats.head_seconds += head_seconds
    token_ids = [int(t) for t in torch.cat(candidates).tolist()]
    return token_ids, torch.stack(draft_probs)


def speculation_round(
    seq: Sequence, target: ModelRunner, draft: ModelRunner | None, head: AcceptanceHead | None
) -> list[int]:
    """Run one round; append the new tokens to `seq` (stop conditions applied); return them."""
    ids = seq.all_ids
    n = len(ids)
    budget = min(seq.policy.max_candidates(), seq.remaining_tokens - 1) if draft is not None else 0
    candidates: list[int] = []
    draft_probs = None
    if budget > 0:
        candidates, draft_probs = propose(seq, draft, head, budget)
    k = len(candidates)

    # Verify: one target forward over the uncached tokens plus all candidates.
    t0 = time.perf_counter()
    if seq.target_cache is None:
        seq.target_cache, seq.target_cached = target.new_cache(), 0
    feed = ids[seq.target_cached :] + candidates
    _, logits = target.forward(_ids(feed, target.device), seq.target_cache, num_logits=k + 1)
    target_probs = processed_probs(logits[0], seq.params)
    cand = torch.tensor(candidates, dtype=torch.long, device=target_probs.device)
    q = draft_probs.to(target_probs.device) if draft_probs is not None else None
    verdict = verify(cand, q, target_probs, seq.generator)
    seq.stats.target_seconds += time.perf_counter() - t0

    # Accept left to right; stop conditions may cut inside the block.
    new_tokens: list[int] = []
    for token in candidates[: verdict.num_accepted] + [verdict.next_token]:
        new_tokens.append(token)
        if seq.append_token(token):
            break
    accepted_drafts = min(verdict.num_accepted, len(new_tokens))
    seq.stats.record_round(k, accepted_drafts)
    seq.policy.end_round(k, verdict.num_accepted)

    # Roll back both caches to the accepted length.
    if seq.finished:
        seq.free_caches()
    else:
        seq.target_cached = n + verdict.num_accepted
        crop_cache(seq.target_cache, seq.target_cached)
        if seq.draft_cache is not None:
            seq.draft_cached = min(seq.draft_cached, n + verdict.num_accepted)
            crop_cache(seq.draft_cache, seq.draft_cached)
    return new_tokens
