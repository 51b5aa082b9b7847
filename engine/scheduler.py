"""Admission and ordering: which requests run this step.

Requests wait in FIFO order and are admitted while there is room: at most
`max_num_seqs` running, and a KV budget (prompt + max_tokens of every running sequence
within `kv_cache_tokens`). The head of the queue is never overtaken (FIFO fairness). A
new sequence is prefilled in chunks of at most `max_num_batched_tokens`, one chunk per
step, so a long prompt stalls running streams for one chunk at most.
"""

from __future__ import annotations

from collections import deque

from engine.config import SchedulerConfig
from engine.sequence import Sequence

LOAD_WINDOW = 16  # steps a load is remembered (`Scheduler.load`): a closed-loop client's next request comes within them


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._recent_loads: deque[int] = deque(maxlen=LOAD_WINDOW)

    @staticmethod
    def kv_need(seq: Sequence) -> int:
        return len(seq.prompt_ids) + seq.params.max_tokens

    @property
    def kv_used(self) -> int:
        return sum(self.kv_need(s) for s in self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move waiting sequences to running while limits allow, oldest first."""
        admitted = []
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            head = self.waiting[0]
            if self.running and self.kv_used + self.kv_need(head) > self.config.kv_cache_tokens:
                break
            self.running.append(self.waiting.popleft())
            admitted.append(head)
        return admitted

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def next_prefill(self) -> Sequence | None:
        return next((s for s in self.running if not s.prefilled), None)

    def decode_groups(self) -> list[list[Sequence]]:
        """Sequences ready for a round: one batch, or one group each when batching is off."""
        ready = [s for s in self.running if s.prefilled and not s.finished]
        if not ready:
            return []
        return [ready] if self.config.batching else [[s] for s in ready]

    def load(self, group: list[Sequence]) -> int:
        """The sequences a round over `group` will soon share rounds with (one call per step): the most, over
        the last LOAD_WINDOW steps, of every running one (decoding or still prefilling) and those waiting for
        room, up to `max_num_seqs`; the group alone with batching off. The peak, since a client that gets its
        answer sends its next request a moment later: priced at the dip between the two, the batch caught its
        drafts up and speculated for a step or two, the catch-up wasted."""
        if not self.config.batching:
            return len(group)
        self._recent_loads.append(min(self.config.max_num_seqs, len(self.running) + len(self.waiting)))
        return self.peak_load()

    def peak_load(self) -> int:
        """The load the last rounds were priced at (`load`), without counting a step; 1 before any round."""
        return max(self._recent_loads, default=1)

    def candidate_cap(self, group: list[Sequence]) -> int | None:
        """Most candidates each sequence of a round over `group` may propose: None for no cap, 0 for
        the target alone (see `spec_disable_batch_size` and `spec_batch_candidates`)."""
        limit = self.config.spec_disable_batch_size
        if limit is not None and len(group) >= limit:
            return 0
        total = self.config.spec_batch_candidates
        return None if total is None else total // max(1, len(group))
