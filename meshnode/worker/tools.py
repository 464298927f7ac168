"""The tool-call text format of local models: how tools are shown to a model, how a call reads.

Torch-free: the worker renders tools into the prompt with it, the node parses what the model
wrote back into OpenAI `tool_calls` with it, and the worker's grammar (`grammar.py`) forces the
same format when a call is required. One format, one home:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

This is the Hermes / Qwen 2.5 / SmolLM2 convention. Where a chat template renders `tools`
itself (it mentions `tools`), the template's own rendering is used; otherwise the tools are
described in a system message in this format. The parser also takes the bare JSON object that
Llama 3.1-style templates ask for (`{"name": ..., "parameters": ...}`) when the whole answer is
one, and only for a function that was offered, so a JSON answer is not mistaken for a call.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshnode.worker.params import ToolSpec

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def render_call(name: str, arguments: str) -> str:
    """An assistant's earlier call, written back into the transcript in the model's format."""
    try:
        args: Any = json.loads(arguments) if arguments else {}
    except ValueError:
        args = arguments
    body = json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"


def openai_tools(tools: list[ToolSpec]) -> list[dict[str, Any]]:
    """The tools as a chat template's `tools=` takes them (OpenAI's request shape)."""
    out = []
    for tool in tools:
        function: dict[str, Any] = {"name": tool.name,
                                    "parameters": tool.parameters or {"type": "object"}}
        if tool.description:
            function["description"] = tool.description
        out.append({"type": "function", "function": function})
    return out


def tools_system_prompt(tools: list[ToolSpec]) -> str:
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False)
                        for t in openai_tools(tools))
    return (
        f"You can call these functions:\n<tools>\n{listing}\n</tools>\n"
        f"To call one, answer with its name and arguments in {CALL_OPEN} tags:\n"
        f'{CALL_OPEN}\n{{"name": <function name>, "arguments": <JSON object>}}\n{CALL_CLOSE}'
    )


def with_tools_prompt(messages: list[dict[str, str]],
                      tools: list[ToolSpec]) -> list[dict[str, str]]:
    """Messages with the tools described in the (first) system message, for chat templates
    that have no tool support of their own."""
    prompt = tools_system_prompt(tools)
    if messages and messages[0]["role"] in ("system", "developer"):
        first = {"role": "system", "content": messages[0]["content"] + "\n\n" + prompt}
        return [first, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def _call_from(obj: Any, names: frozenset[str] | None) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if names is not None and obj["name"] not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(new_call_id(), obj["name"], json.dumps(args, ensure_ascii=False))


def _parse_block(inner: str) -> ToolCall | None:
    try:
        return _call_from(json.loads(inner), None)
    except ValueError:
        return None


class ToolCallStream:
    """Splits a model's text, as it streams, into content and tool calls.

    `push(delta)` returns (content that may be shown now, calls completed now); `finish()`
    returns what was still held. Text that may be the start of `<tool_call>` is held until it
    is known not to be; a call is held until its closing tag (or the end). An answer whose
    first non-blank character opens a JSON object or array is held to the end and then read as
    bare calls when it is one (else it is content)."""

    def __init__(self, names: frozenset[str]) -> None:
        self._names = names
        self._buffer = ""
        self._started = False  # some non-blank content was emitted
        self._bare = False  # holding a possible bare-JSON call to the end
        self._in_call = False
        self.calls: list[ToolCall] = []

    def push(self, delta: str) -> tuple[str, list[ToolCall]]:
        self._buffer += delta
        out: list[str] = []
        made: list[ToolCall] = []
        while True:
            if self._bare:
                return "".join(out), made
            if self._in_call:
                end = self._buffer.find(CALL_CLOSE)
                if end == -1:
                    break
                inner, self._buffer = self._buffer[:end], self._buffer[end + len(CALL_CLOSE):]
                self._in_call = False
                call = _parse_block(inner.strip())
                if call is None:
                    out.append(CALL_OPEN + inner + CALL_CLOSE)
                    self._started = True
                else:
                    made.append(call)
                continue
            if not self._started:
                stripped = self._buffer.lstrip()
                if not stripped:
                    break  # only blanks so far: they may precede a call
                if stripped[0] in "{[":
                    self._bare = True
                    continue
            start = self._buffer.find(CALL_OPEN)
            if start != -1:
                before = self._buffer[:start]
                if before.strip() or self._started:
                    out.append(before)
                    self._started = self._started or bool(before.strip())
                self._buffer = self._buffer[start + len(CALL_OPEN):]
                self._in_call = True
                continue
            keep = _partial_suffix(self._buffer, CALL_OPEN)
            if not self._started and not self._buffer[: len(self._buffer) - keep].strip():
                break  # blanks, then maybe the start of a tag
            emit = self._buffer[: len(self._buffer) - keep]
            self._buffer = self._buffer[len(self._buffer) - keep:]
            if emit:
                out.append(emit)
                self._started = True
            break
        self.calls.extend(made)
        return "".join(out), made

    def finish(self) -> tuple[str, list[ToolCall]]:
        rest, self._buffer = self._buffer, ""
        made: list[ToolCall] = []
        content = ""
        if self._bare:
            parsed = _bare_calls(rest, self._names)
            if parsed is None:
                content = rest
            else:
                made = parsed
        elif self._in_call:
            call = _parse_block(rest.strip())
            if call is None:
                content = CALL_OPEN + rest
            else:
                made = [call]
        elif self._started or rest.strip():
            content = rest
        self.calls.extend(made)
        return content, made


def _bare_calls(text: str, names: frozenset[str]) -> list[ToolCall] | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    items = obj if isinstance(obj, list) else [obj]
    calls = [_call_from(item, names) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None]


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
