"""Multi-draft rounds (batch speculative decoding, Yin et al. 2024, Algorithm 4) for sequences with
`specdec.num_drafts` M > 1.

Each of the sequence's M paths stands in for the sequence in the round's shared steps (`DraftPath`): the
draft proposes for it in the same batched forwards as every other row, with a stop policy of its own, and
the target verifies it in the same forward. Its caches read the sequence's caches as a shared prefix
(`SharedPrefixCache`: packed once per forward, never written) and keep its own tokens apart, so each path
sees only itself. `verify_draft_paths` then verifies the M paths jointly (`sampling.verify_paths`), moves
the winning path's keys of the accepted tokens into the sequence's caches, and drops the other paths.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import DynamicCache

from engine.runner import ModelRunner, SharedPrefixCache
from engine.sampling import Verdict, emitted_logprobs, verify_paths
from engine.sequence import KVState, Sequence
from engine.stats import RequestStats


class DraftPath:
    """One of a sequence's draft paths, in place of the sequence for `propose` and `verify_candidates`.

    It has its own stop policy (a copy of the sequence's, taken at the start of the round), caches that read
    the sequence's as a prefix, and, for every path but the first, its own throwaway stats (the round's
    timings are booked once, through path 0). Everything else is the sequence's.
    """

    def __init__(self, seq: Sequence, index: int, target: ModelRunner, draft: ModelRunner) -> None:
        self.seq = seq
        self.policy = copy.deepcopy(seq.policy)
        self.target_kv = path_kv(seq.target_kv, target)
        self.draft_kv = path_kv(seq.draft_kv, draft)
        self.stats = seq.stats if index == 0 else RequestStats()
        self.target_logits: torch.Tensor | None = None  # [K + 1, V] processed, set by verify_candidates
        self.target_probs: torch.Tensor | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.seq, name)


def path_kv(shared: KVState, runner: ModelRunner) -> KVState:
    """A path's KV state: the sequence's cache as a read-only prefix, then a cache of the path's own."""
    return KVState(SharedPrefixCache(shared.ensure(runner), runner.new_cache()), shared.cached)


def draft_paths(seq: Sequence, target: ModelRunner, draft: ModelRunner) -> list[DraftPath]:
    return [DraftPath(seq, m, target, draft) for m in range(seq.spec.num_drafts)]


def path_budget(budget: int, num_drafts: int, candidate_cap: int | None) -> int:
    """Each path's candidate budget: the sequence's, with the scheduler's cap shared by all M paths."""
    return budget if candidate_cap is None else min(budget, candidate_cap // num_drafts)


def verify_draft_paths(proposal: Any, paths: list[Any]) -> Verdict:
    """Verify a sequence's path proposals jointly; the winner's candidates become the sequence proposal's
    (`proposal.other_candidates` counts the rest, which budgets and stats count too) and its caches' keys of
    the accepted tokens move into the sequence's caches."""
    seq = proposal.seq
    winner, verdict = verify_paths(
        [torch.cat(p.tokens) for p in paths], [torch.stack(p.draft_probs) for p in paths],
        [p.seq.target_probs for p in paths], seq.generator,
    )
    best = paths[winner]
    if seq.params.logprobs is not None:
        verdict.logprobs = emitted_logprobs(torch.cat(best.tokens), verdict, best.seq.target_logits,
                                            seq.params.logprobs)
    keep_accepted(seq, best.seq, verdict.num_accepted)
    proposal.tokens, proposal.draft_probs = best.tokens, best.draft_probs
    proposal.states, proposal.features = best.states, best.features
    proposal.other_candidates = sum(len(p.tokens) for p in paths) - len(best.tokens)
    seq.stats.accepted_paths.append(winner)
    return verdict


def keep_accepted(seq: Sequence, path: DraftPath, accepted: int) -> None:
    """Append the path's keys/values of the tokens the sequence keeps to the sequence's caches: what each cache
    lacked before the round and the accepted candidates (the draft's, as far as it ran on them)."""
    context = len(seq.all_ids)
    for shared, own in ((seq.target_kv, path.target_kv), (seq.draft_kv, path.draft_kv)):
        keep = min(context - shared.cached + accepted, own.cached - shared.cached)
        append_prefix(shared.cache, own.cache.own, keep)
        shared.cached += keep


def append_prefix(cache: DynamicCache, source: DynamicCache, length: int) -> None:
    """Append the first `length` positions of `source` to `cache`, layer by layer."""
    if length <= 0:
        return
    for layer_idx, layer in enumerate(source.layers):
        cache.update(layer.keys[:, :, :length], layer.values[:, :, :length], layer_idx)
