"""The OpenAI wire format at the HTTP edge: request bodies in, `InferenceRequest` out.

This module owns validation of client bodies for `/v1/chat/completions`, `/v1/completions` and
`/v1/embeddings`. It is hand-rolled on purpose: it runs on every request, and a few `isinstance`
checks on the dict orjson already built cost far less than building pydantic models. Every
problem raises `InvalidRequest` with `param` naming the field (`messages[2].role`), which the
error layer turns into OpenAI's 400.

It also removes the fields some clients (LiteLLM-style SDKs) send to redirect traffic or
credentials (`api_base`, `base_url`, `api_key`, ...): a client never chooses where we send its
request or with whose key. The body is otherwise passed through untouched (tools,
response_format, seed, ...), and never mutated after this point (see `meshnode.types`).

It must not know about routing, providers or aiohttp.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson

from meshnode.errors import InvalidRequest
from meshnode.types import REDIRECT_FIELDS, InferenceRequest, RequestKind

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_OUTPUT_TOKENS = 1_000_000
MAX_N = 128
MAX_STOP = 4
MAX_EMBEDDING_INPUTS = 2048


def loads_body(raw: bytes) -> dict[str, Any]:
    """Parse a request body once; it must be a JSON object."""
    if not raw:
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON ({exc.msg})") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def strip_redirects(body: dict[str, Any]) -> dict[str, Any]:
    """The body without fields that would redirect traffic or credentials (copy only if any)."""
    if REDIRECT_FIELDS.isdisjoint(body):
        return body
    return {k: v for k, v in body.items() if k not in REDIRECT_FIELDS}


# --------------------------------------------------------------------------- field checks
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def type_name(value: Any) -> str:
    """A JSON value's type as error messages name it (`number`, `array` ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise InvalidRequest("you must provide a model parameter", param="model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest(
            f"'model' must be a non-empty string, got {type_name(model)}", param="model"
        )
    if len(model) > 256:
        raise InvalidRequest("'model' is too long (max 256 characters)", param="model")
    return model


def _optional_number(
    body: Mapping[str, Any], name: str, low: float, high: float
) -> None:
    value = body.get(name)
    if value is None:
        return
    if not _is_number(value):
        raise InvalidRequest(f"'{name}' must be a number, got {type_name(value)}", param=name)
    if not low <= value <= high:
        raise InvalidRequest(
            f"'{name}' must be between {low:g} and {high:g}, got {value}", param=name
        )


def _optional_int(body: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise InvalidRequest(f"'{name}' must be an integer, got {type_name(value)}", param=name)
    if not low <= value <= high:
        raise InvalidRequest(
            f"'{name}' must be between {low} and {high}, got {value}", param=name
        )
    return int(value)


def _optional_bool(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be a boolean, got {type_name(value)}", param=name)
    return value


def _optional_type(body: Mapping[str, Any], name: str, kind: type, kind_name: str) -> None:
    value = body.get(name)
    if value is not None and not isinstance(value, kind):
        raise InvalidRequest(
            f"'{name}' must be {kind_name}, got {type_name(value)}", param=name
        )


def _stop(body: Mapping[str, Any]) -> None:
    stop = body.get("stop")
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list):
        raise InvalidRequest(
            f"'stop' must be a string or an array of strings, got {type_name(stop)}",
            param="stop",
        )
    if len(stop) > MAX_STOP:
        raise InvalidRequest(f"'stop' takes at most {MAX_STOP} sequences", param="stop")
    for i, item in enumerate(stop):
        if not isinstance(item, str):
            raise InvalidRequest(f"'stop[{i}]' must be a string", param=f"stop[{i}]")


# The fields `_sampling` checks: a body with none of them (after the model and the messages,
# the common case is one or two) is passed by one set operation; each present one is checked
# in the order below (the first bad one is the error), an absent one costs a dict lookup.
_SAMPLING_FIELDS = frozenset({
    "max_tokens", "max_completion_tokens", "n", "temperature", "top_p", "presence_penalty",
    "frequency_penalty", "seed", "user", "logit_bias", "stop",
})


def _sampling(body: Mapping[str, Any], least_tokens: int = 1) -> int | None:
    """Checks shared by chat and completions; returns the output token bound, if any.
    `least_tokens`: legacy completions allow `max_tokens: 0` (OpenAI's minimum there, sent
    with `echo` + `logprobs` to score a prompt); chat wants at least one token."""
    if _SAMPLING_FIELDS.isdisjoint(body):
        return None
    max_tokens = max_completion = None
    if "max_tokens" in body:
        max_tokens = _optional_int(body, "max_tokens", least_tokens, MAX_OUTPUT_TOKENS)
    if "max_completion_tokens" in body:
        max_completion = _optional_int(body, "max_completion_tokens", least_tokens,
                                       MAX_OUTPUT_TOKENS)
    if "n" in body:
        _optional_int(body, "n", 1, MAX_N)
    if "temperature" in body:
        _optional_number(body, "temperature", 0.0, 2.0)
    if "top_p" in body:
        _optional_number(body, "top_p", 0.0, 1.0)
    if "presence_penalty" in body:
        _optional_number(body, "presence_penalty", -2.0, 2.0)
    if "frequency_penalty" in body:
        _optional_number(body, "frequency_penalty", -2.0, 2.0)
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise InvalidRequest(f"'seed' must be an integer, got {type_name(seed)}", param="seed")
    if "user" in body:
        _optional_type(body, "user", str, "a string")
    if "logit_bias" in body:
        _optional_type(body, "logit_bias", dict, "an object")
    if "stop" in body:
        _stop(body)
    return max_completion if max_completion is not None else max_tokens


def _stream_flags(body: Mapping[str, Any]) -> tuple[bool, bool]:
    if "stream" not in body and "stream_options" not in body:
        return False, False
    stream = _optional_bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise InvalidRequest(
                f"'stream_options' must be an object, got {type_name(options)}",
                param="stream_options",
            )
        usage = options.get("include_usage")
        if usage is not None and not isinstance(usage, bool):
            raise InvalidRequest(
                "'stream_options.include_usage' must be a boolean",
                param="stream_options.include_usage",
            )
        include_usage = bool(usage)
    return stream, include_usage and stream


def _content_chars(content: Any, where: str) -> int:
    """Validates one message's content; returns its text length (for a token estimate)."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        total = 0
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise InvalidRequest(
                    f"'{where}[{j}]' must be an object, got {type_name(part)}",
                    param=f"{where}[{j}]",
                )
            if not isinstance(part.get("type"), str):
                raise InvalidRequest(
                    f"'{where}[{j}].type' must be a string", param=f"{where}[{j}].type"
                )
            text = part.get("text")
            if isinstance(text, str):
                total += len(text)
        return total
    raise InvalidRequest(
        f"'{where}' must be a string or an array of content parts, got {type_name(content)}",
        param=where,
    )


def _messages(body: Mapping[str, Any]) -> int:
    """Validates `messages`; returns the number of text characters in them."""
    messages = body.get("messages")
    if messages is None:
        raise InvalidRequest("'messages' is required", param="messages")
    if not isinstance(messages, list):
        raise InvalidRequest(
            f"'messages' must be an array, got {type_name(messages)}", param="messages"
        )
    if not messages:
        raise InvalidRequest("'messages' must contain at least one message", param="messages")
    chars = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(
                f"'messages[{i}]' must be an object, got {type_name(message)}",
                param=f"messages[{i}]",
            )
        role = message.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            got = repr(role) if isinstance(role, str) else type_name(role)
            raise InvalidRequest(
                f"'messages[{i}].role' must be one of {', '.join(sorted(CHAT_ROLES))}, got {got}",
                param=f"messages[{i}].role",
            )
        content = message.get("content")
        if content is None:
            # An assistant turn that only calls tools has no content; every other turn has.
            if role == "assistant" and (message.get("tool_calls") or message.get("function_call")):
                continue
            raise InvalidRequest(
                f"'messages[{i}].content' is required for role {role!r}",
                param=f"messages[{i}].content",
            )
        if isinstance(content, str):
            chars += len(content)
        else:
            chars += _content_chars(content, f"messages[{i}].content")
    return chars


def _tools(body: Mapping[str, Any]) -> None:
    if "response_format" in body:
        _optional_type(body, "response_format", dict, "an object")
    tools = body.get("tools")
    if tools is None:
        return
    if not isinstance(tools, list):
        raise InvalidRequest(f"'tools' must be an array, got {type_name(tools)}", param="tools")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise InvalidRequest(f"'tools[{i}]' must be an object", param=f"tools[{i}]")
    choice = body.get("tool_choice")
    if choice is not None and not isinstance(choice, (str, dict)):
        raise InvalidRequest("'tool_choice' must be a string or an object", param="tool_choice")


# --------------------------------------------------------------------------- endpoints
def _request(
    kind: RequestKind,
    body: dict[str, Any],
    model: str,
    *,
    request_id: str,
    deadline: float,
    headers: dict[str, str],
    key_name: str | None,
    stream: bool = False,
    include_usage: bool = False,
    prompt_chars: int = 0,
    max_output_tokens: int | None = None,
) -> InferenceRequest:
    # By position, in the fields' order (test_protocol pins it): a class called with keywords
    # packs them into a dict for its `__init__` (~4k instructions per request).
    return InferenceRequest(
        kind,
        model,
        strip_redirects(body),  # body
        request_id,
        deadline,
        stream,
        include_usage,
        key_name,
        headers,
        (),  # visited
        # prompt_tokens_estimate: ~4 characters per token, good enough for budgets and policies
        # before usage is known.
        prompt_chars // 4 + 1,
        max_output_tokens,
    )


def parse_chat(
    body: dict[str, Any],
    *,
    request_id: str,
    deadline: float,
    headers: dict[str, str] | None = None,
    key_name: str | None = None,
) -> InferenceRequest:
    """Validate a `/v1/chat/completions` body."""
    model = _model(body)
    chars = _messages(body)
    max_out = _sampling(body)
    if "tools" in body or "response_format" in body:
        _tools(body)
    if "logprobs" in body:
        _optional_bool(body, "logprobs")
    if "top_logprobs" in body:
        _optional_int(body, "top_logprobs", 0, 20)
    stream, include_usage = _stream_flags(body)
    return _request(
        RequestKind.CHAT, body, model, request_id=request_id, deadline=deadline,
        headers=headers or {}, key_name=key_name, stream=stream, include_usage=include_usage,
        prompt_chars=chars, max_output_tokens=max_out,
    )


def _token_chars(value: list[Any]) -> int | None:
    """A prompt or input given as token ids (or arrays of them), sized like text (~4 chars a
    token); None when it is not token ids."""
    if all(_is_int(v) for v in value):
        return 4 * len(value)
    if all(isinstance(v, list) and v and all(_is_int(t) for t in v) for v in value):
        return 4 * sum(len(v) for v in value)
    return None


def _not_text_or_tokens(param: str) -> InvalidRequest:
    return InvalidRequest(
        f"'{param}' must be a string, an array of strings, an array of token ids "
        "or an array of token id arrays",
        param=param,
    )


def _prompt_chars(prompt: Any) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return sum(len(p) for p in prompt)
        tokens = _token_chars(prompt)
        if tokens is not None:
            return tokens
    raise _not_text_or_tokens("prompt")


def parse_completion(
    body: dict[str, Any],
    *,
    request_id: str,
    deadline: float,
    headers: dict[str, str] | None = None,
    key_name: str | None = None,
) -> InferenceRequest:
    """Validate a `/v1/completions` body."""
    model = _model(body)
    if body.get("prompt") is None:
        raise InvalidRequest("'prompt' is required", param="prompt")
    chars = _prompt_chars(body["prompt"])
    max_out = _sampling(body, least_tokens=0)
    _optional_int(body, "best_of", 1, MAX_N)
    _optional_int(body, "logprobs", 0, 5)
    _optional_bool(body, "echo")
    _optional_type(body, "suffix", str, "a string")
    stream, include_usage = _stream_flags(body)
    return _request(
        RequestKind.COMPLETION, body, model, request_id=request_id, deadline=deadline,
        headers=headers or {}, key_name=key_name, stream=stream, include_usage=include_usage,
        prompt_chars=chars, max_output_tokens=max_out,
    )


def _input_chars(value: Any) -> int:
    if isinstance(value, str):
        if not value:
            raise InvalidRequest("'input' must not be an empty string", param="input")
        return len(value)
    if isinstance(value, list):
        if not value:
            raise InvalidRequest("'input' must not be an empty array", param="input")
        if len(value) > MAX_EMBEDDING_INPUTS:
            raise InvalidRequest(
                f"'input' takes at most {MAX_EMBEDDING_INPUTS} items", param="input"
            )
        if all(isinstance(v, str) for v in value):
            for i, v in enumerate(value):
                if not v:
                    raise InvalidRequest(
                        f"'input[{i}]' must not be an empty string", param=f"input[{i}]"
                    )
            return sum(len(v) for v in value)
        tokens = _token_chars(value)
        if tokens is not None:
            return tokens
    raise _not_text_or_tokens("input")


def parse_embedding(
    body: dict[str, Any],
    *,
    request_id: str,
    deadline: float,
    headers: dict[str, str] | None = None,
    key_name: str | None = None,
) -> InferenceRequest:
    """Validate a `/v1/embeddings` body."""
    model = _model(body)
    if "input" not in body or body["input"] is None:
        raise InvalidRequest("'input' is required", param="input")
    chars = _input_chars(body["input"])
    encoding = body.get("encoding_format")
    if encoding is not None and encoding not in ("float", "base64"):
        raise InvalidRequest(
            "'encoding_format' must be 'float' or 'base64'", param="encoding_format"
        )
    _optional_int(body, "dimensions", 1, 65536)
    _optional_type(body, "user", str, "a string")
    return _request(
        RequestKind.EMBEDDING, body, model, request_id=request_id, deadline=deadline,
        headers=headers or {}, key_name=key_name, prompt_chars=chars,
    )


PARSERS = {
    RequestKind.CHAT: parse_chat,
    RequestKind.COMPLETION: parse_completion,
    RequestKind.EMBEDDING: parse_embedding,
}


def parse_request(
    kind: RequestKind,
    raw: bytes,
    *,
    request_id: str,
    timeout_s: float,
    headers: dict[str, str] | None = None,
    key_name: str | None = None,
) -> InferenceRequest:
    """Parse and validate a raw body for `kind`; the deadline is now + `timeout_s`."""
    body = loads_body(raw)
    return PARSERS[kind](
        body,
        request_id=request_id,
        deadline=time.monotonic() + timeout_s,
        headers=headers,
        key_name=key_name,
    )
