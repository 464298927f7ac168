"""Who runs in the next step: slots, admission and prefill chunks (pure: no torch, no model).

The engine asks once per step:
1. `admit()`: waiting sequences, first come first served, each taking `n` free slots (lowest
   first, so running rows stay packed at the front of the slot cache); a sequence that does not
   find its slots waits (the node's queue bound turns a long wait into `local_queue_full`), and
   so does one the engine holds back (`ready`);
2. `plan()`: the prefill work of this step, at most `chunk_tokens` query positions in all (the
   first prefilling sequence always gets a chunk; others join while the padded batch, rows x
   longest chunk, stays within the budget), and the slots that decode.

So one step is at most one bounded prefill forward plus one decode forward: a newcomer's long
prompt holds the running streams' next token for one chunk, never for the whole prompt.
`advance()` records a chunk once its forward succeeded (a failed step is simply planned again);
`release()` frees a slot the moment its row ends.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(eq=False, slots=True)
class Sequence:
    """One request's place in the schedule: `n` rows, one slot each, sharing one prompt."""

    key: int
    prompt_len: int
    n: int = 1
    slots: list[int] = field(default_factory=list)
    computed: int = 0  # prompt tokens already in the first slot (reused + prefilled)
    cached: int = 0  # of which reused from the prefix store

    @property
    def prefilled(self) -> bool:
        return self.computed >= self.prompt_len


@dataclass(frozen=True, slots=True)
class Chunk:
    sequence: Sequence
    start: int
    end: int

    @property
    def last(self) -> bool:
        """This chunk ends the prompt: its last position's logits give the first token."""
        return self.end >= self.sequence.prompt_len


@dataclass(frozen=True, slots=True)
class Plan:
    chunks: tuple[Chunk, ...]
    width: int  # query positions per prefill row (the longest chunk)
    decode: tuple[int, ...]  # slots that decode one token, ascending


class Scheduler:
    def __init__(self, max_batch: int, chunk_tokens: int) -> None:
        if max_batch < 1 or chunk_tokens < 1:
            raise ValueError("max_batch and chunk_tokens must be positive")
        self.max_batch = max_batch
        self.chunk_tokens = chunk_tokens
        self._free = list(range(max_batch))
        heapq.heapify(self._free)
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.decoding: set[int] = set()

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def add(self, sequence: Sequence) -> None:
        if sequence.n > self.max_batch:
            raise ValueError(f"{sequence.n} rows cannot fit in {self.max_batch} slots")
        self.waiting.append(sequence)

    def admit(self, ready: Callable[[Sequence], bool] | None = None) -> list[Sequence]:
        """`ready(sequence)` False holds the queue's head back this step (the engine uses it to
        let a prompt wait for a prefix another sequence is computing right now)."""
        admitted: list[Sequence] = []
        while self.waiting and self.waiting[0].n <= len(self._free):
            if ready is not None and not ready(self.waiting[0]):
                break
            sequence = self.waiting.popleft()
            sequence.slots = [heapq.heappop(self._free) for _ in range(sequence.n)]
            self.prefilling.append(sequence)
            admitted.append(sequence)
        return admitted

    def plan(self) -> Plan:
        chunks: list[Chunk] = []
        width = 0
        for sequence in self.prefilling:
            left = sequence.prompt_len - sequence.computed
            size = min(left, self.chunk_tokens)
            wider = max(width, size)
            if chunks and wider * (len(chunks) + 1) > self.chunk_tokens:
                break
            chunks.append(Chunk(sequence, sequence.computed, sequence.computed + size))
            width = wider
        return Plan(tuple(chunks), width, tuple(sorted(self.decoding)))

    def advance(self, chunk: Chunk) -> None:
        sequence = chunk.sequence
        sequence.computed = max(sequence.computed, chunk.end)
        if sequence.prefilled and sequence in self.prefilling:
            self.prefilling.remove(sequence)
            self.decoding.update(sequence.slots)

    def release(self, slot: int) -> None:
        """A row ended: its slot is free for the next admission."""
        self.decoding.discard(slot)
        heapq.heappush(self._free, slot)

    def drop(self, sequence: Sequence, open_slots: list[int]) -> None:
        """A sequence ends early (cancelled, failed): out of the queue, its open slots freed."""
        if sequence in self.waiting:
            self.waiting.remove(sequence)
            return
        if sequence in self.prefilling:
            self.prefilling.remove(sequence)
        for slot in open_slots:
            self.release(slot)
