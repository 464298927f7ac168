"""The Anthropic-compatible door: `POST /v1/messages` (and `/v1/messages/count_tokens`).

Tools that speak Anthropic's Messages API (the `anthropic` SDK, Claude Code) use the mesh through
this door. A Messages request is translated into our OpenAI chat body once, validated by
`meshnode.api.protocol.parse_chat` like any chat request, and routed by the same router to any
provider, local, cloud or peer. The OpenAI answer comes back translated into an Anthropic
message; a stream's OpenAI chunks become Anthropic's SSE events (`message_start`,
`content_block_start/delta/stop`, `message_delta`, `message_stop`) as they arrive.

Errors at this door use Anthropic's envelope `{"type": "error", "error": {"type", "message"}}`
with the status the MeshError carries (so the SDK raises its matching exception); a failure
after the first event is an `error` event with no `message_stop` after it.

This module owns the translation and the thin handler; it does not route, retry or know any
provider. `x_aiproxy` rides on the message (non-stream) and on `message_delta` (stream); the
`x-aiproxy-*` headers are set as on the OpenAI routes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from aiohttp import web

from meshnode.api import sse
from meshnode.api.answer import JSON, JsonAnswer
from meshnode.api.errors import error_response, internal_error_message, retry_after_header
from meshnode.api.handlers import (
    _aiproxy_headers,
    _served_headers,
    open_event_stream,
    require_model,
)
from meshnode.api.protocol import loads_body, parse_chat
from meshnode.api.sse import named_event
from meshnode.api.state import CONTEXT, STATE, ApiState
from meshnode.errors import InvalidRequest, MeshError
from meshnode.governance.http import key_name_of
from meshnode.observability.redact import redact
from meshnode.providers.anthropic_extensions import MESSAGE_FIELD, PART_FIELD
from meshnode.providers.tokens import estimate_prompt_tokens
from meshnode.routing.outcome import Served
from meshnode.types import InferenceRequest, RequestKind, StreamChunk

log = logging.getLogger(__name__)

STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
# Our HTTP status -> Anthropic's error type (what its SDK and Claude Code switch on).
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


# --------------------------------------------------------------------------- request
def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        for j, block in enumerate(content):
            if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                raise InvalidRequest("a content block needs a type", param=f"{where}.content.{j}")
        return content
    raise InvalidRequest("content must be a string or a list of blocks", param=f"{where}.content")


def _text(content: Any, where: str) -> str:
    texts = []
    for j, block in enumerate(_blocks(content, where)):
        if block["type"] == "text":
            texts.append(str(block.get("text", "")))
        else:
            raise InvalidRequest(
                f"only text blocks are supported here, not {block['type']!r}",
                param=f"{where}.content.{j}",
            )
    return "".join(texts)


def _cached(block: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """`part` with the block's `cache_control` (kept for an Anthropic upstream)."""
    if isinstance(block.get(PART_FIELD), dict):
        part[PART_FIELD] = block[PART_FIELD]
    return part


def _system(system: Any) -> Any:
    """`system` -> chat content: a string, or text parts when a block carries cache_control."""
    blocks = _blocks(system, "system")
    if any(PART_FIELD in b for b in blocks):
        _text(system, "system")  # validates: text blocks only
        return [_cached(b, {"type": "text", "text": str(b.get("text", ""))}) for b in blocks]
    return _text(system, "system")


def _image_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source") or {}
    if source.get("type") == "base64" and source.get("media_type") and source.get("data"):
        url = f"data:{source['media_type']};base64,{source['data']}"
    elif source.get("type") == "url" and source.get("url"):
        url = str(source["url"])
    else:
        raise InvalidRequest("image source must be base64 or url", param=f"{where}.source")
    return _cached(block, {"type": "image_url", "image_url": {"url": url}})


def _user_messages(content: Any, where: str) -> list[dict[str, Any]]:
    """One Anthropic user turn -> OpenAI `tool` messages (its tool results) then a user one."""
    tools: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(_blocks(content, where)):
        kind = block["type"]
        at = f"{where}.content.{j}"
        if kind == "text":
            parts.append(_cached(block, {"type": "text", "text": str(block.get("text", ""))}))
        elif kind == "image":
            parts.append(_image_part(block, at))
        elif kind == "tool_result":
            result = block.get("content")
            text = result if isinstance(result, str) else _text(result or "", at)
            if block.get("is_error"):
                text = f"Error: {text}"
            result_content: Any = text
            if PART_FIELD in block:
                result_content = [_cached(block, {"type": "text", "text": text})]
            tools.append({"role": "tool", "tool_call_id": str(block.get("tool_use_id")),
                          "content": result_content})
        else:
            raise InvalidRequest(f"content block type {kind!r} is not supported", param=at)
    out = tools
    if parts:
        only_text = all(p["type"] == "text" and PART_FIELD not in p for p in parts)
        user_content: Any = "".join(p["text"] for p in parts) if only_text else parts
        out.append({"role": "user", "content": user_content})
    return out


def _assistant_message(content: Any, where: str) -> dict[str, Any]:
    texts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    thinking: list[dict[str, Any]] = []
    for j, block in enumerate(_blocks(content, where)):
        kind = block["type"]
        if kind == "text":
            texts.append(_cached(block, {"type": "text", "text": str(block.get("text", ""))}))
        elif kind == "tool_use":
            calls.append({"id": str(block.get("id")), "type": "function", "function": {
                "name": str(block.get("name")),
                "arguments": orjson.dumps(block.get("input") or {}).decode()}})
        elif kind in ("thinking", "redacted_thinking"):
            # Only an Anthropic upstream reads them (it wants them back, signed, after a
            # tool use with thinking on); every other adapter drops them.
            thinking.append(block)
        else:
            raise InvalidRequest(f"content block type {kind!r} is not supported",
                                 param=f"{where}.content.{j}")
    text_content: Any = "".join(t["text"] for t in texts) or None
    if any(PART_FIELD in t for t in texts):
        text_content = texts
    message: dict[str, Any] = {"role": "assistant", "content": text_content}
    if thinking:
        message[MESSAGE_FIELD] = thinking
    if calls:
        message["tool_calls"] = calls
    elif message["content"] is None:
        message["content"] = ""
    return message


def _tool_choice(choice: Any) -> tuple[Any, bool]:
    """Anthropic tool_choice -> (OpenAI tool_choice, parallel tool calls allowed)."""
    if not isinstance(choice, dict):
        raise InvalidRequest("tool_choice must be an object", param="tool_choice")
    kind = choice.get("type")
    parallel = not choice.get("disable_parallel_tool_use", False)
    if kind == "auto":
        return "auto", parallel
    if kind == "any":
        return "required", parallel
    if kind == "none":
        return "none", parallel
    if kind == "tool" and choice.get("name"):
        return {"type": "function", "function": {"name": choice["name"]}}, parallel
    raise InvalidRequest("tool_choice.type must be auto, any, tool or none", param="tool_choice")


def _response_format(output_config: Any) -> dict[str, Any] | None:
    """Anthropic structured output (`output_config.format`) -> OpenAI's response_format."""
    if output_config is None:
        return None
    if not isinstance(output_config, dict):
        raise InvalidRequest("output_config must be an object", param="output_config")
    fmt = output_config.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(
            fmt.get("schema"), dict):
        raise InvalidRequest("output_config.format must be {type: json_schema, schema: {...}}",
                             param="output_config.format")
    return {"type": "json_schema",
            "json_schema": {"name": "output", "schema": fmt["schema"], "strict": True}}


def messages_to_chat(body: dict[str, Any], beta: str | None = None) -> dict[str, Any]:
    """An Anthropic Messages request body (and the client's `anthropic-beta` header) -> an
    OpenAI chat request body. What only Anthropic understands (cache_control, thinking,
    top_k, output_config, the beta flags) rides along under the names of
    `meshnode.providers.anthropic_extensions`, for an Anthropic upstream."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model: Field required", param="model")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidRequest("max_tokens: Field required (an integer >= 1)", param="max_tokens")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise InvalidRequest("messages: at least one message is required", param="messages")
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": _system(system)})
    for i, message in enumerate(raw_messages):
        where = f"messages.{i}"
        role = message.get("role") if isinstance(message, dict) else None
        if role == "user":
            messages.extend(_user_messages(message.get("content"), where))
        elif role == "assistant":
            messages.append(_assistant_message(message.get("content"), where))
        else:
            raise InvalidRequest("role must be 'user' or 'assistant'", param=f"{where}.role")
    out: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens}
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            out[name] = body[name]
    thinking = body.get("thinking")
    if thinking is not None:
        if not isinstance(thinking, dict) or not isinstance(thinking.get("type"), str):
            raise InvalidRequest("thinking must be an object with a type", param="thinking")
        out["thinking"] = thinking
    response_format = _response_format(body.get("output_config"))
    if body.get("output_config") is not None:
        out["output_config"] = body["output_config"]
    if response_format is not None:
        out["response_format"] = response_format
    if beta:
        flags = [flag.strip() for flag in beta.split(",") if flag.strip()]
        if flags:
            out["anthropic_beta"] = flags
    stops = body.get("stop_sequences")
    if stops:
        out["stop"] = stops
    tools = []
    for i, tool in enumerate(body.get("tools") or ()):
        if not isinstance(tool, dict) or not tool.get("name"):
            raise InvalidRequest("tools: a tool needs a name", param=f"tools.{i}.name")
        if tool.get("type") not in (None, "custom"):
            # Anthropic's server tools (web search, code execution) exist only there.
            raise InvalidRequest(f"server tool {tool['type']!r} is not supported here",
                                 param=f"tools.{i}.type")
        function = {"name": tool["name"],
                    "parameters": tool.get("input_schema") or {"type": "object"}}
        if tool.get("description"):
            function["description"] = tool["description"]
        tools.append(_cached(tool, {"type": "function", "function": function}))
    if tools:
        out["tools"] = tools
        if body.get("tool_choice") is not None:
            choice, parallel = _tool_choice(body["tool_choice"])
            out["tool_choice"] = choice
            if not parallel:
                out["parallel_tool_calls"] = False
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        out["user"] = metadata["user_id"]
    if body.get("stream"):
        out["stream"] = True
    return out


def parse_messages(
    raw: bytes,
    *,
    request_id: str,
    timeout_s: float,
    headers: dict[str, str] | None = None,
    key_name: str | None = None,
    beta: str | None = None,
) -> InferenceRequest:
    """Parse a raw `/v1/messages` body into a validated chat `InferenceRequest`."""
    chat = messages_to_chat(loads_body(raw), beta)
    return parse_chat(chat, request_id=request_id, deadline=time.monotonic() + timeout_s,
                      headers=headers, key_name=key_name)


# --------------------------------------------------------------------------- answer
def _tool_input(arguments: Any) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    try:
        value = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        # A model's malformed arguments are still handed over rather than dropped.
        return {"_raw_arguments": str(arguments)}
    return value if isinstance(value, dict) else {"value": value}


def _message_id(openai_id: Any, request_id: str) -> str:
    text = str(openai_id or request_id)
    return text if text.startswith("msg_") else f"msg_{text}"


def chat_to_message(body: dict[str, Any], model: str, request_id: str) -> dict[str, Any]:
    """An OpenAI chat.completion body -> an Anthropic message (no x_aiproxy)."""
    choices = body.get("choices") or [{}]
    choice = choices[0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = [
        dict(b) for b in message.get(MESSAGE_FIELD) or ()
        if isinstance(b, dict) and b.get("type") in ("thinking", "redacted_thinking")]
    if message.get("content"):
        content.append({"type": "text", "text": str(message["content"])})
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": str(call.get("id")),
                        "name": str(function.get("name")),
                        "input": _tool_input(function.get("arguments"))})
    usage = body.get("usage") or {}
    return {
        "id": _message_id(body.get("id"), request_id),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        **_stop(choice),
        "usage": {"input_tokens": int(usage.get("prompt_tokens") or 0),
                  "output_tokens": int(usage.get("completion_tokens") or 0)},
    }


def _stop(choice: dict[str, Any]) -> dict[str, Any]:
    """`stop_reason` and `stop_sequence` from a chat choice; the sequence that fired is in
    `choice.stop_reason` when the upstream told (Anthropic, vLLM)."""
    fired = choice.get("stop_reason")
    if choice.get("finish_reason") == "stop" and isinstance(fired, str) and fired:
        return {"stop_reason": "stop_sequence", "stop_sequence": fired}
    return {"stop_reason": STOP_REASONS.get(str(choice.get("finish_reason")), "end_turn"),
            "stop_sequence": None}


def error_type_for(exc: MeshError) -> str:
    return _ERROR_TYPES.get(exc.status, "api_error")


def error_envelope(exc: MeshError) -> dict[str, Any]:
    return {"type": "error",
            "error": {"type": error_type_for(exc), "message": redact(exc.message)}}


class _Pending:
    """A block that could not be written when its data came (another block was open)."""

    __slots__ = ("block", "data")

    def __init__(self, block: dict[str, Any]) -> None:
        self.block = block
        self.data: list[str] = []


class EventWriter:
    """Turns OpenAI chat chunks into Anthropic stream events, one chunk at a time.

    `start()` gives `message_start` (and a `ping`, as Anthropic sends); `feed(chunk)` the
    events a chunk makes; `finish(x_aiproxy)` closes the open block and sends `message_delta`
    (stop reason and sequence, usage, `x_aiproxy`) and `message_stop`; `error(exc)` the
    `error` event.

    Anthropic's blocks are sequential: one is open at a time, and nothing is written to a
    block after its `content_block_stop`. A chat stream may interleave text and several tool
    calls, so: the open block streams live; text or a new tool call while a tool block is open
    waits (buffered) until `finish()`, which writes each waiting block whole after closing the
    open one; a tool call's later arguments always go to its own block, open or waiting. Text
    after a closed text block opens a new text block. Thinking (`reasoning_content`, then its
    signature in `thinking_blocks`) streams as a `thinking` block.
    """

    def __init__(self, model: str, request_id: str, input_tokens_estimate: int = 0) -> None:
        self.model = model
        self.id = _message_id(None, request_id)
        self.input_tokens = input_tokens_estimate
        self.output_tokens = 0
        self.stop_reason = "end_turn"
        self.stop_sequence: str | None = None
        self._next_index = 0
        self._open: tuple[str, int, Any] | None = None  # (kind, block index, tool index)
        self._pending_text: _Pending | None = None
        self._pending_tools: dict[int, _Pending] = {}  # OpenAI tool index -> waiting block
        self._order: list[_Pending] = []  # waiting blocks in first-seen order
        self._tools_seen: set[int] = set()

    def start(self) -> bytes:
        message: dict[str, Any] = {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 0}}
        return (named_event("message_start", {"type": "message_start", "message": message})
                + named_event("ping", {"type": "ping"}))

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        index = self._open[1]
        self._open = None
        return named_event("content_block_stop", {"type": "content_block_stop", "index": index})

    def _open_block(self, kind: str, block: dict[str, Any], key: Any = None) -> bytes:
        out = self._close()
        index = self._next_index
        self._next_index += 1
        self._open = (kind, index, key)
        return out + named_event("content_block_start",
                           {"type": "content_block_start", "index": index, "content_block": block})

    def _delta(self, delta: dict[str, Any]) -> bytes:
        assert self._open is not None  # noqa: S101 - callers open a block first
        return named_event("content_block_delta",
                     {"type": "content_block_delta", "index": self._open[1], "delta": delta})

    def _text(self, text: str) -> bytes:
        kind = self._open[0] if self._open is not None else None
        if kind == "tool" or self._pending_text is not None:
            if self._pending_text is None:
                self._pending_text = _Pending({"type": "text", "text": ""})
                self._order.append(self._pending_text)
            self._pending_text.data.append(text)
            return b""
        out = b"" if kind == "text" else self._open_block("text", {"type": "text", "text": ""})
        return out + self._delta({"type": "text_delta", "text": text})

    def _thinking(self, text: str | None, blocks: list[Any]) -> bytes:
        out = b""
        if text:
            if self._open is None or self._open[0] != "thinking":
                out += self._open_block("thinking",
                                        {"type": "thinking", "thinking": "", "signature": ""})
            out += self._delta({"type": "thinking_delta", "thinking": text})
        for block in blocks:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "redacted_thinking":
                out += self._open_block("redacted_thinking", dict(block)) + self._close()
            elif block.get("signature"):
                if self._open is None or self._open[0] != "thinking":
                    out += self._open_block("thinking",
                                            {"type": "thinking", "thinking": "", "signature": ""})
                out += self._delta({"type": "signature_delta", "signature": block["signature"]})
                out += self._close()
        return out

    def _tool(self, call: dict[str, Any]) -> bytes:
        tool_index = int(call.get("index", 0))
        function = call.get("function") or {}
        arguments = function.get("arguments") or ""
        if self._open is not None and self._open[0] == "tool" and self._open[2] == tool_index:
            return self._delta({"type": "input_json_delta", "partial_json": arguments}) \
                if arguments else b""
        pending = self._pending_tools.get(tool_index)
        if pending is None and tool_index not in self._tools_seen:
            self._tools_seen.add(tool_index)
            block = {"type": "tool_use", "id": str(call.get("id") or f"toolu_{tool_index}"),
                     "name": str(function.get("name") or ""), "input": {}}
            if self._open is None or self._open[0] != "tool":
                out = self._open_block("tool", block, tool_index)
                if arguments:
                    out += self._delta({"type": "input_json_delta", "partial_json": arguments})
                return out
            pending = _Pending(block)
            self._pending_tools[tool_index] = pending
            self._order.append(pending)
        if pending is not None:
            if arguments:
                pending.data.append(arguments)
            return b""
        # Arguments for a tool block already closed: never happens with the rule above (a
        # tool block is closed only by finish()), kept as a guard rather than corrupt output.
        log.warning("stream %s: late arguments for tool call %s dropped", self.id, tool_index)
        return b""

    def feed(self, chunk: dict[str, Any]) -> bytes:
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.input_tokens = int(usage.get("prompt_tokens") or self.input_tokens)
            self.output_tokens = int(usage.get("completion_tokens") or 0)
        out = b""
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue  # the door asks for one choice
            delta = choice.get("delta") or {}
            if delta.get("reasoning_content") or delta.get(MESSAGE_FIELD):
                out += self._thinking(delta.get("reasoning_content"),
                                      list(delta.get(MESSAGE_FIELD) or ()))
            text = delta.get("content")
            if text:
                out += self._text(text)
            for call in delta.get("tool_calls") or ():
                out += self._tool(call)
            reason = choice.get("finish_reason")
            if reason is not None:
                stop = _stop(choice)
                self.stop_reason = stop["stop_reason"]
                self.stop_sequence = stop["stop_sequence"]
        return out

    def _flush(self) -> bytes:
        out = self._close()
        for pending in self._order:
            block = pending.block
            if block["type"] == "text":
                out += self._open_block("text", block)
                out += self._delta({"type": "text_delta", "text": "".join(pending.data)})
            else:
                out += self._open_block("tool", block)
                if pending.data:
                    out += self._delta({"type": "input_json_delta",
                                        "partial_json": "".join(pending.data)})
            out += self._close()
        self._order.clear()
        self._pending_tools.clear()
        self._pending_text = None
        return out

    def finish(self, x_aiproxy: dict[str, Any] | None = None) -> bytes:
        delta: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence},
            "usage": {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens},
        }
        if x_aiproxy is not None:
            delta["x_aiproxy"] = x_aiproxy
        return (self._flush() + named_event("message_delta", delta)
                + named_event("message_stop", {"type": "message_stop"}))

    @staticmethod
    def error(exc: MeshError) -> bytes:
        return named_event("error", error_envelope(exc))


# --------------------------------------------------------------------------- handlers
def anthropic_error_response(exc: MeshError, request_id: str, node_id: str) -> web.Response:
    """The HTTP answer for a MeshError at this door, in Anthropic's envelope."""
    headers = {"x-request-id": request_id, "request-id": request_id, "x-aiproxy-node": node_id}
    retry_after = retry_after_header(exc)
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    if exc.provider:
        headers["x-aiproxy-provider"] = exc.provider
    return JsonAnswer(orjson.dumps(error_envelope(exc)), status=exc.status, headers=headers)


def render_error(exc: MeshError, path: str, request_id: str, node_id: str) -> web.Response:
    """The answer for `exc` in the envelope the client at `path` parses: Anthropic's at this
    door (errors raised before its handler ran too: auth, limits, body size), else OpenAI's."""
    render = anthropic_error_response if path.startswith("/v1/messages") else error_response
    return render(exc, request_id, node_id)


def _check_model(state: ApiState, model: str) -> None:
    require_model(state, model, RequestKind.CHAT)


async def messages_handler(request: web.Request) -> web.StreamResponse:
    """`POST /v1/messages`: an Anthropic Messages request served by the router."""
    state = request.app[STATE]
    ctx = request[CONTEXT]
    ctx.kind = RequestKind.CHAT.value
    try:
        inference = parse_messages(
            await request.read(), request_id=ctx.request_id, timeout_s=state.timeout_s,
            headers=_aiproxy_headers(request), key_name=key_name_of(request),
            beta=request.headers.get("anthropic-beta"),
        )
        _check_model(state, inference.model)
        ctx.model = inference.model
        ctx.stream = inference.stream
        state.metrics.in_flight.inc()
        try:
            if inference.stream:
                return await _stream(request, state, inference)
            routed = await state.router.complete(inference)
        finally:
            state.metrics.in_flight.dec()
    except MeshError as exc:
        ctx.error_code = exc.code or exc.error_type
        ctx.error_provider = exc.provider
        return anthropic_error_response(exc, ctx.request_id, state.node_id)
    ctx.served = routed.served
    message = chat_to_message(routed.completion.body, inference.model, ctx.request_id)
    message["x_aiproxy"] = routed.served.to_json()
    headers = _served_headers(routed.served)
    headers["request-id"] = ctx.request_id
    return JsonAnswer(orjson.dumps(message), headers=headers)


async def _stream(
    request: web.Request, state: ApiState, inference: InferenceRequest
) -> web.StreamResponse:
    ctx = request[CONTEXT]
    response, routed = await open_event_stream(
        request, state, inference, cached=False, headers={"request-id": ctx.request_id})
    if routed is not None:
        writer = EventWriter(inference.model, ctx.request_id, inference.prompt_tokens_estimate)
        await sse.relay(response, routed, _Events(writer, routed.served, ctx.request_id), ctx)
    return response


class _Events:
    """The `EventEncoder` of this door: Anthropic's events (`EventWriter`) for chat chunks."""

    __slots__ = ("_request_id", "_served", "_writer")

    def __init__(self, writer: EventWriter, served: Served, request_id: str) -> None:
        self._writer = writer
        self._served = served
        self._request_id = request_id

    def start(self) -> bytes:
        return self._writer.start()

    def feed(self, chunk: StreamChunk) -> bytes:
        return self._writer.feed(chunk.data)

    def finish(self) -> bytes:
        return self._writer.finish(self._served.to_json())

    def fail(self, exc: BaseException) -> bytes:
        if not isinstance(exc, MeshError):
            exc = MeshError(internal_error_message(self._request_id))
        return self._writer.error(exc)


async def count_tokens_handler(request: web.Request) -> web.Response:
    """`POST /v1/messages/count_tokens`: an estimate (Claude Code asks before long requests)."""
    state = request.app[STATE]
    try:
        chat = messages_to_chat({"max_tokens": 1, **loads_body(await request.read())})
        _check_model(state, chat["model"])  # as Anthropic: an unknown model is a 404
    except MeshError as exc:
        return anthropic_error_response(exc, request[CONTEXT].request_id, state.node_id)
    tokens = estimate_prompt_tokens(RequestKind.CHAT, chat)
    return web.Response(body=orjson.dumps({"input_tokens": tokens}), content_type=JSON)


def is_anthropic_client(request: web.Request) -> bool:
    """The Anthropic SDKs (and Claude Code) always send `anthropic-version`."""
    return "anthropic-version" in request.headers


def models_page(models: list[dict[str, Any]]) -> dict[str, Any]:
    """`GET /v1/models` in Anthropic's shape (`models.list()` of the Anthropic SDK)."""
    data = [model_info(m) for m in models]
    return {"data": data, "has_more": False,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


def model_info(model: dict[str, Any]) -> dict[str, Any]:
    created = int(model.get("created") or 0)
    return {"type": "model", "id": str(model.get("id")), "display_name": str(model.get("id")),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))}


def add_anthropic_routes(app: web.Application) -> None:
    """Register the door's routes (a `RouteRegistrar` for `create_app(extra_routes=...)`)."""
    app.router.add_post("/v1/messages", messages_handler)
    app.router.add_post("/v1/messages/count_tokens", count_tokens_handler)


__all__ = [
    "EventWriter",
    "add_anthropic_routes",
    "is_anthropic_client",
    "model_info",
    "models_page",
    "anthropic_error_response",
    "chat_to_message",
    "count_tokens_handler",
    "messages_handler",
    "messages_to_chat",
    "parse_messages",
]
