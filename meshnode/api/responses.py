"""OpenAI's Responses API translated through chat completions: request bodies in, chat bodies
out; chat answers and chat stream chunks in, Response objects and Response stream events out.

Every model of the mesh answers `POST /v1/responses` this way: the Responses request is turned
into one chat request (validated by `meshnode.api.protocol.parse_chat` like any other) and routed
by the same router to local workers, cloud adapters or peers; the chat answer comes back as a
`response` object. What is translated:

- `input` (a string, or items: messages with `input_text`/`input_image`/`output_text` parts,
  `function_call`, `function_call_output`, `custom_tool_call`, `custom_tool_call_output`,
  `reasoning`), `instructions` (a string or items, first), `tools` (function tools; custom
  (freeform) tools, as Codex's apply_patch, served as a function taking one string, their
  grammar given to the model in the description), `tool_choice`, `parallel_tool_calls`,
  `text.format` (`text`, `json_object`, `json_schema`), `max_output_tokens`, `temperature`,
  `top_p`, `user`/`safety_identifier`, `top_logprobs` (chat logprobs);
- the answer's reasoning (`reasoning_content`, Anthropic's signed thinking in
  `encrypted_content`, see `_THINKING_PREFIX`), text and tool calls become `reasoning`,
  `message`, `function_call` and `custom_tool_call` output items; a `length` finish is
  `status: incomplete` with `incomplete_details.reason: max_output_tokens`.

What is refused with a 400 naming the parameter: hosted tools (web search, file search,
computer use, MCP, ...), `background`, `conversation`, `prompt` templates, `max_tool_calls`,
`item_reference` items, file inputs, and unknown parameters (as OpenAI does).

This module is pure: no HTTP, no routing, no storage (`meshnode.api.responses_http` does those,
`meshnode.responses_store` keeps stored responses). `history` given to `to_chat` is the stored
conversation of `previous_response_id` (its input items and output items, in order).
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from meshnode.api.protocol import type_name as _type_name
from meshnode.api.sse import named_event
from meshnode.errors import InvalidRequest, MeshError
from meshnode.providers.anthropic_extensions import MESSAGE_FIELD
from meshnode.types import REDIRECT_FIELDS

MAX_OUTPUT_TOKENS = 1_000_000
# Parameters of CreateResponse that are accepted. Those in _IGNORED change nothing about the
# answer (caching hints, tiers, obfuscation padding, reasoning effort for models without it);
# they are accepted so that clients which always send them (Codex, the Agents SDK) work.
_ACCEPTED = frozenset({
    "model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "text",
    "max_output_tokens", "temperature", "top_p", "stream", "store", "previous_response_id",
    "metadata", "user", "safety_identifier", "truncation", "reasoning", "include",
    "service_tier", "prompt_cache_key", "stream_options", "top_logprobs", "max_tool_calls",
    "background", "conversation", "prompt", "prompt_cache_retention",
})
_REFUSED_VALUES = ("background", "conversation", "prompt", "max_tool_calls")
_NULLABLE_ECHO = frozenset({"instructions", "max_output_tokens", "previous_response_id",
                            "reasoning"})
_LOGPROBS = "message.output_text.logprobs"  # the `include` value that asks for them
_TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


def new_id(prefix: str) -> str:
    return f"{prefix}_{os.urandom(12).hex()}"


# --------------------------------------------------------------------------- the request
@dataclass(frozen=True, slots=True)
class ResponsesCall:
    """A validated `POST /v1/responses` body, split into what the chat request needs and what
    the response object echoes."""

    body: dict[str, Any]  # the client's body, redirect fields stripped
    model: str
    items: list[dict[str, Any]]  # this call's input as items (a string input made one)
    stream: bool
    store: bool
    previous_response_id: str | None
    echo: dict[str, Any] = field(default_factory=dict)  # fields the response object repeats
    custom_tools: frozenset[str] = frozenset()  # names of `custom` (freeform) tools


def _number(body: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"'{name}' must be a number, got {_type_name(value)}", param=name)
    if not low <= value <= high:
        raise InvalidRequest(f"'{name}' must be between {low:g} and {high:g}, got {value}",
                             param=name)
    return float(value)


def _bool(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be a boolean, got {_type_name(value)}", param=name)
    return value


def _optional_str(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(f"'{name}' must be a string, got {_type_name(value)}", param=name)
    return value


def _items(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list):
        raise InvalidRequest(
            f"'input' must be a string or an array of items, got {_type_name(value)}",
            param="input")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise InvalidRequest(f"'input[{i}]' must be an object, got {_type_name(item)}",
                                 param=f"input[{i}]")
    return value


# A custom (freeform) tool is served as a function with one string argument: every chat
# model can call it, and the string is handed back as the custom tool call's `input`.
_CUSTOM_PARAMETERS = {"type": "object", "properties": {"input": {
    "type": "string", "description": "The tool's whole input, as free text."}},
    "required": ["input"], "additionalProperties": False}


def _custom_description(tool: dict[str, Any]) -> str:
    description = str(tool.get("description") or "")
    fmt = tool.get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "grammar" and fmt.get("definition"):
        description += (f"\nThe input must follow this {fmt.get('syntax', 'grammar')} grammar:"
                        f"\n{fmt['definition']}")
    return description.strip()


def _function_tools(tools: Any) -> list[dict[str, Any]]:
    """Responses function and custom tools -> chat tools. Hosted tools exist only at
    OpenAI."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise InvalidRequest(f"'tools' must be an array, got {_type_name(tools)}", param="tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise InvalidRequest(f"'tools[{i}]' must be an object", param=f"tools[{i}]")
        kind = tool.get("type")
        if kind not in ("function", "custom"):
            raise InvalidRequest(
                f"tool type {kind!r} is not supported here; only function and custom tools "
                "are (hosted tools such as web_search or file_search run only at OpenAI)",
                param=f"tools[{i}].type")
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"a {kind} tool needs a name", param=f"tools[{i}].name")
        if kind == "custom":
            custom: dict[str, Any] = {"name": name, "parameters": _CUSTOM_PARAMETERS}
            if _custom_description(tool):
                custom["description"] = _custom_description(tool)
            out.append({"type": "function", "function": custom})
            continue
        function: dict[str, Any] = {
            "name": name,
            "parameters": tool.get("parameters") or {"type": "object", "properties": {}},
        }
        if tool.get("description"):
            function["description"] = tool["description"]
        if tool.get("strict") is not None:
            function["strict"] = bool(tool["strict"])
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any) -> Any:
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") in ("function", "custom"):
        name = choice.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"tool_choice of type {choice['type']} needs a name",
                                 param="tool_choice.name")
        return {"type": "function", "function": {"name": name}}
    kind = choice.get("type") if isinstance(choice, dict) else choice
    raise InvalidRequest(
        f"tool_choice {kind!r} is not supported here; use auto, none, required or "
        "{\"type\": \"function\", \"name\": ...}", param="tool_choice")


def _response_format(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    if not isinstance(text, dict):
        raise InvalidRequest(f"'text' must be an object, got {_type_name(text)}", param="text")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise InvalidRequest("'text.format' must be an object", param="text.format")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = fmt.get("schema")
        name = fmt.get("name")
        if not isinstance(schema, dict):
            raise InvalidRequest("text.format.schema must be an object (a JSON schema)",
                                 param="text.format.schema")
        if not isinstance(name, str) or not name:
            raise InvalidRequest("text.format.name is required", param="text.format.name")
        spec: dict[str, Any] = {"name": name, "schema": schema}
        if fmt.get("strict") is not None:
            spec["strict"] = bool(fmt["strict"])
        if fmt.get("description"):
            spec["description"] = fmt["description"]
        return {"type": "json_schema", "json_schema": spec}
    raise InvalidRequest(
        f"text.format.type {kind!r} is not supported; use text, json_object or json_schema",
        param="text.format.type")


def parse_create(raw_body: dict[str, Any]) -> ResponsesCall:
    """Validate a `POST /v1/responses` body (parameters named as the Responses API names them).
    The messages themselves are checked when they are translated (`to_chat`)."""
    body = ({k: v for k, v in raw_body.items() if k not in REDIRECT_FIELDS}
            if not REDIRECT_FIELDS.isdisjoint(raw_body) else raw_body)
    for name in body:
        if name not in _ACCEPTED:
            raise InvalidRequest(f"Unknown parameter: '{name}'.", param=name)
    for name in _REFUSED_VALUES:
        if body.get(name) not in (None, False):
            raise InvalidRequest(f"'{name}' is not supported by this server", param=name)
    top_logprobs = body.get("top_logprobs")
    if top_logprobs is not None and (isinstance(top_logprobs, bool) or not isinstance(
            top_logprobs, int) or not 0 <= top_logprobs <= 20):
        raise InvalidRequest("'top_logprobs' must be an integer between 0 and 20",
                             param="top_logprobs")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("you must provide a model parameter", param="model")
    if body.get("input") is None:
        raise InvalidRequest("'input' is required", param="input")
    items = _items(body["input"])
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, (str, list)):
        raise InvalidRequest("'instructions' must be a string or an array of input items",
                             param="instructions")
    if isinstance(instructions, list):
        items_to_messages([i if isinstance(i, dict) else {"type": None} for i in instructions],
                          where="instructions")  # validated now, translated in to_chat
    max_out = body.get("max_output_tokens")
    if max_out is not None and (isinstance(max_out, bool) or not isinstance(max_out, int)
                                or not 1 <= max_out <= MAX_OUTPUT_TOKENS):
        raise InvalidRequest(
            f"'max_output_tokens' must be an integer between 1 and {MAX_OUTPUT_TOKENS}",
            param="max_output_tokens")
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    parallel = _bool(body, "parallel_tool_calls", True)
    stream = _bool(body, "stream", False)
    store = _bool(body, "store", True)
    previous = _optional_str(body, "previous_response_id")
    user = _optional_str(body, "user")
    _optional_str(body, "safety_identifier")
    metadata = body.get("metadata")
    if metadata is not None and (not isinstance(metadata, dict) or not all(
            isinstance(v, str) for v in metadata.values())):
        raise InvalidRequest("'metadata' must be an object of strings", param="metadata")
    truncation = body.get("truncation")
    if truncation not in (None, "auto", "disabled"):
        raise InvalidRequest("'truncation' must be 'auto' or 'disabled'", param="truncation")
    reasoning = body.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, dict):
        raise InvalidRequest("'reasoning' must be an object", param="reasoning")
    include = body.get("include")
    if include is not None and (not isinstance(include, list)
                                or not all(isinstance(v, str) for v in include)):
        raise InvalidRequest("'include' must be an array of strings", param="include")
    # Validated here so that a bad tool or format is refused before anything is routed.
    tools = body.get("tools") or []
    _function_tools(tools)
    tool_choice = _tool_choice(body.get("tool_choice"))
    _response_format(body.get("text"))
    text = body.get("text") or {}
    echo = {
        "instructions": _echo_items(instructions) if isinstance(instructions, list)
        else instructions,
        "max_output_tokens": max_out,
        "metadata": metadata or {},
        "parallel_tool_calls": parallel,
        "previous_response_id": previous,
        "reasoning": reasoning,
        "store": store,
        "temperature": 1.0 if temperature is None else temperature,
        "text": {"format": text.get("format") or {"type": "text"}},
        "tool_choice": body.get("tool_choice") if tool_choice is not None else "auto",
        "tools": [_echo_tool(t) for t in tools],
        "top_p": 1.0 if top_p is None else top_p,
        "top_logprobs": top_logprobs,
        "truncation": truncation or "disabled",
        "user": user,
    }
    # Optional fields the schema types without null are left out rather than sent as null.
    echo = {k: v for k, v in echo.items() if v is not None or k in _NULLABLE_ECHO}
    custom = frozenset(t["name"] for t in tools if t.get("type") == "custom")
    return ResponsesCall(body=body, model=model, items=items, stream=stream, store=store,
                         previous_response_id=previous, echo=echo, custom_tools=custom)


def _echo_items(items: list[Any]) -> list[Any]:
    """Input items as the response object repeats them: a text-only message's parts joined
    into one string (OpenAI's schema reads a message with parts as two item types at once)."""
    out = []
    for item in items:
        content = item.get("content") if isinstance(item, dict) else None
        if isinstance(content, list) and all(
                isinstance(p, dict) and p.get("type") in _TEXT_PARTS for p in content):
            item = {**item, "content": "".join(str(p.get("text", "")) for p in content)}
        out.append(item)
    return out


def _echo_tool(tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") == "custom":
        return {k: v for k, v in tool.items() if k in ("type", "name", "description", "format")}
    return {"type": "function", "name": tool["name"],
            "description": tool.get("description"),
            "parameters": tool.get("parameters") or {"type": "object", "properties": {}},
            "strict": bool(tool.get("strict", True))}


def _part_text(part: dict[str, Any], where: str) -> str:
    text = part.get("text")
    if not isinstance(text, str):
        raise InvalidRequest("a text part needs a string 'text'", param=f"{where}.text")
    return text


def _user_content(content: Any, where: str, allow_images: bool) -> Any:
    """Responses message content -> chat content (a string when it is text only)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(
            f"'{where}' must be a string or an array of content parts, got "
            f"{_type_name(content)}", param=where)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _TEXT_PARTS or kind == "refusal":
            key = "refusal" if kind == "refusal" else "text"
            value = part.get(key) if isinstance(part, dict) else None
            if not isinstance(value, str):
                raise InvalidRequest(f"a {kind} part needs a string '{key}'", param=f"{at}.{key}")
            parts.append({"type": "text", "text": value})
        elif kind == "input_image":
            if not allow_images:
                raise InvalidRequest("images are accepted in user messages only",
                                     param=f"{at}.type")
            assert isinstance(part, dict)
            url = part.get("image_url")
            if not isinstance(url, str) or not url:
                what = ("file_id images are not supported here; send image_url (a URL or a "
                        "data: URL)" if part.get("file_id") else "input_image needs image_url")
                raise InvalidRequest(what, param=f"{at}.image_url")
            image: dict[str, Any] = {"url": url}
            if part.get("detail") in ("low", "high", "auto"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:
            raise InvalidRequest(f"content part type {kind!r} is not supported here",
                                 param=f"{at}.type")
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _output_text(output: Any, where: str) -> str:
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        texts = []
        for j, part in enumerate(output):
            if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
                raise InvalidRequest("function_call_output parts must be text here",
                                     param=f"{where}[{j}]")
            texts.append(_part_text(part, f"{where}[{j}]"))
        return "".join(texts)
    raise InvalidRequest("'output' must be a string or an array of text parts", param=where)


def items_to_messages(items: Sequence[dict[str, Any]], where: str = "input"
                      ) -> list[dict[str, Any]]:
    """Responses input items -> chat messages. A `function_call` joins the assistant turn
    before it (text then calls, as a chat assistant message holds them)."""
    messages: list[dict[str, Any]] = []
    thinking: list[dict[str, Any]] = []  # from a reasoning item, for the next assistant turn

    def assistant(message: dict[str, Any]) -> dict[str, Any]:
        if thinking:
            message[MESSAGE_FIELD] = list(thinking)
            thinking.clear()
        return message

    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role in ("user", "system", "developer"):
                content = _user_content(item.get("content"), f"{at}.content", role == "user")
                messages.append({"role": role, "content": content})
            elif role == "assistant":
                content = _user_content(item.get("content"), f"{at}.content", False)
                text = content if isinstance(content, str) else ""
                messages.append(assistant({"role": "assistant", "content": text}))
            else:
                raise InvalidRequest(
                    "role must be one of user, system, developer, assistant",
                    param=f"{at}.role")
        elif kind in ("function_call", "custom_tool_call"):
            call_id, name = item.get("call_id"), item.get("name")
            arguments = item.get("arguments")
            if kind == "custom_tool_call":
                if not isinstance(item.get("input"), str):
                    raise InvalidRequest("a custom_tool_call needs a string input",
                                         param=f"{at}.input")
                arguments = orjson.dumps({"input": item["input"]}).decode()
            if not isinstance(call_id, str) or not call_id:
                raise InvalidRequest(f"a {kind} needs call_id", param=f"{at}.call_id")
            if not isinstance(name, str) or not name:
                raise InvalidRequest(f"a {kind} needs name", param=f"{at}.name")
            if not isinstance(arguments, str):
                raise InvalidRequest("function_call arguments must be a JSON string",
                                     param=f"{at}.arguments")
            call = {"id": call_id, "type": "function",
                    "function": {"name": name, "arguments": arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
                if not last.get("content"):
                    last["content"] = None
            else:
                messages.append(assistant({"role": "assistant", "content": None,
                                           "tool_calls": [call]}))
        elif kind in ("function_call_output", "custom_tool_call_output"):
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                raise InvalidRequest(f"a {kind} needs call_id", param=f"{at}.call_id")
            messages.append({"role": "tool", "tool_call_id": call_id,
                             "content": _output_text(item.get("output"), f"{at}.output")})
        elif kind == "reasoning":
            # No chat equivalent, except Anthropic's signed thinking we put in it ourselves.
            thinking.extend(_decode_thinking(item.get("encrypted_content")))
        else:
            raise InvalidRequest(
                f"input item type {kind!r} is not supported here (messages, function_call, "
                "function_call_output, custom_tool_call, custom_tool_call_output and reasoning "
                "items are)", param=f"{at}.type")
    return messages


def to_chat(call: ResponsesCall, history: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The chat completions body that serves `call` (after `history`, the stored conversation
    of `previous_response_id`)."""
    messages: list[dict[str, Any]] = []
    instructions = call.echo.get("instructions")
    if isinstance(instructions, list):
        messages.extend(items_to_messages(instructions, where="instructions"))
    elif instructions:
        messages.append({"role": "system", "content": instructions})
    messages.extend(items_to_messages(list(history), where="previous_response"))
    messages.extend(items_to_messages(call.items))
    if not messages:
        raise InvalidRequest("'input' holds no message", param="input")
    body = call.body
    chat: dict[str, Any] = {"model": call.model, "messages": messages}
    if call.echo.get("max_output_tokens") is not None:
        chat["max_tokens"] = call.echo["max_output_tokens"]
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            chat[name] = body[name]
    tools = _function_tools(body.get("tools"))
    if tools:
        chat["tools"] = tools
        choice = _tool_choice(body.get("tool_choice"))
        if choice is not None:
            chat["tool_choice"] = choice
        if body.get("parallel_tool_calls") is False:
            chat["parallel_tool_calls"] = False
    response_format = _response_format(body.get("text"))
    if response_format is not None:
        chat["response_format"] = response_format
    user = body.get("user") or body.get("safety_identifier")
    if isinstance(user, str):
        chat["user"] = user
    if body.get("top_logprobs") or _LOGPROBS in (body.get("include") or ()):
        chat["logprobs"] = True
        if body.get("top_logprobs"):
            chat["top_logprobs"] = body["top_logprobs"]
    if call.stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


# --------------------------------------------------------------------------- native
# Fields of the client's body that the node handles itself rather than the upstream: the model
# (the adapter names its own), the store and the conversation (ours: the upstream is sent the
# whole conversation, stateless), delivery.
_NOT_NATIVE = frozenset({"model", "previous_response_id", "store", "stream", "stream_options",
                         "input"})


def _native_item(item: dict[str, Any]) -> dict[str, Any] | None:
    """An input item as an OpenAI upstream takes it without a store: our item ids mean nothing
    there, and a reasoning item is only sent back with OpenAI's own encrypted content."""
    if item.get("type") == "reasoning":
        encrypted = item.get("encrypted_content")
        if not isinstance(encrypted, str) or encrypted.startswith(_THINKING_PREFIX):
            return None
        return item
    return {k: v for k, v in item.items() if k != "id"}


def native_body(call: ResponsesCall, history: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The Responses body for an upstream that speaks the API natively (it rides in the chat
    body under `RESPONSES_NATIVE_FIELD`; see `meshnode.providers.openai_responses`)."""
    body = {k: v for k, v in call.body.items() if k not in _NOT_NATIVE}
    items = (_native_item(i) for i in [*history, *call.items])
    body["input"] = [i for i in items if i is not None]
    return body


def is_native_event(data: Mapping[str, Any]) -> bool:
    """A chunk that is a native Responses event (not a chat chunk)."""
    kind = data.get("type")
    return isinstance(kind, str) and kind.startswith("response.") and "choices" not in data


def native_response(call: ResponsesCall, upstream: Mapping[str, Any], response_id: str
                    ) -> dict[str, Any]:
    """An upstream's own response object as this node's: our id, the public model name, and
    what the node decided (store, the conversation it continued, the client's metadata)."""
    return {**upstream, "id": response_id, "model": call.model, "store": call.store,
            "previous_response_id": call.previous_response_id,
            "metadata": call.echo.get("metadata", {})}


# --------------------------------------------------------------------------- the answer
def usage_object(usage: Mapping[str, Any] | None) -> dict[str, Any]:
    """Chat usage -> Responses usage."""
    usage = usage or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": int(prompt_details.get("cached_tokens") or 0),
            "cache_write_tokens": int(prompt_details.get("cache_write_tokens") or 0)},
        "output_tokens": completion,
        "output_tokens_details": {
            "reasoning_tokens": int(completion_details.get("reasoning_tokens") or 0)},
        "total_tokens": prompt + completion,
    }


def _status(finish_reason: Any) -> tuple[str, dict[str, Any] | None]:
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def response_shell(call: ResponsesCall, response_id: str, created_at: int) -> dict[str, Any]:
    """A response object with no output yet (`status: in_progress`)."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "completed_at": None,
        "error": None,
        "incomplete_details": None,
        "model": call.model,
        "output": [],
        **call.echo,
    }


def logprobs_of(choice: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A chat choice's token logprobs in the Responses shape (`LogProb`)."""
    logprobs = choice.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    out = []
    for entry in content if isinstance(content, list) else ():
        if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
            continue
        out.append({
            "token": entry["token"], "logprob": float(entry.get("logprob") or 0.0),
            "bytes": list(entry.get("bytes") or []),
            "top_logprobs": [
                {"token": str(t.get("token")), "logprob": float(t.get("logprob") or 0.0),
                 "bytes": list(t.get("bytes") or [])}
                for t in entry.get("top_logprobs") or () if isinstance(t, dict)],
        })
    return out


def _delta_logprobs(logprobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`LogProb`s in the shape of a delta event (`ResponseLogProb`: no bytes)."""
    return [{"token": lp["token"], "logprob": lp["logprob"],
             "top_logprobs": [{"token": t["token"], "logprob": t["logprob"]}
                              for t in lp["top_logprobs"]]} for lp in logprobs]


def _message_item(item_id: str, text: str, status: str, refusal: str | None = None,
                  logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if text or refusal is None:
        content.append({"type": "output_text", "text": text, "annotations": [],
                        "logprobs": logprobs or []})
    if refusal is not None:
        content.append({"type": "refusal", "refusal": refusal})
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": content}


# Anthropic's signed thinking blocks ride in a reasoning item's opaque `encrypted_content`,
# so a client that sends the item back (Codex does, with store false) gives them back to
# Anthropic on the next turn; other encrypted contents (OpenAI's) are not ours and skipped.
_THINKING_PREFIX = "meshnode-thinking:"


def _encode_thinking(blocks: Sequence[Any]) -> str | None:
    signed = [b for b in blocks if isinstance(b, dict)
              and (b.get("signature") or b.get("type") == "redacted_thinking")]
    if not signed:
        return None
    return _THINKING_PREFIX + base64.b64encode(orjson.dumps(signed)).decode()


def _decode_thinking(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, str) or not value.startswith(_THINKING_PREFIX):
        return []
    try:
        blocks = orjson.loads(base64.b64decode(value[len(_THINKING_PREFIX):], validate=True))
    except (ValueError, orjson.JSONDecodeError):
        return []
    return [b for b in blocks if isinstance(b, dict)] if isinstance(blocks, list) else []


def _reasoning_item(item_id: str, text: str, status: str,
                    encrypted: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"id": item_id, "type": "reasoning", "summary": [],
                            "content": [{"type": "reasoning_text", "text": text}] if text else [],
                            "status": status}
    if encrypted is not None:
        item["encrypted_content"] = encrypted
    return item


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str
               ) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id,
            "name": name, "arguments": arguments}


def custom_input(arguments: str) -> str:
    """The free text a custom tool call carries, from the function arguments it was served
    as (`{"input": "..."}`); the raw arguments when a model did not keep to that shape."""
    try:
        value = orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        return arguments
    if isinstance(value, dict) and isinstance(value.get("input"), str):
        return str(value["input"])
    return arguments


def _custom_item(item_id: str, call_id: str, name: str, text: str) -> dict[str, Any]:
    return {"id": item_id, "type": "custom_tool_call", "call_id": call_id, "name": name,
            "input": text}


def chat_to_response(call: ResponsesCall, chat: Mapping[str, Any], response_id: str,
                     created_at: int) -> dict[str, Any]:
    """A chat.completion body -> a finished response object (no x_aiproxy)."""
    choices = chat.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    output: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content")
    encrypted = _encode_thinking(message.get(MESSAGE_FIELD) or ())
    if reasoning or encrypted:
        output.append(_reasoning_item(new_id("rs"), str(reasoning or ""), "completed",
                                      encrypted))
    text = message.get("content")
    refusal = message.get("refusal")
    if text or refusal:
        output.append(_message_item(new_id("msg"), str(text or ""), "completed",
                                    str(refusal) if refusal else None, logprobs_of(choice)))
    for call_ in message.get("tool_calls") or ():
        function = call_.get("function") or {}
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            arguments = orjson.dumps(arguments or {}).decode()
        name = str(function.get("name"))
        call_id = str(call_.get("id") or new_id("call"))
        if name in call.custom_tools:
            output.append(_custom_item(new_id("ctc"), call_id, name, custom_input(arguments)))
        else:
            output.append(_call_item(new_id("fc"), call_id, name, arguments, "completed"))
    if all(item["type"] == "reasoning" for item in output):
        output.append(_message_item(new_id("msg"), "", "completed"))
    status, incomplete = _status(choice.get("finish_reason"))
    response = response_shell(call, response_id, created_at)
    response.update(status=status, incomplete_details=incomplete, output=output,
                    usage=usage_object(chat.get("usage")),
                    completed_at=int(time.time()) if status == "completed" else None)
    return response


def error_code(exc: BaseException) -> str:
    """A ResponseError code (OpenAI's enum) for an error that ended a response."""
    if isinstance(exc, MeshError) and exc.status == 429:
        return "rate_limit_exceeded"
    if isinstance(exc, MeshError) and exc.status == 400:
        return "invalid_prompt"
    return "server_error"


# --------------------------------------------------------------------------- the stream
class _OpenItem:
    __slots__ = ("arguments", "blocks", "call_id", "id", "index", "kind", "name", "text")

    def __init__(self, kind: str, index: int, item_id: str, call_id: str = "",
                 name: str = "") -> None:
        self.kind = kind  # "message" | "function_call" | "custom_tool_call" | "reasoning"
        self.index = index
        self.id = item_id
        self.call_id = call_id
        self.name = name
        self.text: list[str] = []
        self.arguments: list[str] = []
        self.blocks: list[Any] = []  # reasoning: signed thinking blocks


class ResponseEventWriter:
    """Turns chat stream chunks into Responses stream events, one chunk at a time.

    `start()`: `response.created` and `response.in_progress`. `feed(chunk)`: for text, the
    message item's `output_item.added` + `content_part.added` once, then `output_text.delta`s;
    for each tool call, its `function_call` item's `output_item.added` once, then
    `function_call_arguments.delta`s. Items stay open while the chat stream interleaves text
    and calls (every delta names its item), and are all closed, in output order, by
    `finish()`, which ends with `response.completed` (or `response.incomplete`) carrying usage
    and `x_aiproxy`. `fail(exc)`: `response.failed`. Each event has its `sequence_number`.
    """

    def __init__(self, call: ResponsesCall, response_id: str, created_at: int) -> None:
        self.call = call
        self.response = response_shell(call, response_id, created_at)
        self._sequence = 0
        self._items: list[_OpenItem] = []
        self._message: _OpenItem | None = None
        self._reasoning: _OpenItem | None = None
        self._logprobs: list[dict[str, Any]] = []  # of the message's text, in order
        self._calls: dict[int, _OpenItem] = {}  # chat tool_call index -> item
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    def _event(self, kind: str, **data: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self._sequence, **data}
        self._sequence += 1
        return named_event(kind, payload)

    def start(self) -> bytes:
        return (self._event("response.created", response=self.response)
                + self._event("response.in_progress", response=self.response))

    def _open_message(self) -> tuple[bytes, _OpenItem]:
        if self._message is not None:
            return b"", self._message
        item = _OpenItem("message", len(self._items), new_id("msg"))
        self._items.append(item)
        self._message = item
        out = self._event("response.output_item.added", output_index=item.index,
                          item=_message_item(item.id, "", "in_progress") | {"content": []})
        out += self._event("response.content_part.added", item_id=item.id,
                           output_index=item.index, content_index=0,
                           part={"type": "output_text", "text": "", "annotations": [],
                                 "logprobs": []})
        return out, item

    def feed(self, chunk: Mapping[str, Any]) -> bytes:
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        out = b""
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            thought = delta.get("reasoning_content")
            if thought or delta.get(MESSAGE_FIELD):
                out += self._reasoning_delta(thought, delta.get(MESSAGE_FIELD) or ())
            text = delta.get("content")
            if text:
                opened, item = self._open_message()
                out += opened
                item.text.append(text)
                logprobs = logprobs_of(choice)
                self._logprobs.extend(logprobs)
                out += self._event("response.output_text.delta", item_id=item.id,
                                   output_index=item.index, content_index=0, delta=text,
                                   logprobs=_delta_logprobs(logprobs))
            for tool_call in delta.get("tool_calls") or ():
                out += self._tool_delta(tool_call)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return out

    def _reasoning_delta(self, text: Any, blocks: Sequence[Any]) -> bytes:
        out = b""
        item = self._reasoning
        if item is None:
            item = _OpenItem("reasoning", len(self._items), new_id("rs"))
            self._items.append(item)
            self._reasoning = item
            out += self._event("response.output_item.added", output_index=item.index,
                               item=_reasoning_item(item.id, "", "in_progress"))
        item.blocks.extend(blocks)
        if isinstance(text, str) and text:
            item.text.append(text)
            out += self._event("response.reasoning_text.delta", item_id=item.id,
                               output_index=item.index, content_index=0, delta=text)
        return out

    def _tool_delta(self, tool_call: Mapping[str, Any]) -> bytes:
        out = b""
        index = int(tool_call.get("index", len(self._calls)))
        function = tool_call.get("function") or {}
        item = self._calls.get(index)
        if item is None:
            name = str(function.get("name") or "")
            custom = name in self.call.custom_tools
            item = _OpenItem("custom_tool_call" if custom else "function_call",
                             len(self._items), new_id("ctc" if custom else "fc"),
                             call_id=str(tool_call.get("id") or new_id("call")), name=name)
            self._items.append(item)
            self._calls[index] = item
            added = (_custom_item(item.id, item.call_id, name, "") if custom else
                     _call_item(item.id, item.call_id, item.name, "", "in_progress"))
            out += self._event("response.output_item.added", output_index=item.index,
                               item=added)
        elif function.get("name") and not item.name:
            item.name = str(function["name"])
        arguments = function.get("arguments")
        if arguments:
            item.arguments.append(arguments)
            if item.kind == "function_call":
                # A custom tool's input is JSON-wrapped on the chat side: it is sent whole
                # when the item closes.
                out += self._event("response.function_call_arguments.delta", item_id=item.id,
                                   output_index=item.index, delta=arguments)
        return out

    def _close(self, item: _OpenItem) -> tuple[bytes, dict[str, Any]]:
        if item.kind == "reasoning":
            text = "".join(item.text)
            done = _reasoning_item(item.id, text, "completed", _encode_thinking(item.blocks))
            out = (self._event("response.reasoning_text.done", item_id=item.id,
                               output_index=item.index, content_index=0, text=text)
                   if text else b"")
        elif item.kind == "message":
            text = "".join(item.text)
            part = {"type": "output_text", "text": text, "annotations": [],
                    "logprobs": self._logprobs}
            done = _message_item(item.id, text, "completed", logprobs=self._logprobs)
            out = (self._event("response.output_text.done", item_id=item.id,
                               output_index=item.index, content_index=0, text=text,
                               logprobs=_delta_logprobs(self._logprobs))
                   + self._event("response.content_part.done", item_id=item.id,
                                 output_index=item.index, content_index=0, part=part))
        elif item.kind == "custom_tool_call":
            text = custom_input("".join(item.arguments))
            done = _custom_item(item.id, item.call_id, item.name, text)
            out = (self._event("response.custom_tool_call_input.delta", item_id=item.id,
                               output_index=item.index, delta=text)
                   + self._event("response.custom_tool_call_input.done", item_id=item.id,
                                 output_index=item.index, input=text))
        else:
            arguments = "".join(item.arguments)
            done = _call_item(item.id, item.call_id, item.name, arguments, "completed")
            out = self._event("response.function_call_arguments.done", item_id=item.id,
                              output_index=item.index, name=item.name, arguments=arguments)
        out += self._event("response.output_item.done", output_index=item.index, item=done)
        return out, done

    def finish(self, x_aiproxy: dict[str, Any] | None, usage: Mapping[str, Any] | None = None
               ) -> bytes:
        out = b""
        if all(item.kind == "reasoning" for item in self._items):
            out += self._open_message()[0]
        output = []
        for item in self._items:
            closed, done = self._close(item)
            out += closed
            output.append(done)
        status, incomplete = _status(self.finish_reason)
        self.response = {**self.response, "status": status, "incomplete_details": incomplete,
                         "output": output, "usage": usage_object(usage or self.usage),
                         "completed_at": int(time.time()) if status == "completed" else None}
        if x_aiproxy is not None:
            self.response["x_aiproxy"] = x_aiproxy
        kind = "response.completed" if status == "completed" else "response.incomplete"
        extra = {"x_aiproxy": x_aiproxy} if x_aiproxy is not None else {}
        return out + self._event(kind, response=self.response, **extra)

    def fail(self, exc: BaseException, message: str) -> bytes:
        failed = {**self.response, "status": "failed",
                  "error": {"code": error_code(exc), "message": message}}
        return self._event("response.failed", response=failed)


__all__ = [
    "ResponseEventWriter",
    "ResponsesCall",
    "chat_to_response",
    "error_code",
    "is_native_event",
    "native_body",
    "native_response",
    "items_to_messages",
    "new_id",
    "parse_create",
    "response_shell",
    "to_chat",
    "usage_object",
]
