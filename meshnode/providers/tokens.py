"""Token-count estimates for when an upstream reports no usage.

Owns one documented heuristic, used for budget reservations before a call and for cost when an
upstream answers without `usage` (the result is then marked `Usage(estimated=True)`). It does not
tokenize: real tokenizers (tiktoken and friends) need vocabulary files we cannot fetch offline,
and an estimate only has to be in the right range for budgets, not exact.

The heuristic (close to OpenAI's own rule of thumb for English):
- text: about 4 characters per token, rounded up; an empty string is 0 tokens;
- a pre-tokenized prompt (a list of ints) is exactly its length;
- chat: every message costs 4 tokens of framing plus its content (text parts of multi-part
  content; 85 tokens per image part, OpenAI's low-detail price), its name and tool calls; the
  reply is primed with 3 more; `tools`/`functions` count as their JSON text.

This module must not import anything heavier than the standard library and orjson.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from meshnode.types import RequestKind

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4
REPLY_PRIMING_TOKENS = 3
IMAGE_PART_TOKENS = 85


def estimate_tokens(text: str) -> int:
    """About one token per 4 characters, rounded up; 0 for an empty string."""
    return -(-len(text) // CHARS_PER_TOKEN)


def tokens_for_chars(chars: int) -> int:
    """`estimate_tokens` for a text of `chars` characters (when only its length was kept)."""
    return -(-chars // CHARS_PER_TOKEN)


def estimate_prompt_tokens(kind: RequestKind, body: Mapping[str, Any]) -> int:
    """Estimated prompt tokens of an OpenAI request body of the given kind.

    Tolerates any shape (it runs before and after validation): what it cannot read counts 0.
    """
    if kind is RequestKind.CHAT:
        return _chat_tokens(body)
    if kind is RequestKind.COMPLETION:
        return _input_tokens(body.get("prompt"))
    if kind is RequestKind.EMBEDDING:
        return _input_tokens(body.get("input"))
    if kind is RequestKind.IMAGE:
        prompt = body.get("prompt")
        return estimate_tokens(prompt) if isinstance(prompt, str) else 0
    return 0


def _chat_tokens(body: Mapping[str, Any]) -> int:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 0
    total = REPLY_PRIMING_TOKENS
    for message in messages:
        if not isinstance(message, dict):
            continue
        total += MESSAGE_OVERHEAD_TOKENS + _content_tokens(message.get("content"))
        name = message.get("name")
        if isinstance(name, str):
            total += estimate_tokens(name)
        tool_calls = message.get("tool_calls")
        if tool_calls:
            total += _json_tokens(tool_calls)
    for extra in ("tools", "functions"):
        value = body.get(extra)
        if value:
            total += _json_tokens(value)
    return total


def _content_tokens(content: Any) -> int:
    if isinstance(content, str):
        return estimate_tokens(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if not isinstance(part, dict):
                continue
            text = part.get("text")
            if isinstance(text, str):
                total += estimate_tokens(text)
            elif part.get("type") in ("image_url", "input_image", "image"):
                total += IMAGE_PART_TOKENS
        return total
    return 0


def _input_tokens(value: Any) -> int:
    """A prompt/input: a string, a list of strings, a token list, or a list of token lists."""
    if isinstance(value, str):
        return estimate_tokens(value)
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)
        return sum(_input_tokens(v) for v in value)
    return 0


def _json_tokens(value: Any) -> int:
    try:
        return estimate_tokens(orjson.dumps(value).decode())
    except TypeError:
        return 0
