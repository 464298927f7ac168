"""OpenAI choices from a local worker's events: text, tool calls and logprobs, streamed or not.

The local provider feeds each choice's `TextDelta`s to one builder here and asks it for stream
chunk deltas or, at the end, the whole choice. One builder for both paths, so a streamed answer
carries exactly the text, calls and logprobs of the same answer not streamed.

Shapes (OpenAI's):
- chat: `message.content` / `message.tool_calls` (ids `call_...`, arguments a JSON string;
  finish_reason `tool_calls` when the answer is calls), `logprobs: {"content": [{token,
  logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], "refusal": null}`;
- completions: `logprobs: {tokens, token_logprobs, top_logprobs, text_offset}`, where
  `top_logprobs` also holds the sampled token (OpenAI: up to logprobs + 1 entries), the
  echoed prompt's first token has null for both, and `text_offset` counts characters of the
  returned text (echo included) from 0.
A token that is not whole UTF-8 on its own is named `bytes:\\xNN...`, as OpenAI does.

Torch-free; no HTTP, no worker plumbing.
"""

from __future__ import annotations

import codecs
import math
from typing import Any

from meshnode.worker.tools import ToolCall, ToolCallStream

# OpenAI's stand-in for a probability that underflows.
_FLOOR = -9999.0


def token_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _value(logprob: float) -> float:
    return _FLOOR if math.isinf(logprob) or math.isnan(logprob) else max(_FLOOR, logprob)


def chat_logprobs(entries: list[Any]) -> list[dict[str, Any]]:
    """Worker logprob entries as chat's `logprobs.content` items."""
    out = []
    for raw, logprob, top in entries:
        out.append({
            "token": token_text(raw), "logprob": _value(logprob if logprob is not None else 0.0),
            "bytes": list(raw),
            "top_logprobs": [{"token": token_text(b), "logprob": _value(v), "bytes": list(b)}
                             for b, v in top],
        })
    return out


class CompletionLogprobs:
    """Legacy completions logprobs for one choice; `add` returns the part for new entries."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("ignore")
        self._offset = 0
        self.whole: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [],
                                            "top_logprobs": [], "text_offset": []}

    def add(self, entries: list[Any]) -> dict[str, list[Any]]:
        part: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                      "text_offset": []}
        for raw, logprob, top in entries:
            token = token_text(raw)
            part["tokens"].append(token)
            part["text_offset"].append(self._offset)
            self._offset += len(self._decoder.decode(raw))
            if logprob is None:
                part["token_logprobs"].append(None)
                part["top_logprobs"].append(None)
                continue
            part["token_logprobs"].append(_value(logprob))
            best: dict[str, float] = {}
            for b, v in top:
                best.setdefault(token_text(b), _value(v))
            best.setdefault(token, _value(logprob))
            part["top_logprobs"].append(best)
        for key, values in part.items():
            self.whole[key].extend(values)
        return part


class ChatChoice:
    """One chat choice being built. `tool_names` set: the text is read for tool calls."""

    def __init__(self, index: int, tool_names: frozenset[str] | None, logprobs: bool) -> None:
        self.index = index
        self._parser = ToolCallStream(tool_names) if tool_names is not None else None
        self._content: list[str] = []
        self.calls: list[ToolCall] = []
        self._logprobs: list[dict[str, Any]] | None = [] if logprobs else None
        self.started = False

    def feed(self, text: str, entries: list[Any] | None
             ) -> tuple[str, list[ToolCall], list[dict[str, Any]] | None]:
        """Content that may be shown now, calls completed now, and these tokens' logprobs."""
        if self._parser is not None:
            text, calls = self._parser.push(text)
        else:
            calls = []
        return self._take(text, calls, entries)

    def end(self) -> tuple[str, list[ToolCall]]:
        if self._parser is None:
            return "", []
        text, calls = self._parser.finish()
        content, calls, _ = self._take(text, calls, None)
        return content, calls

    def _take(self, text: str, calls: list[ToolCall], entries: list[Any] | None
              ) -> tuple[str, list[ToolCall], list[dict[str, Any]] | None]:
        self._content.append(text)
        self.calls.extend(calls)
        items = None
        if entries is not None and self._logprobs is not None:
            items = chat_logprobs(entries)
            self._logprobs.extend(items)
        return text, calls, items

    def finish_reason(self, finish: str | None) -> str:
        finish = finish or "stop"
        return "tool_calls" if self.calls and finish == "stop" else finish

    def message(self) -> dict[str, Any]:
        content = "".join(self._content)
        # `refusal` is required by OpenAI's published schema; local models never refuse.
        if not self.calls:
            return {"role": "assistant", "content": content, "refusal": None}
        return {"role": "assistant", "content": content.strip() or None, "refusal": None,
                "tool_calls": [c.to_openai() for c in self.calls]}

    def logprobs(self) -> dict[str, Any] | None:
        if self._logprobs is None:
            return None
        return {"content": self._logprobs, "refusal": None}

    def call_deltas(self, calls: list[ToolCall]) -> list[dict[str, Any]]:
        """Stream `tool_calls` delta items for calls just completed (each whole)."""
        first = len(self.calls) - len(calls)
        return [{"index": first + k, **c.to_openai()} for k, c in enumerate(calls)]
