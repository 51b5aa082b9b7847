"""Per-request state: tokens, KV caches, policy, RNG, stop conditions and stats."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from engine.detokenizer import Detokenizer
from engine.events import FinishReason
from engine.head import AcceptanceHead
from engine.params import SamplingParams, SpecConfig
from engine.policies import StopPolicy
from engine.stats import RequestStats


@dataclass
class Sequence:
    """One request in flight.

    Cache invariant: each model's cache holds the first `*_cached` tokens of
    `prompt_ids + output_ids`; the tokens after that are fed on the next forward.
    """

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
    output_ids: list[int] = field(default_factory=list)
    target_cache: DynamicCache | None = None
    draft_cache: DynamicCache | None = None
    target_cached: int = 0
    draft_cached: int = 0
    finish_reason: FinishReason | None = None
    prefilled: bool = False  # all prompt tokens but the last are in both caches
    stats: RequestStats = field(default_factory=RequestStats)
    arrival_time: float = field(default_factory=time.perf_counter)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def remaining_tokens(self) -> int:
        return self.params.max_tokens - len(self.output_ids)

    def append_token(self, token_id: int) -> bool:
        """Append one generated token and apply EOS, stop strings and max_tokens.

        Returns True when the sequence finished on this token; nothing is appended after.
        """
        self.output_ids.append(token_id)
        if token_id in self.eos_token_ids and not self.params.ignore_eos:
            self.finish_reason = "stop"  # the EOS id is returned, its text never is
            return True
        if self.detokenizer.add(token_id):
            self.finish_reason = "stop"
            return True
        if len(self.output_ids) >= self.params.max_tokens:
            self.finish_reason = "length"
            return True
        return False

    def free_caches(self) -> None:
        self.target_cache = None
        self.draft_cache = None
        self.target_cached = 0
        self.draft_cached = 0
