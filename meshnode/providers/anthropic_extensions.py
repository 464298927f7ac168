"""Anthropic-only features carried through the OpenAI-shaped middle of the mesh.

The Anthropic door (`meshnode.api.anthropic_door`) turns a Messages request into a chat body,
which the router may send to any provider, through peers too (the body travels as it is). A
few things in a Messages request have no OpenAI equivalent, yet matter when the serving
upstream is Anthropic (prompt caching is a cost matter for Claude Code). They ride in the chat
body under these names, LiteLLM's and vLLM's conventions where one exists:

- top level: `thinking` (Anthropic's object), `anthropic_beta` (the client's `anthropic-beta`
  header values, a list), `output_config` (Anthropic's, as sent; `response_format` carries
  its `format` for everyone else), `top_k`;
- `cache_control` on a content part, on a tool, and on a system message's text parts;
- `thinking_blocks` on an assistant message (`thinking` / `redacted_thinking` blocks with
  their signatures, which Anthropic wants back in the next turn).

And on the way back (`choices[0]`): `message.thinking_blocks` (plus `reasoning_content`, the
thinking text), and `stop_reason`, the stop sequence that fired (vLLM's field).

The Anthropic adapter reads them. Every other adapter calls `drop_extensions(body, ...)`,
which returns the body without them and logs one note naming what was dropped (a copy only
when there is something to drop; the request's body is never mutated).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

TOP_LEVEL = ("thinking", "anthropic_beta", "output_config")
PART_FIELD = "cache_control"
MESSAGE_FIELD = "thinking_blocks"


def _clean_parts(content: Any) -> tuple[Any, bool]:
    if not isinstance(content, list):
        return content, False
    if not any(isinstance(p, dict) and PART_FIELD in p for p in content):
        return content, False
    return [{k: v for k, v in p.items() if k != PART_FIELD} if isinstance(p, dict) else p
            for p in content], True


_TOP_LEVEL_SET = frozenset(TOP_LEVEL)


def _plain(body: Mapping[str, Any], also: tuple[str, ...]) -> bool:
    """Nothing to drop for sure: no extension at the top level, no tools, and no message that
    has thinking blocks or content parts (those are looked at part by part)."""
    if not _TOP_LEVEL_SET.isdisjoint(body) or "tools" in body:
        return False
    for name in also:
        if name in body:
            return False
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict) and (
                    MESSAGE_FIELD in message or isinstance(message.get("content"), list)):
                return False
    return True


def drop_extensions(
    body: Mapping[str, Any], provider: str, *, also: tuple[str, ...] = ()
) -> Mapping[str, Any]:
    """`body` without the Anthropic-only fields (and the top-level names in `also`, e.g.
    `top_k` for OpenAI itself, which refuses it). Logs what was dropped, once per call."""
    if _plain(body, also):
        return body  # the common case, told without building anything
    dropped: list[str] = [name for name in (*TOP_LEVEL, *also) if name in body]
    messages = body.get("messages")
    new_messages = messages
    if isinstance(messages, list):
        changed = False
        out = []
        for message in messages:
            if not isinstance(message, dict):
                out.append(message)
                continue
            content, cleaned = _clean_parts(message.get("content"))
            if cleaned or MESSAGE_FIELD in message:
                changed = True
                message = {k: v for k, v in message.items() if k != MESSAGE_FIELD}
                message["content"] = content
            out.append(message)
        if changed:
            new_messages = out
            dropped.append("cache_control/thinking_blocks in messages")
    tools = body.get("tools")
    new_tools = tools
    if isinstance(tools, list) and any(isinstance(t, dict) and PART_FIELD in t for t in tools):
        new_tools = [{k: v for k, v in t.items() if k != PART_FIELD} if isinstance(t, dict)
                     else t for t in tools]
        dropped.append("cache_control on tools")
    if not dropped:
        return body
    log.info("provider %s is not Anthropic: dropped %s (Anthropic-only)", provider,
             ", ".join(dropped))
    out_body = {k: v for k, v in body.items() if k not in TOP_LEVEL and k not in also}
    if new_messages is not messages:
        out_body["messages"] = new_messages
    if new_tools is not tools:
        out_body["tools"] = new_tools
    return out_body


__all__ = ["MESSAGE_FIELD", "PART_FIELD", "TOP_LEVEL", "drop_extensions"]
