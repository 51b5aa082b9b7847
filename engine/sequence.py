"""Per-request state: tokens, KV caches, policy, RNG, logit adjustments, stop conditions, logprobs and stats."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from engine.calibration import OnlineCalibrator
from engine.detokenizer import Detokenizer
from engine.events import FinishReason, TokenLogprob
from engine.grammar import GrammarConstraint
from engine.head import AcceptanceHead
from engine.params import SamplingParams, SpecConfig
from engine.policies import StopPolicy
from engine.runner import ModelRunner, crop_cache
from engine.sampling import LogitAdjuster, TokenLogprobs
from engine.stats import RequestStats


@dataclass
class KVState:
    """One model's KV cache of a sequence: it holds the first `cached` tokens of
    `prompt_ids + output_ids` (0 while there is no cache); the tokens after those are fed on that
    model's next forward."""

    cache: DynamicCache | None = None  # None until the model first runs on the sequence
    cached: int = 0

    def ensure(self, runner: ModelRunner) -> DynamicCache:
        """The cache, made empty on first use."""
        if self.cache is None:
            self.cache, self.cached = runner.new_cache(), 0
        return self.cache

    def crop(self, length: int) -> None:
        """Roll back to the first `length` tokens (keeping fewer if it holds fewer)."""
        self.cached = min(self.cached, length)
        if self.cache is not None:
            crop_cache(self.cache, self.cached)

    def free(self) -> None:
        self.cache, self.cached = None, 0

    def copy_into(self, other: KVState, runner: ModelRunner) -> None:
        """Give `other` a copy of everything this state holds (a sibling choice forking the prompt's prefill):
        its own tensors, so each rolls back on its own."""
        if self.cache is None or self.cached == 0:
            return
        cache = runner.new_cache()
        for layer_idx, layer in enumerate(self.cache.layers):
            cache.update(layer.keys[:, :, : self.cached], layer.values[:, :, : self.cached], layer_idx)  # cat copies
        other.cache, other.cached = cache, self.cached


@dataclass
class Sequence:
    """One request in flight, with a KV state per model (`target_kv`, `draft_kv`)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    spec: SpecConfig
    policy: StopPolicy
    detokenizer: Detokenizer
    generator: torch.Generator  # on the target's device: verification
    draft_generator: torch.Generator  # on the draft's device: proposals (the same object when co-located)
    eos_token_ids: frozenset[int]
    head: AcceptanceHead | None = None  # the acceptance head judging this request's candidates (specdec++)
    calibrator: OnlineCalibrator | None = None  # its logit -> P(accept), learned online (else its shipped one)
    output_ids: list[int] = field(default_factory=list)
    target_kv: KVState = field(default_factory=KVState)
    draft_kv: KVState = field(default_factory=KVState)
    finish_reason: FinishReason | None = None
    prefilled: bool = False  # the prompt but its last token is in the target's cache (the draft's fills later)
    stats: RequestStats = field(default_factory=RequestStats)
    arrival_time: float = field(default_factory=time.perf_counter)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)  # one per output token, when asked for
    # the other choices of the same prompt (n > 1), waiting to fork this sequence's prefill once it is done
    siblings: list[Sequence] = field(default_factory=list)
    grammar: GrammarConstraint | None = None  # structured output (engine/grammar.py); None when not asked for
    adjuster: LogitAdjuster | None = field(init=False)  # penalties, bias, min_tokens; None when none is set

    def __post_init__(self) -> None:
        self.adjuster = LogitAdjuster.for_request(self.params, self.prompt_ids, self.eos_token_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining_tokens(self) -> int:
        return self.params.max_tokens - len(self.output_ids)

    def adjusted_logits(self, logits: torch.Tensor, drafted: list[torch.Tensor]) -> torch.Tensor:
        """Raw logits [R, V] of R consecutive positions, the last after the output and all of `drafted`,
        with the request's penalties, bias and min_tokens applied (`LogitAdjuster.apply`), then its grammar
        (`GrammarConstraint.apply`)."""
        if self.adjuster is not None:
            logits = self.adjuster.apply(logits, self.output_ids, drafted)
        if self.grammar is not None:
            logits = self.grammar.apply(logits, self.output_ids, drafted)
        return logits

    def append_token(self, token_id: int) -> bool:
        """Append one generated token and apply EOS, stop_token_ids, stop strings and max_tokens.

        Returns True when the sequence finished on this token; nothing is appended after.
        """
        self.output_ids.append(token_id)
        ends = token_id in self.params.stop_token_ids or (token_id in self.eos_token_ids and not self.params.ignore_eos)
        if ends:
            self.finish_reason = "stop"  # the id is returned, its text never is
            return True
        if self.detokenizer.add(token_id):
            self.finish_reason = "stop"
            return True
        if len(self.output_ids) >= self.params.max_tokens:
            self.finish_reason = "length"
            return True
        return False

    def add_logprobs(self, tokens: list[int], logprobs: TokenLogprobs) -> None:
        """Keep the logprobs of `tokens`, just appended (row i of `logprobs` is token i's position), with
        every token's text, decoded alone."""
        ids = list(dict.fromkeys(tokens + [t for row in logprobs.top_ids[: len(tokens)] for t in row]))
        texts = dict(zip(ids, self.detokenizer.tokenizer.batch_decode([[t] for t in ids]), strict=True))
        for i, token in enumerate(tokens):
            top = [TokenLogprob(t, texts[t], lp)
                   for t, lp in zip(logprobs.top_ids[i], logprobs.top_logprobs[i], strict=True)]
            self.output_logprobs.append(TokenLogprob(token, texts[token], logprobs.logprobs[i], top))

    def logprobs_of_last(self, count: int) -> list[TokenLogprob] | None:
        """The logprobs of the last `count` output tokens; None when the request did not ask for logprobs."""
        if self.params.logprobs is None:
            return None
        return self.output_logprobs[len(self.output_logprobs) - count :]

    def fork_prefill(self, sibling: Sequence, target: ModelRunner, draft: ModelRunner | None) -> None:
        """Hand `sibling` (same prompt, nothing cached yet) copies of this sequence's prefilled caches,
        instead of prefilling it again."""
        self.target_kv.copy_into(sibling.target_kv, target)
        if draft is not None:
            self.draft_kv.copy_into(sibling.draft_kv, draft)
        sibling.prefilled = True

    def free_caches(self) -> None:
        self.target_kv.free()
        self.draft_kv.free()
