"""Response bodies and SSE chunks in OpenAI's shapes, built from engine events and one stats record.

Per-request speculation stats appear twice, from the same record:
  "metrics": {"speculative_decoding": {...}}  vLLM's per-request shape (vllm-project/vllm#48915), so tools
                                              that read vLLM's per-request acceptance (e.g. AIPerf) read ours
  "specdec": {...}                            our full RequestStats.to_dict() plus the SpecConfig used
"""

from __future__ import annotations

import json
import time
from dataclasses import fields

from engine.params import SpecConfig
from engine.stats import RequestStats


def speculative_decoding(stats: RequestStats) -> dict:
    """vLLM's `metrics.speculative_decoding` for one request.

    A spec step is a round that proposed at least one token. `num_spec_tokens` is the
    longest candidate block this request used (the policy's k for `constant`).
    """
    steps = [(c, a) for c, a in zip(stats.candidate_lengths, stats.accepted_lengths, strict=True) if c > 0]
    drafted = sum(c for c, _ in steps)
    accepted = sum(a for _, a in steps)
    num_spec_tokens = max((c for c, _ in steps), default=0)
    histogram = [0] * (num_spec_tokens + 1)
    for _, a in steps:
        histogram[a] += 1
    return {
        "mean_acceptance_length": 1.0 + accepted / len(steps) if steps else 1.0,
        "draft_acceptance_rate": accepted / drafted if drafted else 0.0,
        "acceptance_histogram": histogram,
        "num_spec_steps": len(steps),
        "num_accepted_draft_tokens": accepted,
        "num_draft_tokens": drafted,
        "num_spec_tokens": num_spec_tokens,
    }


def usage(prompt_tokens: int, stats: RequestStats | None) -> dict:
    completion = stats.generated_tokens if stats else 0
    prompt = stats.prompt_tokens if stats and stats.prompt_tokens else prompt_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def merged_stats(records: list[RequestStats | None]) -> RequestStats | None:
    """One record for a request of several prompts: counts and rounds add up, the timings are those
    of the whole (first token of any prompt, last to finish); a single record is itself."""
    present = [r for r in records if r is not None]
    if len(present) <= 1:
        return present[0] if present else None
    out = RequestStats(policy=present[0].policy)
    for f in fields(RequestStats):
        if f.name not in ("policy", "first_token_seconds", "total_seconds"):
            setattr(out, f.name, sum((getattr(r, f.name) for r in present), type(getattr(out, f.name))()))
    firsts = [r.first_token_seconds for r in present if r.first_token_seconds is not None]
    out.first_token_seconds = min(firsts) if firsts else None
    out.total_seconds = max(r.total_seconds for r in present)
    return out


def stats_fields(stats: RequestStats | None, spec: SpecConfig) -> dict:
    """The `metrics` and `specdec` keys of a final response or chunk."""
    if stats is None:
        return {}
    return {"metrics": {"speculative_decoding": speculative_decoding(stats)},
            "specdec": {**stats.to_dict(), "config": spec.model_dump()}}


class ResponseBuilder:
    """Bodies and chunks for one request on one route ("chat" or "completion")."""

    def __init__(self, kind: str, request_id: str, model: str, spec: SpecConfig) -> None:
        self.kind = kind
        self.id = request_id
        self.model = model
        self.spec = spec
        self.created = int(time.time())

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, choices: list[tuple[str, str]], prompt_tokens: int, stats: RequestStats | None) -> dict:
        """The whole body: one choice per (text, finish_reason), the usage and stats of them all."""
        body = self._base("chat.completion" if self.kind == "chat" else "text_completion")
        body["choices"] = [self._choice(i, text, reason) for i, (text, reason) in enumerate(choices)]
        body["usage"] = usage(prompt_tokens, stats)
        body.update(stats_fields(stats, self.spec))
        return body

    def _choice(self, index: int, text: str, finish_reason: str) -> dict:
        if self.kind == "chat":
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish_reason}
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def chunk(
        self, text: str | None, finish_reason: str | None = None, first: bool = False, with_usage_key: bool = False,
        index: int = 0,
    ) -> dict:
        if self.kind == "chat":
            body = self._base("chat.completion.chunk")
            delta: dict = {"role": "assistant", "content": text or ""} if first else {}
            if text and not first:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            body = self._base("text_completion")
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        body["choices"] = [choice]
        if with_usage_key:
            body["usage"] = None
        return body

    def usage_chunk(self, prompt_tokens: int, stats: RequestStats | None) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        body = self._base(obj)
        body["choices"] = []
        body["usage"] = usage(prompt_tokens, stats)
        body.update(stats_fields(stats, self.spec))
        return body


def sse(data: dict | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"
