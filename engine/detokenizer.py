"""Incremental detokenization with exact stop strings.

Text is never emitted past a stop string: a suffix that could still grow into one is
held back, as is an incomplete UTF-8 character at the end.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class Detokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of `text` already handed out
        self._searched = 0  # stop strings cannot start before this index
        self._max_stop = max((len(s) for s in stop), default=0)

    def add(self, token_id: int) -> bool:
        """Append one token; True when a stop string completed (the text is then cut before it)."""
        self.token_ids.append(token_id)
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if not self.stop:
            return False
        start = max(0, self._searched - self._max_stop + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        self._searched = len(self.text)
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def pending_delta(self, final: bool) -> str:
        """Text safe to emit now (everything when `final`)."""
        end = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):
                end -= 1
            end -= self._held_for_stop(self.text[:end])
            end = max(end, self.emitted)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta

    def _held_for_stop(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        for n in range(min(self._max_stop - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
