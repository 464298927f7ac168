"""Between stream chunks and whole answers, in both directions.

- `assemble(kind, chunks, usage)`: the chunks of a streamed answer -> the non-stream body the
  cache keeps (content and refusals concatenated, tool-call deltas merged by index, the last
  finish_reason and, when a stop string ended a choice, which one: `stop_reason`, vLLM's field,
  which the Anthropic door reads). Returns None for a shape it does not fully understand, so the cache never
  keeps a half answer.
- `chunks_of(answer)`: a kept answer -> the chunks of a normal OpenAI stream (a role chunk, one
  content chunk, the finish chunk, then the usage chunk), which the SSE writer relays like any
  provider's stream, so the official `openai` client parses a cached stream as any other.

Pure: no I/O; chunk dicts are built fresh and never shared with the kept answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from meshnode.types import RequestKind, StreamChunk, Usage

_HEADER_KEYS = ("id", "created", "model", "system_fingerprint")
_TEXT_LOGPROBS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


# --------------------------------------------------------------------------- chunks -> answer
def assemble(
    kind: RequestKind, chunks: Sequence[dict[str, Any]], usage: Usage
) -> dict[str, Any] | None:
    if not chunks:
        return None
    if kind is RequestKind.CHAT:
        return _assemble_chat(chunks, usage)
    if kind is RequestKind.COMPLETION:
        return _assemble_text(chunks, usage)
    return None


def _header(chunks: Sequence[dict[str, Any]], obj: str) -> dict[str, Any]:
    out: dict[str, Any] = {"object": obj}
    for chunk in chunks:
        for key in _HEADER_KEYS:
            if key not in out and chunk.get(key) is not None:
                out[key] = chunk[key]
    return out


def _assemble_chat(chunks: Sequence[dict[str, Any]], usage: Usage) -> dict[str, Any] | None:
    choices: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                return None
            index = choice.get("index", 0)
            if not isinstance(index, int):
                return None
            acc = choices.setdefault(
                index,
                {"role": "assistant", "content": [], "refusal": [], "tools": {},
                 "finish_reason": None, "stop_reason": None, "logprobs": None},
            )
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict):
                return None
            if set(delta) - {"role", "content", "refusal", "tool_calls"}:
                return None  # audio, legacy function_call...: not ours to rebuild
            if isinstance(delta.get("role"), str):
                acc["role"] = delta["role"]
            if isinstance(delta.get("content"), str):
                acc["content"].append(delta["content"])
            if isinstance(delta.get("refusal"), str):
                acc["refusal"].append(delta["refusal"])
            for call in delta.get("tool_calls") or ():
                if not _merge_tool_call(acc["tools"], call):
                    return None
            logprobs = choice.get("logprobs")
            if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
                if acc["logprobs"] is None:
                    acc["logprobs"] = {"content": [], "refusal": None}
                acc["logprobs"]["content"].extend(logprobs["content"])
            if choice.get("finish_reason") is not None:
                acc["finish_reason"] = choice["finish_reason"]
            if isinstance(choice.get("stop_reason"), str):
                acc["stop_reason"] = choice["stop_reason"]
    if not choices or any(c["finish_reason"] is None for c in choices.values()):
        return None  # an answer that never finished is not an answer to keep
    body = _header(chunks, "chat.completion")
    out_choices = []
    for index in sorted(choices):
        acc = choices[index]
        message: dict[str, Any] = {
            "role": acc["role"],
            "content": "".join(acc["content"]) if acc["content"] or not acc["tools"] else None,
        }
        # OpenAI's schema requires `refusal` on every message (null when there is none).
        message["refusal"] = "".join(acc["refusal"]) if acc["refusal"] else None
        if acc["tools"]:
            message["tool_calls"] = [
                {
                    "id": t["id"],
                    "type": t["type"],
                    "function": {"name": t["name"], "arguments": "".join(t["arguments"])},
                }
                for _, t in sorted(acc["tools"].items())
            ]
        out_choices.append(
            {"index": index, "message": message, "logprobs": acc["logprobs"],
             "finish_reason": acc["finish_reason"], **_fired(acc["stop_reason"])}
        )
    body["choices"] = out_choices
    body["usage"] = usage.to_openai()
    return body


def _fired(stop_reason: Any) -> dict[str, str]:
    """`stop_reason` on a choice a stop string ended (which one fired), else nothing."""
    return {"stop_reason": stop_reason} if isinstance(stop_reason, str) else {}


def _merge_tool_call(tools: dict[int, dict[str, Any]], call: Any) -> bool:
    if not isinstance(call, dict) or not isinstance(call.get("index", 0), int):
        return False
    acc = tools.setdefault(
        call.get("index", 0), {"id": None, "type": "function", "name": "", "arguments": []}
    )
    if call.get("id"):
        acc["id"] = call["id"]
    if call.get("type"):
        acc["type"] = call["type"]
    function = call.get("function") or {}
    if not isinstance(function, dict):
        return False
    if function.get("name"):
        acc["name"] += function["name"]
    if isinstance(function.get("arguments"), str):
        acc["arguments"].append(function["arguments"])
    return True


def _assemble_text(chunks: Sequence[dict[str, Any]], usage: Usage) -> dict[str, Any] | None:
    texts: dict[int, list[str]] = {}
    finish: dict[int, Any] = {}
    fired: dict[int, str] = {}
    logprobs: dict[int, dict[str, list[Any]]] = {}
    for chunk in chunks:
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or not isinstance(choice.get("index", 0), int):
                return None
            index = choice.get("index", 0)
            text = choice.get("text")
            texts.setdefault(index, [])
            if isinstance(text, str):
                texts[index].append(text)
            part = choice.get("logprobs")
            if isinstance(part, dict):
                acc = logprobs.setdefault(index, {k: [] for k in _TEXT_LOGPROBS})
                for key in _TEXT_LOGPROBS:
                    acc[key].extend(part.get(key) or ())
            if choice.get("finish_reason") is not None:
                finish[index] = choice["finish_reason"]
            if isinstance(choice.get("stop_reason"), str):
                fired[index] = choice["stop_reason"]
    if not texts or set(finish) != set(texts):
        return None
    body = _header(chunks, "text_completion")
    body["choices"] = [
        {"index": i, "text": "".join(texts[i]), "logprobs": logprobs.get(i),
         "finish_reason": finish[i], **_fired(fired.get(i))}
        for i in sorted(texts)
    ]
    body["usage"] = usage.to_openai()
    return body


# --------------------------------------------------------------------------- answer -> chunks
def chunks_of(kind: RequestKind, body: dict[str, Any], usage: Usage) -> list[StreamChunk]:
    """The stream a client would have seen, rebuilt from a kept answer."""
    if kind is RequestKind.CHAT:
        return _chat_chunks(body, usage)
    return _text_chunks(body, usage)


def _base(body: dict[str, Any], obj: str) -> dict[str, Any]:
    out: dict[str, Any] = {"object": obj}
    for key in _HEADER_KEYS:
        if key in body:
            out[key] = body[key]
    return out


def _chat_chunks(body: dict[str, Any], usage: Usage) -> list[StreamChunk]:
    base = _base(body, "chat.completion.chunk")
    out: list[StreamChunk] = []
    for choice in body.get("choices") or ():
        index = choice.get("index", 0)
        message = choice.get("message") or {}
        out.append(StreamChunk({**base, "choices": [
            {"index": index,
             "delta": {"role": message.get("role", "assistant"),
                       # OpenAI opens with "" for text and null for a tool-call-only answer.
                       "content": "" if isinstance(message.get("content"), str) else None,
                       "refusal": None},
             "logprobs": None, "finish_reason": None}]}))
        content = message.get("content")
        if content or choice.get("logprobs") is not None:
            out.append(StreamChunk({**base, "choices": [
                {"index": index, "delta": {"content": content or ""},
                 "logprobs": choice.get("logprobs"), "finish_reason": None}]}))
        if message.get("refusal"):
            out.append(StreamChunk({**base, "choices": [
                {"index": index, "delta": {"refusal": message["refusal"]},
                 "logprobs": None, "finish_reason": None}]}))
        calls = message.get("tool_calls")
        if calls:
            out.append(StreamChunk({**base, "choices": [
                {"index": index,
                 "delta": {"tool_calls": [{**call, "index": i} for i, call in enumerate(calls)]},
                 "logprobs": None, "finish_reason": None}]}))
        out.append(StreamChunk({**base, "choices": [
            {"index": index, "delta": {}, "logprobs": None,
             "finish_reason": choice.get("finish_reason") or "stop",
             **_fired(choice.get("stop_reason"))}]}))
    out.append(StreamChunk({**base, "choices": [], "usage": usage.to_openai()}, usage=usage))
    return out


def _text_chunks(body: dict[str, Any], usage: Usage) -> list[StreamChunk]:
    base = _base(body, "text_completion")
    out: list[StreamChunk] = []
    for choice in body.get("choices") or ():
        index = choice.get("index", 0)
        text = choice.get("text") or ""
        if text or choice.get("logprobs") is not None:
            out.append(StreamChunk({**base, "choices": [
                {"index": index, "text": text, "logprobs": choice.get("logprobs"),
                 "finish_reason": None}]}))
        out.append(StreamChunk({**base, "choices": [
            {"index": index, "text": "", "logprobs": None,
             "finish_reason": choice.get("finish_reason") or "stop",
             **_fired(choice.get("stop_reason"))}]}))
    out.append(StreamChunk({**base, "choices": [], "usage": usage.to_openai()}, usage=usage))
    return out
