"""The Anthropic adapter: OpenAI chat requests served by Anthropic's Messages API.

This module owns the translation between OpenAI's chat wire and Anthropic's Messages wire, both
ways, whole answers and streams, and the `AnthropicProvider` that speaks it over HTTP. It does not
own HTTP mechanics (sessions, status -> MeshError, SSE framing): those live in
`meshnode.providers.http` and are shared with every adapter.

Request (OpenAI -> Anthropic): `system`/`developer` messages are lifted into `system`; `tool`
messages become `tool_result` blocks in a user turn; consecutive turns of one role are merged
(Anthropic wants user/assistant alternation); `max_tokens` is required there, so it defaults to
`DEFAULT_MAX_TOKENS`; `stop` becomes `stop_sequences`; tools, `tool_choice` and image parts are
translated. Answer (Anthropic -> OpenAI): text and `tool_use` blocks become `content` and
`tool_calls`, `stop_reason` becomes `finish_reason`, usage is copied.

Streaming: each Anthropic SSE event becomes zero or more OpenAI chunks the moment it arrives. The
first chunk is emitted only with the first piece of content (not on `message_start`), so an
`overloaded_error` event right after `message_start` still lets the router fail over.

Errors: HTTP 429 and 529 (`overloaded_error`) and 5xx are retryable elsewhere; 400 and 401/403
are not (the request or the operator's key is wrong, another provider would not help). An
`error` event inside a 200 stream is mapped by its `error.type` the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import aiohttp
import orjson

from meshnode.config import ResolvedProvider, TimeoutsConfig
from meshnode.errors import (
    InvalidRequest,
    MeshError,
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from meshnode.providers.anthropic_extensions import MESSAGE_FIELD, PART_FIELD
from meshnode.providers.base import Provider
from meshnode.providers.content import content_text
from meshnode.providers.http import (
    STREAM_ACCEPT,
    HttpUpstream,
    as_stream_broken,
    iter_sse,
    request_id_headers,
)
from meshnode.providers.registry import ProviderContext
from meshnode.types import (
    Completion,
    InferenceRequest,
    ModelOffer,
    RequestKind,
    StreamChunk,
    Usage,
)

log = logging.getLogger(__name__)

ANTHROPIC_VERSION = "2023-06-01"
# Anthropic requires max_tokens; OpenAI clients usually leave it out. 4096 is the largest value
# every current Claude model accepts, so it never turns a valid request into a 400.
DEFAULT_MAX_TOKENS = 4096

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# Anthropic error `type` -> our error class. `overloaded_error` (HTTP 529) and `api_error` are
# the upstream's trouble, so another provider may serve; request and key errors are not.
_ERROR_TYPES: dict[str, type[MeshError]] = {
    "invalid_request_error": UpstreamBadRequest,
    "not_found_error": UpstreamBadRequest,
    "request_too_large": UpstreamBadRequest,
    "authentication_error": UpstreamAuthError,
    "permission_error": UpstreamAuthError,
    "rate_limit_error": UpstreamRateLimited,
    "overloaded_error": UpstreamUnavailable,
    "api_error": UpstreamUnavailable,
    "timeout_error": UpstreamUnavailable,
}


def error_from_anthropic(
    body: Any, provider: str, retry_after: float | None = None
) -> MeshError:
    """Map an Anthropic error envelope (`{"type": "error", "error": {"type", "message"}}`)."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return UpstreamUnavailable("anthropic: unreadable error event", provider=provider)
    kind = str(err.get("type") or "api_error")
    message = f"anthropic {kind}: {err.get('message') or 'no message'}"
    cls = _ERROR_TYPES.get(kind, UpstreamUnavailable)
    return cls(message, provider=provider, retry_after=retry_after)


# --------------------------------------------------------------------------- request


def _image_block(part: dict[str, Any], where: str) -> dict[str, Any]:
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise InvalidRequest("image_url.url is required", param=f"{where}.image_url.url")
    if url.startswith("data:"):
        # data:<media type>;base64,<data>
        header, _, data = url.partition(",")
        media_type = header[5:].split(";", 1)[0]
        if ";base64" not in header or not data or not media_type:
            raise InvalidRequest(
                "image data URLs must be base64 (data:image/png;base64,...)",
                param=f"{where}.image_url.url",
            )
        return _cached(part, {
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        })
    return _cached(part, {"type": "image", "source": {"type": "url", "url": url}})


def _cached(part: Mapping[str, Any], block: dict[str, Any]) -> dict[str, Any]:
    """`block` with the part's `cache_control` (the door's prompt-caching marks)."""
    mark = part.get(PART_FIELD)
    if isinstance(mark, dict):
        block[PART_FIELD] = mark
    return block


def _text_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    """Text content -> text blocks, one per part when a part carries `cache_control` (so the
    mark stays on its block), else one block."""
    if isinstance(content, list) and any(
            isinstance(p, dict) and PART_FIELD in p for p in content):
        content_text(content, where)  # validates: text parts only
        return [_cached(p, {"type": "text", "text": str(p.get("text", ""))})
                for p in content if p.get("text")]
    text = content if isinstance(content, str) else content_text(content, where)
    return [{"type": "text", "text": text}] if text else []


def _user_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise InvalidRequest(
            "content must be a string or a list of parts", param=f"{where}.content"
        )
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = str(part.get("text", ""))
            if text:
                blocks.append(_cached(part, {"type": "text", "text": text}))
        elif kind == "image_url":
            blocks.append(_image_block(part, f"{where}.content[{j}]"))
        else:
            raise InvalidRequest(
                f"content part type {kind!r} is not supported by this provider",
                param=f"{where}.content[{j}]",
            )
    return blocks


def _assistant_blocks(message: dict[str, Any], where: str) -> list[dict[str, Any]]:
    # Thinking blocks (with their signatures) come first, as Anthropic sent them.
    blocks: list[dict[str, Any]] = [
        dict(b) for b in message.get(MESSAGE_FIELD) or ()
        if isinstance(b, dict) and b.get("type") in ("thinking", "redacted_thinking")]
    blocks.extend(_text_blocks(message.get("content"), where))
    for j, call in enumerate(message.get("tool_calls") or ()):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not function.get("name"):
            raise InvalidRequest(
                "a tool call needs function.name", param=f"{where}.tool_calls[{j}]"
            )
        arguments = function.get("arguments") or "{}"
        try:
            tool_input = orjson.loads(arguments) if isinstance(arguments, str) else arguments
        except orjson.JSONDecodeError:
            raise InvalidRequest(
                "tool call arguments must be a JSON object",
                param=f"{where}.tool_calls[{j}].function.arguments",
            ) from None
        if not isinstance(tool_input, dict):
            raise InvalidRequest(
                "tool call arguments must be a JSON object",
                param=f"{where}.tool_calls[{j}].function.arguments",
            )
        blocks.append(
            {
                "type": "tool_use",
                "id": str(call.get("id") or f"toolu_{j}"),
                "name": function["name"],
                "input": tool_input,
            }
        )
    return blocks


def _tool_result_block(message: dict[str, Any], where: str) -> dict[str, Any]:
    call_id = message.get("tool_call_id")
    if not call_id:
        raise InvalidRequest("a tool message needs tool_call_id", param=f"{where}.tool_call_id")
    content = message.get("content")
    block = {
        "type": "tool_result",
        "tool_use_id": str(call_id),
        "content": content_text(content, where),
    }
    for part in content if isinstance(content, list) else ():
        if isinstance(part, dict) and isinstance(part.get(PART_FIELD), dict):
            block[PART_FIELD] = part[PART_FIELD]
    return block


def _merge_turns(turns: list[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Merge consecutive same-role turns; tool results lead their user turn (Anthropic asks
    that `tool_result` blocks come first after a `tool_use`)."""
    merged: list[dict[str, Any]] = []
    for role, blocks in turns:
        if not blocks:
            continue
        if merged and merged[-1]["role"] == role:
            merged[-1]["content"].extend(blocks)
        else:
            merged.append({"role": role, "content": list(blocks)})
    for message in merged:
        content = message["content"]
        if message["role"] == "user" and any(b["type"] == "tool_result" for b in content):
            content.sort(key=lambda b: b["type"] != "tool_result")
        elif len(content) == 1 and content[0]["type"] == "text" and PART_FIELD not in content[0]:
            # A plain string is the common, cheapest form on the wire.
            message["content"] = content[0]["text"]
    return merged


def _tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(body.get("tools") or ()):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not function.get("name"):
            raise InvalidRequest("a tool needs function.name", param=f"tools[{i}].function")
        entry: dict[str, Any] = {
            "name": function["name"],
            "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
        }
        if function.get("description"):
            entry["description"] = function["description"]
        if isinstance(tool.get(PART_FIELD), dict):
            entry[PART_FIELD] = tool[PART_FIELD]
        out.append(entry)
    return out


def _tool_choice(body: dict[str, Any]) -> dict[str, Any] | None:
    choice = body.get("tool_choice")
    out: dict[str, Any] | None
    if choice is None:
        out = None
    elif choice == "auto":
        out = {"type": "auto"}
    elif choice == "none":
        out = {"type": "none"}
    elif choice == "required":
        out = {"type": "any"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        out = {"type": "tool", "name": choice["function"].get("name")}
    else:
        raise InvalidRequest("tool_choice is not understood", param="tool_choice")
    if body.get("parallel_tool_calls") is False and (out is None or out["type"] != "none"):
        out = {**(out or {"type": "auto"}), "disable_parallel_tool_use": True}
    return out


def chat_to_anthropic(
    body: dict[str, Any], upstream_model: str, *, stream: bool, max_tokens: int | None = None
) -> dict[str, Any]:
    """An OpenAI chat request body -> an Anthropic Messages request body."""
    if (body.get("n") or 1) != 1:
        raise InvalidRequest("this provider returns one choice only (n must be 1)", param="n")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", param="messages")
    system: list[dict[str, Any]] = []
    turns: list[tuple[str, list[dict[str, Any]]]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            system.extend(_text_blocks(message.get("content"), where))
        elif role == "user":
            turns.append(("user", _user_blocks(message.get("content"), where)))
        elif role == "assistant":
            turns.append(("assistant", _assistant_blocks(message, where)))
        elif role == "tool":
            turns.append(("user", [_tool_result_block(message, where)]))
        else:
            raise InvalidRequest(f"unsupported message role {role!r}", param=f"{where}.role")
    out: dict[str, Any] = {
        "model": upstream_model,
        "messages": _merge_turns(turns),
        "max_tokens": (
            body.get("max_completion_tokens")
            or body.get("max_tokens")
            or max_tokens
            or DEFAULT_MAX_TOKENS
        ),
    }
    if not out["messages"]:
        raise InvalidRequest("messages holds no user or assistant content", param="messages")
    if system:
        if any(PART_FIELD in block for block in system):
            out["system"] = system  # blocks: the cache marks stay where the client put them
        else:
            out["system"] = "\n\n".join(block["text"] for block in system)
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if body.get("temperature") is not None:
        # OpenAI allows 0..2, Anthropic 0..1: clamp rather than fail a request another
        # provider in the chain would have served.
        out["temperature"] = min(float(body["temperature"]), 1.0)
    if body.get("top_p") is not None:
        out["top_p"] = body["top_p"]
    if body.get("top_k") is not None:
        out["top_k"] = body["top_k"]
    if isinstance(body.get("thinking"), dict):
        out["thinking"] = body["thinking"]
    output_config = _output_config(body)
    if output_config:
        out["output_config"] = output_config
    tools = _tools(body)
    if tools:
        out["tools"] = tools
        choice = _tool_choice(body)
        if choice is not None:
            out["tool_choice"] = choice
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    if stream:
        out["stream"] = True
    return out


def _output_config(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """Anthropic's `output_config`: as the door passed it, else built from an OpenAI
    `response_format` json_schema (structured output)."""
    given = body.get("output_config")
    if isinstance(given, dict):
        return given
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema") or {}
        if isinstance(spec.get("schema"), dict):
            return {"format": {"type": "json_schema", "schema": spec["schema"]}}
    return None


def request_headers(request_body: Mapping[str, Any], request_id: str) -> dict[str, str]:
    """Per-call headers: the client's `anthropic-beta` values (the door put them in the body)
    and our request id (so the upstream's logs can be matched with ours)."""
    headers = request_id_headers(request_id)
    beta = request_body.get("anthropic_beta")
    if isinstance(beta, list) and beta and all(isinstance(b, str) for b in beta):
        headers["anthropic-beta"] = ",".join(beta)
    return headers


# --------------------------------------------------------------------------- answer
def usage_from_anthropic(usage: Any) -> Usage:
    """Anthropic splits cached input out of `input_tokens`; OpenAI's prompt_tokens counts all."""
    if not isinstance(usage, dict):
        return Usage()
    prompt = (
        int(usage.get("input_tokens") or 0)
        + int(usage.get("cache_creation_input_tokens") or 0)
        + int(usage.get("cache_read_input_tokens") or 0)
    )
    return Usage(prompt_tokens=prompt, completion_tokens=int(usage.get("output_tokens") or 0))


def anthropic_to_chat(answer: dict[str, Any], model: str) -> tuple[dict[str, Any], Usage]:
    """An Anthropic Messages answer -> an OpenAI chat.completion body (no x_aiproxy) + usage."""
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    thinking: list[dict[str, Any]] = []
    for block in answer.get("content") or ():
        kind = block.get("type")
        if kind in ("thinking", "redacted_thinking"):
            thinking.append(block)
        elif kind == "text":
            texts.append(block.get("text", ""))
        elif kind == "tool_use":
            tool_calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {
                        "name": block.get("name"),
                        "arguments": orjson.dumps(block.get("input") or {}).decode(),
                    },
                }
            )
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None,
                               "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    elif message["content"] is None:
        message["content"] = ""
    if thinking:
        message[MESSAGE_FIELD] = thinking
        message["reasoning_content"] = "".join(
            str(b.get("thinking", "")) for b in thinking if b.get("type") == "thinking")
    usage = usage_from_anthropic(answer.get("usage"))
    choice: dict[str, Any] = {
        "index": 0,
        "message": message,
        "finish_reason": FINISH_REASONS.get(str(answer.get("stop_reason")), "stop"),
        "logprobs": None,
    }
    if answer.get("stop_reason") == "stop_sequence" and answer.get("stop_sequence"):
        choice["stop_reason"] = str(answer["stop_sequence"])  # which one fired (vLLM's field)
    body = {
        "id": str(answer.get("id") or "msg"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage.to_openai(),
    }
    return body, usage


# --------------------------------------------------------------------------- stream
class StreamTranslator:
    """Turns Anthropic stream events into OpenAI `chat.completion.chunk` dicts, one event at a
    time. `feed()` returns the chunks to send now; `usage` holds the counts seen so far and
    `done` turns true on `message_stop`.

    Raises a MeshError on an `error` event; the caller decides whether it is still retryable
    (nothing sent yet) or a broken stream.
    """

    def __init__(self, model: str, provider: str) -> None:
        self.model = model
        self.provider = provider
        self.id = "msg"
        self.created = int(time.time())
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.done = False
        self._sent_role = False
        self._tool_index: dict[int, int] = {}  # Anthropic block index -> OpenAI tool index

    @property
    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens)

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        if not self._sent_role:
            self._sent_role = True
            delta = {"role": "assistant", **delta}
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [
                {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            ],
        }

    def usage_chunk(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": self.usage.to_openai(),
        }

    def feed(self, event: str | None, data: dict[str, Any]) -> list[dict[str, Any]]:
        kind = data.get("type") or event
        if kind == "content_block_delta":
            delta = data.get("delta") or {}
            dtype = delta.get("type")
            if dtype == "text_delta":
                text = delta.get("text") or ""
                return [self._chunk({"content": text})] if text else []
            if dtype == "thinking_delta":
                text = delta.get("thinking") or ""
                return [self._chunk({"reasoning_content": text})] if text else []
            if dtype == "signature_delta":
                block = {"type": "thinking", "thinking": "", "signature": delta.get("signature")}
                return [self._chunk({MESSAGE_FIELD: [block]})]
            if dtype == "input_json_delta":
                index = self._tool_index.get(int(data.get("index", -1)))
                partial = delta.get("partial_json") or ""
                if index is None or not partial:
                    return []
                return [
                    self._chunk(
                        {"tool_calls": [{"index": index, "function": {"arguments": partial}}]}
                    )
                ]
            return []  # thinking / signature / citations: no OpenAI equivalent
        if kind == "content_block_start":
            block = data.get("content_block") or {}
            if block.get("type") == "tool_use":
                index = len(self._tool_index)
                self._tool_index[int(data.get("index", -1))] = index
                call = {
                    "index": index,
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""},
                }
                return [self._chunk({"tool_calls": [call]})]
            if block.get("type") == "text" and block.get("text"):
                return [self._chunk({"content": block["text"]})]
            if block.get("type") == "redacted_thinking":
                return [self._chunk({MESSAGE_FIELD: [block]})]
            return []
        if kind == "message_start":
            message = data.get("message") or {}
            self.id = str(message.get("id") or self.id)
            started = usage_from_anthropic(message.get("usage"))
            self.prompt_tokens = started.prompt_tokens
            self.completion_tokens = started.completion_tokens
            return []
        if kind == "message_delta":
            usage = data.get("usage")
            if isinstance(usage, dict):
                # message_delta counts are cumulative; input appears there in newer versions.
                if usage.get("input_tokens") is not None:
                    self.prompt_tokens = usage_from_anthropic(usage).prompt_tokens
                if usage.get("output_tokens") is not None:
                    self.completion_tokens = int(usage["output_tokens"])
            delta = data.get("delta") or {}
            stop_reason = delta.get("stop_reason")
            if stop_reason is None:
                return []
            chunk = self._chunk({}, FINISH_REASONS.get(str(stop_reason), "stop"))
            if stop_reason == "stop_sequence" and delta.get("stop_sequence"):
                chunk["choices"][0]["stop_reason"] = str(delta["stop_sequence"])
            return [chunk]
        if kind == "message_stop":
            self.done = True
            return [self.usage_chunk()]
        if kind == "error":
            raise error_from_anthropic(data, self.provider)
        return []  # ping, content_block_stop, and events added to the API later


# --------------------------------------------------------------------------- the provider
class AnthropicProvider(Provider):
    """Serves chat models through `POST {base_url}/v1/messages`.

    Credentials: `credentials.api_key` (sent as `x-api-key`). `headers` from the config are added
    to every call (e.g. `anthropic-beta`). One keep-alive session for the provider's lifetime.
    """

    enforces_deadline = True  # every upstream call carries the request's deadline
    fixed_offers = True  # made from the config in __init__, never changed

    def __init__(self, resolved: ResolvedProvider, ctx: ProviderContext) -> None:
        self.name = resolved.name
        self.kind = resolved.type
        config = resolved.config
        api_key = config.credentials.get("api_key", "")
        # Like every cloud adapter: an empty key (its variable unset) disables the provider
        # with a warning instead of stopping the node; /health/ready says why.
        self.disabled_reason: str | None = None
        if not api_key:
            self.disabled_reason = (
                f"providers.{resolved.name}.credentials.api_key is empty (is "
                "ANTHROPIC_API_KEY set?); this provider serves nothing"
            )
            log.warning("provider %s disabled: %s", resolved.name, self.disabled_reason)
        base_url = (resolved.base_url or "https://api.anthropic.com").rstrip("/")
        # Accept both spellings: the SDK's `https://api.anthropic.com` and `.../v1`.
        self._path = "/messages" if base_url.endswith("/v1") else "/v1/messages"
        self._http = HttpUpstream(
            provider=resolved.name,
            base_url=base_url,
            headers={
                "x-api-key": api_key,
                "anthropic-version": ANTHROPIC_VERSION,
                **config.headers,
            },
            secrets=[api_key],
            max_concurrency=config.max_concurrency,
        )
        self._offers = [
            ModelOffer(
                model=model.name,
                provider=resolved.name,
                provider_kind=resolved.type,
                upstream_model=model.anthropic_model or model.name,
                kinds=frozenset({RequestKind.CHAT}),
                cost_per_1k_input=model.input_price,
                cost_per_1k_output=model.output_price,
                priority=config.priority,
                max_context_tokens=model.max_context_tokens,
            )
            for model in config.models
            if model.kind == "chat" and self.disabled_reason is None
        ]

    def offers(self) -> Sequence[ModelOffer]:
        return self._offers

    def ready(self) -> tuple[bool, str]:
        if self.disabled_reason is not None:
            return False, self.disabled_reason
        return True, ""

    async def start(self) -> None:
        if self.disabled_reason is None:
            await self._http.start()

    async def close(self) -> None:
        await self._http.close()

    def _payload(self, request: InferenceRequest, offer: ModelOffer, stream: bool) -> bytes:
        if request.kind is not RequestKind.CHAT:
            raise InvalidRequest(
                f"{self.name} serves chat requests only, not {request.kind.value}"
            )
        body = chat_to_anthropic(
            request.body, offer.upstream_model, stream=stream,
            max_tokens=request.max_output_tokens,
        )
        return orjson.dumps(body)

    async def complete(
        self, request: InferenceRequest, offer: ModelOffer, timeouts: TimeoutsConfig
    ) -> Completion:
        payload = self._payload(request, offer, stream=False)
        answer = await self._http.post_json(
            self._path, payload, deadline=request.deadline, timeouts=timeouts,
            headers=request_headers(request.body, request.request_id),
        )
        if answer.get("type") == "error":
            raise error_from_anthropic(answer, self.name)
        body, usage = anthropic_to_chat(answer, request.model)
        return Completion(body=body, usage=usage)

    async def stream(
        self, request: InferenceRequest, offer: ModelOffer, timeouts: TimeoutsConfig
    ) -> AsyncIterator[StreamChunk]:
        payload = self._payload(request, offer, stream=True)
        translator = StreamTranslator(request.model, self.name)
        yielded = False
        try:
            headers = {**STREAM_ACCEPT, **request_headers(request.body, request.request_id)}
            async with self._http.stream(
                self._path, payload, deadline=request.deadline, timeouts=timeouts,
                headers=headers,
            ) as response:
                async for event in iter_sse(response):
                    try:
                        data = orjson.loads(event.data)
                    except orjson.JSONDecodeError:
                        raise UpstreamUnavailable(
                            f"{self.name} sent a stream event that is not JSON",
                            provider=self.name,
                        ) from None
                    for chunk in translator.feed(event.event, data):
                        usage = translator.usage if not chunk["choices"] else None
                        yielded = True
                        yield StreamChunk(chunk, usage=usage)
            if not translator.done:
                raise UpstreamUnavailable(
                    f"{self.name} ended the stream before message_stop", provider=self.name
                )
        except MeshError as exc:
            raise as_stream_broken(exc) if yielded else exc from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            error = self._http.error_for_exception(exc, request.deadline)
            raise as_stream_broken(error) if yielded else error from exc


__all__ = [
    "ANTHROPIC_VERSION",
    "AnthropicProvider",
    "DEFAULT_MAX_TOKENS",
    "FINISH_REASONS",
    "StreamTranslator",
    "anthropic_to_chat",
    "chat_to_anthropic",
    "error_from_anthropic",
    "usage_from_anthropic",
]

