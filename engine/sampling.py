"""Logits -> processed distributions, and exact speculative rejection sampling.

A request's processing is the same for the draft (q) and the target (p), so the speculative
output follows the target's *processed* distribution exactly. It has two stages:
1. `LogitAdjuster`: penalties, logit bias and min_tokens, which depend on the tokens so far. At a
   candidate position the history includes the candidates before it, for q and p alike.
2. `processed_logits`: temperature, top-k and top-p.
Greedy (temperature 0) is the one-hot limit: acceptance iff the draft token equals the
target argmax, and the residual is the target argmax.
All functions keep a leading batch dimension.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

from engine.params import SamplingParams


class LogitAdjuster:
    """One request's penalties, logit bias and min_tokens, applied to raw logits (vLLM's semantics, in its order).

    - logit_bias: added to the logits by token id;
    - min_tokens: the EOS ids (unless ignore_eos) and stop_token_ids get -inf while fewer tokens are generated;
    - repetition_penalty: a token of the prompt or the output has its logit divided by it when positive,
      multiplied when not;
    - frequency and presence penalties: minus frequency * count + presence * (count > 0) over generated tokens.

    Built only for a request that sets one of them (`for_request`): the others pay nothing.
    """

    def __init__(self, params: SamplingParams, prompt_ids: list[int], eos_token_ids: Collection[int]) -> None:
        self.params = params
        self.prompt_ids = prompt_ids
        ends = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self.min_tokens_masked = sorted(ends)
        self._vectors: dict[tuple[str, torch.device], torch.Tensor] = {}  # the bias and the prompt mask, per device
        self._counts: dict[torch.device, tuple[int, torch.Tensor]] = {}  # per device: (tokens counted, counts)

    @classmethod
    def for_request(
        cls, params: SamplingParams, prompt_ids: list[int], eos_token_ids: Collection[int]
    ) -> LogitAdjuster | None:
        return cls(params, prompt_ids, eos_token_ids) if params.adjusts_logits else None

    def apply(self, logits: torch.Tensor, output_ids: list[int], drafted: list[torch.Tensor]) -> torch.Tensor:
        """Adjust the logits [R, V] of R consecutive positions. The last row follows `output_ids` and all of
        `drafted` (candidates, each [1]); each row before it follows one candidate fewer."""
        params, (rows, vocab), device = self.params, logits.shape, logits.device
        start = len(drafted) - rows + 1  # the candidates every row follows
        logits = logits.float().clone()
        if params.logit_bias:
            logits += self._vector("bias", device, lambda: bias_vector(params.logit_bias, vocab, device))
        blocked = min(rows, params.min_tokens - len(output_ids) - start)  # rows before min_tokens is reached
        if blocked > 0 and self.min_tokens_masked:
            logits[:blocked, self.min_tokens_masked] = float("-inf")
        if params.repetition_penalty == 1.0 and not params.frequency_penalty and not params.presence_penalty:
            return logits
        counts = history_counts(self._output_counts(output_ids, vocab, device), drafted, rows)
        if params.repetition_penalty != 1.0:
            in_prompt = self._vector("prompt", device, lambda: token_mask(self.prompt_ids, vocab, device))
            seen = in_prompt | (counts > 0)
            penalty = torch.where(seen, params.repetition_penalty, 1.0)
            logits = torch.where(logits > 0, logits / penalty, logits * penalty)
        return logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()

    def _vector(self, name: str, device: torch.device, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One of the request's constant vectors on `device`, built on first use."""
        if (name, device) not in self._vectors:
            self._vectors[(name, device)] = build()
        return self._vectors[(name, device)]

    def _output_counts(self, output_ids: list[int], vocab: int, device: torch.device) -> torch.Tensor:
        """How often each token occurs in `output_ids` [V] (float32). The output only grows, so each
        token is counted once, when first seen."""
        counted, counts = self._counts.get(device, (0, None))
        if counts is None:
            counts = torch.zeros(vocab, device=device)
        if counted < len(output_ids):
            new = torch.tensor(output_ids[counted:], dtype=torch.long, device=device)
            counts = counts.index_add(0, new, torch.ones(len(new), device=device))
            self._counts[device] = (len(output_ids), counts)
        return counts


def bias_vector(logit_bias: dict[int, float], vocab: int, device: torch.device) -> torch.Tensor:
    """The logit bias as a vector [V] (float32)."""
    ids = torch.tensor(list(logit_bias), dtype=torch.long, device=device)
    values = torch.tensor(list(logit_bias.values()), dtype=torch.float32, device=device)
    return torch.zeros(vocab, device=device).index_put_((ids,), values)


def token_mask(token_ids: list[int], vocab: int, device: torch.device) -> torch.Tensor:
    """Which tokens occur in `token_ids`, as a vector [V] (bool)."""
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    mask[torch.tensor(token_ids, dtype=torch.long, device=device)] = True
    return mask


def history_counts(output_counts: torch.Tensor, drafted: list[torch.Tensor], rows: int) -> torch.Tensor:
    """Token counts [rows, V] of rows consecutive positions: the last follows all of `drafted`, each row
    before it one candidate fewer (the rule of `LogitAdjuster.apply`)."""
    counts = output_counts.unsqueeze(0).repeat(rows, 1)
    if drafted:
        device = counts.device
        tokens = torch.cat(drafted).to(device)
        start = len(tokens) - rows + 1
        follows = torch.arange(len(tokens), device=device) < start + torch.arange(rows, device=device)[:, None]
        counts.scatter_add_(1, tokens.expand(rows, -1), follows.float())  # row r counts candidates [0, start + r)
    return counts


def processed_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p on logits [..., V] (float32; filtered entries are -inf).

    Greedy leaves them as they are: its distribution is the one-hot of their argmax (`processed_probs`).
    """
    logits = logits.float()
    if params.greedy:
        return logits
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
    return logits


def probs_of_processed(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampling distribution [..., V] of `processed_logits`."""
    if params.greedy:  # one-hot in place (F.one_hot builds an int64 tensor); max() finds the first maximum
        return torch.zeros_like(logits).scatter_(-1, logits.max(-1, keepdim=True).indices, 1.0)
    return logits.softmax(-1)


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Turn (adjusted) logits [..., V] into the sampling distribution [..., V] (float32)."""
    return probs_of_processed(processed_logits(logits, params), params)


@dataclass
class TokenLogprobs:
    """Log-probabilities of emitted tokens under the target's processed distribution, as plain lists."""

    logprobs: list[float]  # of each emitted token
    top_ids: list[list[int]]  # per token, the `top` most likely ids, most likely first
    top_logprobs: list[list[float]]


def token_logprobs(processed: torch.Tensor, tokens: list[int], top: int) -> TokenLogprobs:
    """Log-probabilities of `tokens` (one per row of `processed_logits` [R, V]) and each row's `top` alternatives.

    Sampling: log p, p being the distribution the token was drawn from. Greedy: the log-softmax of the
    (adjusted) logits at temperature 1, since its one-hot distribution carries no information.
    """
    logprobs = processed.log_softmax(-1)
    chosen = logprobs.gather(-1, torch.tensor(tokens, device=logprobs.device).unsqueeze(-1)).squeeze(-1)
    values, ids = logprobs.topk(top, dim=-1) if top else (logprobs[:, :0], logprobs[:, :0].long())
    return TokenLogprobs(chosen.tolist(), ids.tolist(), values.tolist())


def emitted_logprobs(
    candidates: torch.Tensor, verdict: Verdict, target_logits: torch.Tensor, top: int
) -> TokenLogprobs:
    """Logprobs of the tokens a verdict emits, the accepted candidates and the next token, from the processed
    target logits of their positions (rows 0..num_accepted)."""
    accepted = verdict.num_accepted
    tokens = candidates[:accepted].tolist() + [verdict.next_token]
    return token_logprobs(target_logits[: accepted + 1], tokens, top)


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
    logprobs: TokenLogprobs | None = None  # of the accepted candidates and the next token, when the request asks
    # The acceptance test ran at `tested` positions (the accepted ones and the rejected one, if any); its
    # probability of passing, summed over them, is `expected_accepted` (`acceptance_overlap`).
    tested: int = 0
    expected_accepted: float = 0.0

    @property
    def rejected(self) -> bool:
        return self.num_accepted < self.tested


def acceptance_overlap(target_probs: torch.Tensor, draft_probs: torch.Tensor, over_acceptance: float = 0.0
                       ) -> torch.Tensor:
    """P(the acceptance test passes) at each position [..., V] -> [...]: sum_v min(q(v), p(v) + epsilon).

    At epsilon 0 this is the overlap sum_v min(p, q) = 1 - TV(p, q): summed over the tested positions,
    1 minus it is the expected number of rejections (Yin et al. 2024, Theorem 1).
    """
    return torch.minimum(draft_probs, target_probs + over_acceptance).sum(-1)


def verify(
    candidates: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
    over_acceptance: float = 0.0,
) -> Verdict:
    """Exact rejection sampling for one sequence (Leviathan et al.; Chen et al.).

    candidates [K], draft_probs [K, V] (q_i used to sample candidate i), target_probs
    [K+1, V] (p_i for the same prefixes, plus the bonus position). Accept candidate i with
    probability min(1, p_i(y_i) / q_i(y_i)); at the first rejection sample from
    norm(max(0, p_i - q_i)); if all K pass, sample the bonus from p_{K+1}.

    `over_acceptance` epsilon > 0 accepts with min(1, (p_i(y_i) + epsilon) / q_i(y_i)) instead: lossy, with
    the least bias for its rejections (`over_acceptance_output`). The residual stays norm(max(0, p_i - q_i)),
    which is the Pareto-optimal one: every position where p > q is accepted surely either way.
    """
    k = candidates.shape[0]
    if k == 0:
        return Verdict(0, int(sample(target_probs[:1], generator)[0]))
    idx = candidates.unsqueeze(-1)
    p_tok = target_probs[:k].gather(-1, idx).squeeze(-1)
    q_tok = draft_probs.gather(-1, idx).squeeze(-1)
    u = torch.rand(k, generator=generator, device=candidates.device)
    # u * q < p  <=>  u < p / q, without dividing by a zero q.
    rejected = ~(u * q_tok < p_tok + over_acceptance)
    num_accepted = int(rejected.int().argmax()) if bool(rejected.any()) else k
    tested = min(num_accepted + 1, k)
    expected = float(acceptance_overlap(target_probs[:tested], draft_probs[:tested], over_acceptance).sum())
    if num_accepted == k:
        return Verdict(k, int(sample(target_probs[k : k + 1], generator)[0]), tested=tested,
                       expected_accepted=expected)
    return Verdict(num_accepted, int(sample(residual_of(target_probs[num_accepted], draft_probs[num_accepted]),
                                            generator)[0]), tested=tested, expected_accepted=expected)


def residual_of(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """What to draw from after a rejection, [V] -> [1, V] (unnormalised): max(0, p - q), or p where
    rounding left nothing (p == q cannot reject, but guard against it)."""
    residual = (target_probs - draft_probs).clamp_min(0.0)
    if float(residual.sum()) <= 0.0:
        residual = target_probs
    return residual.unsqueeze(0)


def over_acceptance_output(target_probs: torch.Tensor, draft_probs: torch.Tensor, over_acceptance: float
                           ) -> tuple[torch.Tensor, float]:
    """The exact output distribution [V] of one position verified with over-acceptance epsilon, and its
    rejection probability: accepted mass min(q, p + epsilon), plus the rejection probability times the
    residual norm(max(0, p - q)).

    Its bias TV(output, p) is sum_v max(0, min(q, p + epsilon) - p) = sum_v min(max(0, q - p), epsilon), and
    bias + rejection = TV(p, q): it lies on the Pareto front of Yin et al. 2024 (the least bias any
    rejection-based rule can have at its rejection probability).
    """
    accepted = torch.minimum(draft_probs, target_probs + over_acceptance)
    rejection = float(1.0 - accepted.sum())
    residual = (target_probs - draft_probs).clamp_min(0.0)
    mass = float(residual.sum())
    return accepted + (rejection / mass * residual if mass > 0 else 0.0), max(rejection, 0.0)


def verify_paths(
    paths: list[torch.Tensor],
    draft_probs: list[torch.Tensor],
    target_probs: list[torch.Tensor],
    generator: torch.Generator | None,
) -> tuple[int, Verdict]:
    """Batch speculative decoding (Yin et al. 2024, Algorithm 4): M candidate paths drawn independently from
    the draft, verified position by position. Returns the winning path and the verdict.

    Path m: candidates [K_m], the q it drew each from [K_m, V], the target's p at the same prefixes plus the
    bonus position [K_m + 1, V]. At position i the paths that agree with the accepted prefix are tried in
    order: path m's token y is accepted with probability min(1, r(y) / q_m(y)), where r starts as p_i and
    after each rejection becomes norm(max(0, r - q_m)). The first acceptance extends the prefix (the paths
    with another token drop out); if every path rejects, the next token is drawn from the last r; if every
    agreeing path ran out, the bonus is drawn from p after it. Given that the untried paths' tokens are
    independent draws from q, each step is exact rejection sampling of r, so the output follows p exactly,
    and a rejection needs every path to reject: P = prod_j (1 - sum_v min(r_j, q)).
    """
    tokens = [t.tolist() for t in paths]
    agreeing, accepted, tested, expected = list(range(len(paths))), 0, 0, 0.0
    while True:
        alive = [m for m in agreeing if len(tokens[m]) > accepted]
        if not alive:  # every agreeing path was accepted to its end: the bonus
            winner = agreeing[0]
            bonus = sample(target_probs[winner][accepted : accepted + 1], generator)
            return winner, Verdict(accepted, int(bonus[0]), tested=tested, expected_accepted=expected)
        residual, chosen, all_reject = target_probs[alive[0]][accepted], None, 1.0
        for m in alive:  # the chain of residuals runs over every alive path, for the expected acceptance
            q = draft_probs[m][accepted]
            if chosen is None:
                y = tokens[m][accepted]
                u = float(torch.rand((), generator=generator, device=q.device))
                chosen = y if u * float(q[y]) < float(residual[y]) else None
            all_reject *= 1.0 - min(float(acceptance_overlap(residual, q)), 1.0)
            residual = residual_of(residual, q)[0]
            residual = residual / residual.sum()
        tested, expected = tested + 1, expected + 1.0 - all_reject
        if chosen is None:  # every path rejected: the correction comes from the last residual
            correction = sample(residual.unsqueeze(0), generator)
            return alive[0], Verdict(accepted, int(correction[0]), tested=tested, expected_accepted=expected)
        agreeing = [m for m in alive if tokens[m][accepted] == chosen]
        accepted += 1
