"""Logits -> processed distributions, and exact speculative rejection sampling.

Temperature, top-k and top-p are applied identically to the draft (q) and the target (p),
so the speculative output follows the target's *processed* distribution exactly.
Greedy (temperature 0) is the one-hot limit: acceptance iff the draft token equals the
target argmax, and the residual is the target argmax.
All functions keep a leading batch dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.params import SamplingParams


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Turn raw logits [..., V] into the sampling distribution [..., V] (float32)."""
    logits = logits.float()
    if params.greedy:  # one-hot in place (F.one_hot builds an int64 tensor); max() finds the first maximum
        return torch.zeros_like(logits).scatter_(-1, logits.max(-1, keepdim=True).indices, 1.0)
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sampling_cdf(probs: torch.Tensor) -> torch.Tensor:
    """The cumulative distribution `sample` inverts: [B, V] -> [B, V] float64.

    float64, because a float32 running sum over a 152k vocabulary drifts by about 1e-3 in
    total variation: the distribution sampled would not be the q that acceptance divides by.
    """
    return probs.double().cumsum(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of probs [B, V] (unnormalised is fine) -> [B] (int64), by inverting the CDF.

    One uniform per row: `torch.multinomial` draws one exponential variate per vocabulary entry
    even for a single sample; a cumulative sum and a binary search are far cheaper. Token i is
    drawn iff cdf[i-1] <= u < cdf[i], so its probability is its CDF step: exactly probs[i]
    (up to float64 rounding), and a token of probability 0 is never drawn.
    """
    cdf = sampling_cdf(probs)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)


@dataclass
class Verdict:
    """Result of verifying one sequence's candidates."""

    num_accepted: int
    next_token: int  # the correction (after a rejection) or the bonus (all accepted)


def verify(
    candidates: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
) -> Verdict:
    """Exact rejection sampling for one sequence (Leviathan et al.; Chen et al.).

    candidates [K], draft_probs [K, V] (q_i used to sample candidate i), target_probs
    [K+1, V] (p_i for the same prefixes, plus the bonus position). Accept candidate i with
    probability min(1, p_i(y_i) / q_i(y_i)); at the first rejection sample from
    norm(max(0, p_i - q_i)); if all K pass, sample the bonus from p_{K+1}.
    """
    k = candidates.shape[0]
    if k == 0:
        return Verdict(0, int(sample(target_probs[:1], generator)[0]))
    idx = candidates.unsqueeze(-1)
    p_tok = target_probs[:k].gather(-1, idx).squeeze(-1)
    q_tok = draft_probs.gather(-1, idx).squeeze(-1)
    u = torch.rand(k, generator=generator, device=candidates.device)
    # u * q < p  <=>  u < p / q, without dividing by a zero q.
    rejected = ~(u * q_tok < p_tok)
    num_accepted = int(rejected.int().argmax()) if bool(rejected.any()) else k
    if num_accepted == k:
        return Verdict(k, int(sample(target_probs[k : k + 1], generator)[0]))
    residual = (target_probs[num_accepted] - draft_probs[num_accepted]).clamp_min(0.0)
    total = residual.sum()
    if float(total) <= 0.0:  # p == q exactly: cannot reject, but guard against rounding
        residual = target_probs[num_accepted]
    return Verdict(num_accepted, int(sample(residual.unsqueeze(0), generator)[0]))
