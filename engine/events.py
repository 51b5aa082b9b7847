"""What the engine hands back for a request: plain data that crosses process queues."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass
class TokenEvent:
    """New output of one request after one engine step."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)  # new completion tokens
    text: str = ""  # new completion text
    finished: bool = False
    finish_reason: FinishReason | None = None
    stats: dict | None = None  # RequestStats.to_dict(), on the final event
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Completion:
    """A whole completion, as returned by `LLMEngine.generate`."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    stats: dict
