"""Peers: transformers' own assisted generation (`generate(assistant_model=...)`) on the same pair.

`hf-constant` proposes exactly k tokens a round (schedule "constant", confidence stop off).
`hf-dynamic` is transformers' default dynamic speculation: up to 20 tokens a round, stopping
when the draft's probability of its token falls below `assistant_confidence_threshold`
(0.4 to start; transformers re-fits it from a ROC curve each round when scikit-learn is
installed, else it stays fixed). `hf-heuristic` is the "heuristic_transient" schedule
(k += 2 after a fully accepted round, else k -= 1, from k).

Counts are measured, not guessed: a forward hook counts the target's forward passes (the
first one includes the prompt, as in our engine), and a wrapper around
`AssistedCandidateGenerator.update_candidate_strategy` records each round's candidate
count and the number of them kept in the output (transformers passes that number after
cutting the block at EOS or max_new_tokens).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator

import torch
from transformers import PreTrainedModel
from transformers.generation.candidate_generator import AssistedCandidateGenerator

HF_POLICIES = ("hf-constant", "hf-dynamic", "hf-heuristic")
HF_DYNAMIC_MAX_TOKENS = 20  # transformers' default num_assistant_tokens
HF_DYNAMIC_THRESHOLD = 0.4  # transformers' default assistant_confidence_threshold


def assistant_settings(policy: str, knob: float | None) -> dict:
    """The assistant generation-config fields that select transformers' candidate schedule."""
    if policy == "hf-constant":
        return {"num_assistant_tokens": int(knob), "num_assistant_tokens_schedule": "constant",
                "assistant_confidence_threshold": 0.0}
    if policy == "hf-dynamic":
        return {"num_assistant_tokens": HF_DYNAMIC_MAX_TOKENS, "num_assistant_tokens_schedule": "constant",
                "assistant_confidence_threshold": float(knob if knob is not None else HF_DYNAMIC_THRESHOLD)}
    if policy == "hf-heuristic":
        return {"num_assistant_tokens": int(knob), "num_assistant_tokens_schedule": "heuristic_transient",
                "assistant_confidence_threshold": 0.0}
    raise ValueError(f"unknown peer policy {policy!r}")


class _FirstRoundTimer:
    """A transformers streamer that notes when the first round's tokens arrive, and how many.

    transformers puts the prompt first, then each round's accepted tokens.
    """

    def __init__(self) -> None:
        self.puts = 0
        self.first_round_at: float | None = None
        self.first_round_tokens = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_round_at = time.perf_counter()
            self.first_round_tokens = int(value.numel())

    def end(self) -> None:
        pass


@contextlib.contextmanager
def _record_rounds(rounds: list[tuple[int, int]]) -> Iterator[None]:
    """Record (candidates, kept) for every assisted round while the block runs."""
    original = AssistedCandidateGenerator.update_candidate_strategy

    def recording(self, input_ids, scores, num_matches):  # noqa: ANN001 - transformers' signature
        rounds.append((int(scores.shape[1]) - 1, int(num_matches)))
        return original(self, input_ids, scores, num_matches)

    AssistedCandidateGenerator.update_candidate_strategy = recording
    try:
        yield
    finally:
        AssistedCandidateGenerator.update_candidate_strategy = original


def hf_assisted_generate(
    target: PreTrainedModel,
    draft: PreTrainedModel,
    prompt_ids: list[int],
    policy: str,
    knob: float | None,
    temperature: float,
    max_tokens: int,
    seed: int,
    eos_token_ids: frozenset[int],
    pad_token_id: int | None = None,
) -> dict:
    """Run one transformers assisted generation; return stats in RequestStats.to_dict()'s field names.

    Sampling matches our engine's: plain temperature sampling (top-k/top-p and penalties off)
    or greedy, the same EOS ids, `max_tokens` new tokens. The RNG is seeded with the same
    per-prompt seed (transformers draws from torch's global generator).
    """
    saved_config = draft.generation_config
    draft.generation_config = copy.deepcopy(saved_config)
    for key, value in assistant_settings(policy, knob).items():
        setattr(draft.generation_config, key, value)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        if temperature > 0
        else {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    )
    eos = sorted(eos_token_ids)
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=target.device)
    rounds: list[tuple[int, int]] = []
    target_calls = [0]
    hook = target.register_forward_hook(lambda *_: target_calls.__setitem__(0, target_calls[0] + 1))
    timer = _FirstRoundTimer()
    torch.manual_seed(seed)
    try:
        with _record_rounds(rounds), torch.inference_mode():
            start = time.perf_counter()
            output = target.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                assistant_model=draft,
                max_new_tokens=max_tokens,
                min_new_tokens=0,
                eos_token_id=eos,
                pad_token_id=pad_token_id if pad_token_id is not None else eos[0],
                repetition_penalty=1.0,
                streamer=timer,
                **sampling,
            )
            seconds = time.perf_counter() - start
    finally:
        hook.remove()
        draft.generation_config = saved_config
    new_ids = output[0, len(prompt_ids):].tolist()
    for i, token in enumerate(new_ids):  # transformers cuts at EOS; be safe about padding after it
        if token in eos_token_ids:
            new_ids = new_ids[: i + 1]
            break
    proposed = sum(c for c, _ in rounds)
    accepted = sum(min(c, kept) for c, kept in rounds)
    finish = "stop" if new_ids and new_ids[-1] in eos_token_ids else "length"
    return {
        "policy": policy,
        "prompt_tokens": len(prompt_ids),
        "generated_tokens": len(new_ids),
        "rounds": len(rounds),
        "target_calls": target_calls[0],
        "proposed_tokens": proposed,
        "accepted_tokens": accepted,
        "discarded_tokens": proposed - accepted,
        "candidate_lengths": [c for c, _ in rounds],
        "accepted_lengths": [min(c, kept) for c, kept in rounds],
        "total_seconds": seconds,
        "first_token_seconds": None if timer.first_round_at is None else timer.first_round_at - start,
        "first_round_tokens": min(timer.first_round_tokens, len(new_ids)),
        "finish_reason": finish,
        "token_ids": new_ids,
    }
