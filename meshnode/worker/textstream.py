"""Token ids to text deltas for one generated sequence, with stop sequences.

Incremental detokenisation the way TGI and vLLM do it: decode a short window twice (with and
without the newest token) and emit the difference, holding back while the text ends in an
incomplete UTF-8 character. Stop sequences: text that could be the start of a stop sequence is
held back until it is known not to be one, so a stop string never reaches the client; the one
that ended the text is kept in `stop_sequence` (the Anthropic door reports it).
"""

from __future__ import annotations

from typing import Any

# Prompt tokens kept as left context: tokenizers such as SentencePiece decode a lone token
# without its leading space.
_CONTEXT_TOKENS = 4


class TextStream:
    def __init__(self, tokenizer: Any, prompt_tail: list[int], stop: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt_tail[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = stop
        self._held = ""  # decoded but not yet emitted (possible start of a stop sequence)
        self.stopped = False
        self.stop_sequence: str | None = None  # the stop string that ended the text

    def _decode(self, ids: list[int]) -> str:
        text: str = self._tokenizer.decode(ids, skip_special_tokens=True)
        return text

    def push(self, token_id: int) -> str:
        """Add one token; return the text that may be emitted now. Sets `stopped` and
        `stop_sequence` when a stop sequence completed (the returned text is then everything
        before it; the first to complete wins, and of two that complete with the same token,
        the one that starts first)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return self._filter(delta)

    def flush(self) -> str:
        """At the end of the sequence: whatever is still held back."""
        if self.stopped:
            return ""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        rest = self._held + full[len(prefix) :]
        self._held = ""
        self._read_offset = len(self._ids)
        self._prefix_offset = self._read_offset
        return rest

    def _filter(self, delta: str) -> str:
        if not self._stop:
            return delta
        held = self._held + delta
        cut, fired = -1, None
        for s in self._stop:
            i = held.find(s)
            if i != -1 and (cut == -1 or i < cut):
                cut, fired = i, s
        if fired is not None:
            self.stopped = True
            self.stop_sequence = fired
            self._held = ""
            return held[:cut]
        keep = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(held)), keep, -1):
                if held.endswith(s[:k]):
                    keep = k
                    break
        if keep:
            self._held = held[-keep:]
            return held[:-keep]
        self._held = ""
        return held
