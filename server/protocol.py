"""Response bodies and SSE chunks in OpenAI's shapes, built from engine events and one stats record.

Per-request speculation stats appear twice, from the same record:
  "metrics": {"speculative_decoding": {...}}  vLLM's per-request shape (vllm-project/vllm#48915), so tools
                                              that read vLLM's per-request acceptance (e.g. AIPerf) read ours
  "specdec": {...}                            our full RequestStats.to_dict() plus the SpecConfig used; its
                                              `lossless` and `over_acceptance` say whether the output follows
                                              the target's distribution

Logprobs (engine TokenLogprob, one per completion token) take OpenAI's two shapes: chat's
`logprobs.content[{token, logprob, bytes, top_logprobs}]` and the completions'
`logprobs {tokens, token_logprobs, top_logprobs, text_offset}`.
"""

from __future__ import annotations

import json
import time
from dataclasses import fields

from engine.events import TokenLogprob
from engine.params import SpecConfig
from engine.stats import RequestStats

Choice = tuple[str, str, list[TokenLogprob] | None]  # a finished choice: text, finish_reason, logprobs (if asked)
LOGPROB_FLOOR = -9999.0  # JSON has no -inf: a token the processed distribution excludes reports this (as vLLM)


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


def merged_stats(records: list[RequestStats | None], prompt_tokens: int | None = None) -> RequestStats | None:
    """One record for a request of several prompts or choices: counts and rounds add up, the timings are
    those of the whole (first token of any choice, last to finish); a single record is itself.
    `prompt_tokens`: the request's, each prompt counted once however many choices share it (OpenAI's usage)."""
    present = [r for r in records if r is not None]
    if len(present) <= 1:
        return present[0] if present else None
    out = RequestStats(policy=present[0].policy, over_acceptance=present[0].over_acceptance)
    for f in fields(RequestStats):
        if f.name not in ("policy", "over_acceptance", "first_token_seconds", "total_seconds"):
            setattr(out, f.name, sum((getattr(r, f.name) for r in present), type(getattr(out, f.name))()))
    if prompt_tokens is not None:
        out.prompt_tokens = prompt_tokens
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


def finite(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def chat_token(entry: TokenLogprob) -> dict:
    return {"token": entry.token, "logprob": finite(entry.logprob), "bytes": list(entry.token.encode("utf-8"))}


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    """Chat's `choices[].logprobs`: per token, its logprob and the `top_logprobs` most likely tokens."""
    content = [{**chat_token(e), "top_logprobs": [chat_token(t) for t in e.top]} for e in entries]
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[TokenLogprob], text_offset: int) -> dict:
    """The completions' `choices[].logprobs`, the first token at `text_offset` of the completion text.
    Each `top_logprobs` dict holds the `logprobs` most likely tokens and the sampled one (OpenAI's
    "up to logprobs+1 elements")."""
    offsets = []
    for entry in entries:
        offsets.append(text_offset)
        text_offset += len(entry.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [finite(e.logprob) for e in entries],
        "top_logprobs": [{**{t.token: finite(t.logprob) for t in e.top}, e.token: finite(e.logprob)} for e in entries],
        "text_offset": offsets,
    }


class ResponseBuilder:
    """Bodies and chunks for one request on one route ("chat" or "completion")."""

    def __init__(self, kind: str, request_id: str, model: str, spec: SpecConfig) -> None:
        self.kind = kind
        self.id = request_id
        self.model = model
        self.spec = spec
        self.created = int(time.time())
        self.text_offsets: dict[int, int] = {}  # per choice: where its next logprob entry starts in its text

    def logprobs(self, entries: list[TokenLogprob] | None, index: int = 0) -> dict | None:
        """The `logprobs` of choice `index` carrying `entries` (its next tokens); None if not asked."""
        if entries is None:
            return None
        if self.kind == "chat":
            return chat_logprobs(entries)
        offset = self.text_offsets.get(index, 0)
        self.text_offsets[index] = offset + sum(len(e.token) for e in entries)
        return completion_logprobs(entries, offset)

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, choices: list[Choice], prompt_tokens: int, stats: RequestStats | None) -> dict:
        """The whole body: one choice per (text, finish_reason, logprobs), the usage and stats of them all."""
        body = self._base("chat.completion" if self.kind == "chat" else "text_completion")
        body["choices"] = [self._choice(i, *choice) for i, choice in enumerate(choices)]
        body["usage"] = usage(prompt_tokens, stats)
        body.update(stats_fields(stats, self.spec))
        return body

    def _choice(self, index: int, text: str, finish_reason: str, logprobs: list[TokenLogprob] | None) -> dict:
        if self.kind == "chat":
            return {"index": index, "message": {"role": "assistant", "content": text},
                    "logprobs": self.logprobs(logprobs, index), "finish_reason": finish_reason}
        return {"index": index, "text": text, "logprobs": self.logprobs(logprobs, index),
                "finish_reason": finish_reason}

    def chunk(
        self, text: str | None, finish_reason: str | None = None, first: bool = False, with_usage_key: bool = False,
        index: int = 0, logprobs: list[TokenLogprob] | None = None,
    ) -> dict:
        if self.kind == "chat":
            body = self._base("chat.completion.chunk")
            delta: dict = {"role": "assistant", "content": text or ""} if first else {}
            if text and not first:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": self.logprobs(logprobs, index),
                      "finish_reason": finish_reason}
        else:
            body = self._base("text_completion")
            choice = {"index": index, "text": text or "", "logprobs": self.logprobs(logprobs, index),
                      "finish_reason": finish_reason}
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
