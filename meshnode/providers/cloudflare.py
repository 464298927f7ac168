"""The Cloudflare Workers AI adapter: chat, completions, embeddings and images.

Every call is `POST {base_url}/accounts/{account_id}/ai/run/{cloudflare_model}` with
`Authorization: Bearer {api_token}`. This module owns the translation between OpenAI's shapes and
Workers AI's: text models take `messages` (string contents only) or `prompt` and answer
`{"result": {"response": ...}}` inside Cloudflare's envelope, or an SSE stream of
`{"response": "<piece>"}` events ending with `[DONE]`; embedding models (`@cf/baai/bge-*`) take
`{"text": [...]}` and answer `result.data`; tools are sent, and the tool calls Workers AI
answers with (`result.tool_calls`, or `tool_calls` entries of stream events, in its flat or its
OpenAI-style shape) become OpenAI `tool_calls` in answers and streams alike; image models (`@cf/stabilityai/...`) answer raw PNG
bytes, which become OpenAI's images response with `b64_json`. HTTP mechanics are
`meshnode.providers.http`'s.

Some models (gpt-oss, kimi) answer in OpenAI's chat shape even on `/ai/run` (`choices[0].message`,
streamed `choices[0].delta`); both shapes are read.

Usage: many Workers AI models report no token counts. Then the counts are estimated with
`meshnode.providers.tokens` and marked `Usage(estimated=True)`, so `x_aiproxy` says
`cost_estimated: true`.

Errors: HTTP statuses map as for every adapter (429 retryable with Retry-After, 5xx retryable,
400 and 401/403 not). A 200 whose envelope says `success: false` maps by its first error code:
3040 (capacity exceeded) and 3036 (daily allocation used up) are rate limits, retryable
elsewhere; 5006/5007 (bad input, no such model) are the request's fault; 10000 is our token's.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import orjson

from meshnode.config import ModelConfig, ResolvedProvider, TimeoutsConfig
from meshnode.errors import (
    InvalidRequest,
    MeshError,
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from meshnode.providers.anthropic_extensions import drop_extensions
from meshnode.providers.base import Provider
from meshnode.providers.content import content_text
from meshnode.providers.embeddings import encode_vectors, parse_embedding_options
from meshnode.providers.http import (
    STREAM_ACCEPT,
    HttpUpstream,
    as_stream_broken,
    iter_sse,
    request_id_headers,
)
from meshnode.providers.registry import ProviderContext
from meshnode.providers.tokens import estimate_prompt_tokens, estimate_tokens
from meshnode.types import (
    Completion,
    InferenceRequest,
    ModelOffer,
    RequestKind,
    StreamChunk,
    Usage,
)

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.cloudflare.com/client/v4"
# OpenAI sampling fields Workers AI text models accept under the same name.
_PASSTHROUGH = ("max_tokens", "temperature", "top_p", "seed", "frequency_penalty",
                "presence_penalty")
# Cloudflare error codes (`errors[].code`) -> our error class, when the HTTP status alone
# does not say it (a 200 with `success: false`).
_ERROR_CODES: dict[int, type[UpstreamError]] = {
    3040: UpstreamRateLimited,  # capacity temporarily exceeded
    3036: UpstreamRateLimited,  # account's daily neuron allocation used up
    5006: UpstreamBadRequest,  # bad input
    5007: UpstreamBadRequest,  # no such model or task
    7003: UpstreamBadRequest,  # could not route (bad account id or path)
    10000: UpstreamAuthError,  # authentication error
}
_MAX_IMAGES = 4


def infer_kind(model: ModelConfig) -> RequestKind:
    """The request kind a model serves: its `kind`, or guessed from the Workers AI model name
    when the config left `kind` out (`@cf/baai/bge-*` embeds, `@cf/stabilityai/...` draws)."""
    if "kind" in model.model_fields_set:
        return RequestKind(model.kind)
    name = model.cloudflare_model or ""
    if name.startswith("@cf/baai/bge"):
        return RequestKind.EMBEDDING
    if name.startswith(("@cf/stabilityai/", "@cf/bytedance/", "@cf/lykon/", "@cf/runwayml/",
                        "@cf/black-forest-labs/", "@cf/leonardo/")):
        return RequestKind.IMAGE
    return RequestKind.CHAT


def envelope_error(data: Any, provider: str) -> UpstreamError:
    """The error for a Cloudflare envelope `{"success": false, "errors": [{"code", "message"}]}`."""
    errors = data.get("errors") if isinstance(data, dict) else None
    first = errors[0] if isinstance(errors, list) and errors and isinstance(
        errors[0], dict) else {}
    code = first.get("code")
    message = f"{provider} error {code}: {first.get('message') or 'no message'}"
    cls = _ERROR_CODES.get(code, UpstreamUnavailable) if isinstance(code, int) else (
        UpstreamUnavailable)
    if cls is UpstreamAuthError:
        message = f"{provider} rejected this node's credentials (code {code})"
    return cls(message, provider=provider)


# --------------------------------------------------------------------------- request bodies


def chat_to_cloudflare(body: dict[str, Any], stream: bool) -> dict[str, Any]:
    """An OpenAI chat body -> a Workers AI text-generation body."""
    if (body.get("n") or 1) != 1:
        raise InvalidRequest("this provider returns one choice only (n must be 1)", param="n")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", param="messages")
    out_messages = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest("a message must be an object", param=f"messages[{i}]")
        role = str(message.get("role"))
        role = "system" if role == "developer" else role
        text = content_text(message.get("content"), f"messages[{i}]")
        out_message: dict[str, Any] = {"role": role, "content": text}
        calls = message.get("tool_calls") if role == "assistant" else None
        if calls:
            if not text:
                # Older models read string contents only: a past tool call is told as its JSON.
                out_message["content"] = orjson.dumps(
                    [c.get("function") for c in calls if isinstance(c, dict)]).decode()
            # Newer ones (OpenAI-style function calling) pair results with calls by id.
            out_message["tool_calls"] = calls
        if role == "tool" and message.get("tool_call_id"):
            out_message["tool_call_id"] = str(message["tool_call_id"])
        out_messages.append(out_message)
    out = _sampling(body, stream)
    out["messages"] = out_messages
    tools = [t["function"] for t in body.get("tools") or () if isinstance(t, dict)
             and isinstance(t.get("function"), dict)]
    if tools:
        out["tools"] = tools
    return out


def completion_to_cloudflare(body: dict[str, Any], stream: bool) -> dict[str, Any]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidRequest("this provider takes one string prompt", param="prompt")
    out = _sampling(body, stream)
    out["prompt"] = prompt
    return out


def _sampling(body: dict[str, Any], stream: bool) -> dict[str, Any]:
    out: dict[str, Any] = {k: body[k] for k in _PASSTHROUGH if body.get(k) is not None}
    if body.get("max_completion_tokens") is not None:
        out["max_tokens"] = body["max_completion_tokens"]
    if stream:
        out["stream"] = True
    return out


def image_to_cloudflare(body: dict[str, Any]) -> dict[str, Any]:
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise InvalidRequest("prompt is required", param="prompt")
    out: dict[str, Any] = {"prompt": prompt}
    size = body.get("size")
    if isinstance(size, str) and size != "auto":
        width, sep, height = size.partition("x")
        if not (sep and width.isdigit() and height.isdigit()):
            raise InvalidRequest("size must look like 1024x1024", param="size")
        out["width"], out["height"] = int(width), int(height)
    for key in ("negative_prompt", "seed", "num_steps", "guidance"):
        if body.get(key) is not None:
            out[key] = body[key]
    return out


# --------------------------------------------------------------------------- the provider
class CloudflareProvider(Provider):
    """Serves Workers AI models. Credentials: `credentials.account_id` and `api_token`."""

    enforces_deadline = True  # every upstream call carries the request's deadline
    fixed_offers = True  # made from the config in __init__, never changed

    def __init__(self, resolved: ResolvedProvider, ctx: ProviderContext) -> None:
        self.name = resolved.name
        self.kind = resolved.type
        config = resolved.config
        account_id = config.credentials.get("account_id", "")
        api_token = config.credentials.get("api_token", "")
        missing = [k for k, v in (("account_id", account_id), ("api_token", api_token)) if not v]
        # Like every cloud adapter: empty credentials (their variables unset) disable the
        # provider with a warning instead of stopping the node; /health/ready says why.
        self.disabled_reason: str | None = None
        if missing:
            self.disabled_reason = (
                f"providers.{resolved.name}.credentials: {' and '.join(missing)} empty (are "
                "CLOUDFLARE_ACCOUNT_ID and CLOUDFLARE_API_TOKEN set?); this provider serves "
                "nothing"
            )
            log.warning("provider %s disabled: %s", resolved.name, self.disabled_reason)
        self._prefix = f"/accounts/{account_id}/ai/run/"
        self._http = HttpUpstream(
            provider=resolved.name,
            base_url=resolved.base_url or DEFAULT_BASE_URL,
            headers={"Authorization": f"Bearer {api_token}", **config.headers},
            secrets=[api_token, account_id],
            max_concurrency=config.max_concurrency,
        )
        self._offers = []
        for model in config.models if self.disabled_reason is None else ():
            kind = infer_kind(model)
            kinds = (frozenset({RequestKind.CHAT, RequestKind.COMPLETION})
                     if kind in (RequestKind.CHAT, RequestKind.COMPLETION) else frozenset({kind}))
            self._offers.append(ModelOffer(
                model=model.name,
                provider=resolved.name,
                provider_kind=resolved.type,
                upstream_model=model.cloudflare_model or model.name,
                kinds=kinds,
                cost_per_1k_input=model.input_price,
                cost_per_1k_output=model.output_price,
                priority=config.priority,
                max_context_tokens=model.max_context_tokens,
            ))

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

    # ---- helpers
    def _result(self, data: dict[str, Any]) -> Any:
        if data.get("success") is False or "result" not in data:
            raise envelope_error(data, self.name)
        return data["result"]

    def _prompt_tokens(self, request: InferenceRequest) -> int:
        return request.prompt_tokens_estimate or estimate_prompt_tokens(request.kind, request.body)

    def _usage(self, request: InferenceRequest, reported: Any, text: str) -> Usage:
        if isinstance(reported, dict) and reported.get("prompt_tokens") is not None:
            return Usage(int(reported.get("prompt_tokens") or 0),
                         int(reported.get("completion_tokens") or 0))
        return Usage(self._prompt_tokens(request), estimate_tokens(text), estimated=True)

    @staticmethod
    def _finish_reason(request: InferenceRequest, usage: Usage) -> str:
        limit = request.body.get("max_completion_tokens") or request.body.get("max_tokens")
        if isinstance(limit, int) and not usage.estimated and usage.completion_tokens >= limit:
            return "length"
        return "stop"

    # ---- whole answers
    def _chat_body(self, request: InferenceRequest) -> dict[str, Any]:
        # Logs a note when the Anthropic door's fields (cache_control, thinking) are dropped.
        body = drop_extensions(request.body, self.name)
        return body if isinstance(body, dict) else dict(body)

    async def complete(
        self, request: InferenceRequest, offer: ModelOffer, timeouts: TimeoutsConfig
    ) -> Completion:
        path = self._prefix + offer.upstream_model
        if request.kind is RequestKind.IMAGE:
            return await self._images(request, path, timeouts)
        if request.kind is RequestKind.EMBEDDING:
            return await self._embeddings(request, offer, path, timeouts)
        if request.kind is RequestKind.CHAT:
            payload = chat_to_cloudflare(self._chat_body(request), stream=False)
        else:
            payload = completion_to_cloudflare(request.body, stream=False)
        data = await self._http.post_json(
            path, orjson.dumps(payload), deadline=request.deadline, timeouts=timeouts,
            headers=request_id_headers(request.request_id),
        )
        result = self._result(data)
        if not isinstance(result, dict):
            raise UpstreamUnavailable(f"{self.name} answered without a result object",
                                      provider=self.name)
        response, raw_calls = _output_parts(result, "message")
        text = response if isinstance(response, str) else (
            "" if response is None else orjson.dumps(response).decode())
        calls = (_tool_calls(raw_calls, request.request_id)
                 if request.kind is RequestKind.CHAT else [])
        usage = self._usage(request, result.get("usage"),
                            text + "".join(c["function"]["arguments"] for c in calls))
        finish = self._finish_reason(request, usage)
        created = int(time.time())
        if request.kind is RequestKind.COMPLETION:
            body: dict[str, Any] = {
                "id": f"cmpl-{request.request_id}", "object": "text_completion",
                "created": created, "model": request.model,
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": finish}],
            }
        else:
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            if calls:
                message["tool_calls"] = calls
                message["content"] = text or None
                finish = "tool_calls"
            body = {
                "id": f"chatcmpl-{request.request_id}", "object": "chat.completion",
                "created": created, "model": request.model,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": finish}],
            }
        body["usage"] = usage.to_openai()
        return Completion(body=body, usage=usage)

    async def _embeddings(
        self, request: InferenceRequest, offer: ModelOffer, path: str, timeouts: TimeoutsConfig
    ) -> Completion:
        raw = request.body.get("input")
        texts = [raw] if isinstance(raw, str) else raw
        if not (isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts)):
            raise InvalidRequest("this provider embeds strings only (not token ids)",
                                 param="input")
        # Workers AI answers floats at the model's width: base64 is encoded here, and a
        # `dimensions` it would ignore is refused before the call.
        options = parse_embedding_options(request.body, model=request.model, width=None,
                                          matryoshka=False)
        data = await self._http.post_json(
            path, orjson.dumps({"text": texts}), deadline=request.deadline, timeouts=timeouts,
            headers=request_id_headers(request.request_id),
        )
        result = self._result(data)
        vectors = result.get("data") if isinstance(result, dict) else None
        if not isinstance(vectors, list) or len(vectors) != len(texts) or not all(
            isinstance(v, list) and all(isinstance(x, int | float) for x in v) for v in vectors
        ):
            raise UpstreamUnavailable(
                f"{self.name} answered {len(vectors) if isinstance(vectors, list) else 'no'} "
                f"vectors of numbers for {len(texts)} inputs", provider=self.name)
        # Workers AI embeddings report no usage.
        usage = Usage(self._prompt_tokens(request), 0, estimated=True)
        body = {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": v}
                     for i, v in enumerate(encode_vectors(vectors, options))],
            "model": request.model,
            "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens},
        }
        return Completion(body=body, usage=usage)

    async def _images(
        self, request: InferenceRequest, path: str, timeouts: TimeoutsConfig
    ) -> Completion:
        n = request.body.get("n") or 1
        if not isinstance(n, int) or not 1 <= n <= _MAX_IMAGES:
            raise InvalidRequest(f"n must be between 1 and {_MAX_IMAGES}", param="n")
        payload = orjson.dumps(image_to_cloudflare(request.body))
        # Workers AI draws one image per call; n images are n concurrent calls.
        images = await asyncio.gather(
            *(self._one_image(request, path, payload, timeouts) for _ in range(n))
        )
        as_url = request.body.get("response_format") == "url"
        data = [{"url": f"data:image/png;base64,{b64}"} if as_url else {"b64_json": b64}
                for b64 in images]
        usage = Usage(self._prompt_tokens(request), 0, estimated=True)
        return Completion(body={"created": int(time.time()), "data": data}, usage=usage)

    async def _one_image(
        self, request: InferenceRequest, path: str, payload: bytes, timeouts: TimeoutsConfig
    ) -> str:
        response = await self._http.request(
            "POST", path, payload, deadline=request.deadline, timeouts=timeouts,
            headers={"Accept": "image/png, application/json"},
        )
        if response.content_type.startswith("image/"):
            return base64.b64encode(response.body).decode()
        # Some image models (flux) answer JSON: {"result": {"image": "<base64>"}}.
        result = self._result(self._http.parse_json_object(response.body))
        image = result.get("image") if isinstance(result, dict) else None
        if not isinstance(image, str) or not image:
            raise UpstreamUnavailable(f"{self.name} answered without an image",
                                      provider=self.name)
        return image

    # ---- streams
    async def stream(
        self, request: InferenceRequest, offer: ModelOffer, timeouts: TimeoutsConfig
    ) -> AsyncIterator[StreamChunk]:
        chat = request.kind is RequestKind.CHAT
        if chat:
            payload = chat_to_cloudflare(self._chat_body(request), stream=True)
        elif request.kind is RequestKind.COMPLETION:
            payload = completion_to_cloudflare(request.body, stream=True)
        else:
            raise InvalidRequest(f"{request.kind.value} requests cannot be streamed")
        framer = _ChunkFramer(request, chat)
        calls = _StreamedToolCalls(request.request_id)
        pieces: list[str] = []
        reported: Any = None
        yielded = done = False
        try:
            async with self._http.stream(
                self._prefix + offer.upstream_model, orjson.dumps(payload),
                deadline=request.deadline, timeouts=timeouts,
                headers={**STREAM_ACCEPT, **request_id_headers(request.request_id)},
            ) as response:
                async for event in iter_sse(response):
                    if event.data == "[DONE]":
                        done = True
                        continue
                    try:
                        data = orjson.loads(event.data)
                    except orjson.JSONDecodeError:
                        raise UpstreamUnavailable(
                            f"{self.name} sent a stream event that is not JSON",
                            provider=self.name) from None
                    if not isinstance(data, dict):
                        continue
                    if data.get("success") is False or "errors" in data:
                        raise envelope_error(data, self.name)
                    if data.get("usage") is not None:
                        reported = data["usage"]
                    piece, raw_calls = _output_parts(data, "delta")
                    if isinstance(piece, str) and piece:
                        pieces.append(piece)
                        yielded = True
                        yield StreamChunk(framer.piece(piece))
                    deltas = calls.feed(raw_calls) if chat else []
                    if deltas:
                        yielded = True
                        yield StreamChunk(framer.tool_calls(deltas))
            if not done:
                raise UpstreamUnavailable(f"{self.name} ended the stream before [DONE]",
                                          provider=self.name)
        except MeshError as exc:
            raise as_stream_broken(exc) if yielded else exc from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            error = self._http.error_for_exception(exc, request.deadline)
            raise as_stream_broken(error) if yielded else error from exc
        usage = self._usage(request, reported, "".join(pieces) + calls.arguments_text)
        finish = "tool_calls" if calls.count else self._finish_reason(request, usage)
        yield StreamChunk(framer.finish(finish))
        yield StreamChunk(framer.usage(usage), usage=usage)


def _output_parts(output: dict[str, Any], where: str) -> tuple[Any, Any]:
    """(text, tool calls) of a Workers AI answer or stream event. Most models answer in the
    native shape (`response`, `tool_calls`); some (gpt-oss, kimi, ...) in OpenAI's, even on
    `/ai/run`: `choices[0].message` in answers, `choices[0].delta` in stream events."""
    choices = output.get("choices")
    if "response" not in output and isinstance(choices, list):
        first = choices[0] if choices and isinstance(choices[0], dict) else {}
        part = first.get(where)
        if not isinstance(part, dict):
            return None, None
        return part.get("content"), part.get("tool_calls")
    return output.get("response"), output.get("tool_calls")


def _call_parts(call: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(id, name, arguments) of a Workers AI tool call entry in either of its shapes: flat
    `{"name", "arguments"}` (older models, arguments an object) or OpenAI's `{"id", "type",
    "function": {"name", "arguments"}}` (newer models, arguments a JSON string)."""
    function = call.get("function")
    if isinstance(function, dict):
        return call.get("id"), function.get("name"), function.get("arguments")
    return call.get("id"), call.get("name"), call.get("arguments")


def _arguments_text(arguments: Any) -> str:
    if isinstance(arguments, str):
        return arguments
    return orjson.dumps(arguments if arguments is not None else {}).decode()


def _tool_calls(raw: Any, request_id: str) -> list[dict[str, Any]]:
    """Workers AI `result.tool_calls` (either shape) -> OpenAI `tool_calls`."""
    if not isinstance(raw, list):
        return []
    calls = []
    for i, call in enumerate(raw):
        if not isinstance(call, dict):
            continue
        call_id, name, arguments = _call_parts(call)
        if not name:
            continue
        calls.append({"id": str(call_id or f"call_{request_id}_{i}"), "type": "function",
                      "function": {"name": str(name), "arguments": _arguments_text(arguments)}})
    return calls


class _StreamedToolCalls:
    """Turns the `tool_calls` entries of Workers AI stream events into OpenAI tool call deltas.

    Newer models stream a call as a start (`id`, `index`, `function.name`), argument pieces
    (`index`, `function.arguments`) and a finalization entry with every field null; older ones
    send each call whole (`{"name", "arguments": {...}}`, no index). Both become OpenAI's form:
    the first delta of a call carries `index`, `id`, `type` and `function.name`, later ones
    only argument pieces.
    """

    def __init__(self, request_id: str) -> None:
        self._request_id = request_id
        self._by_upstream_index: dict[int, int] = {}  # upstream index -> our index
        self._pieces: list[str] = []
        self.count = 0

    @property
    def arguments_text(self) -> str:
        return "".join(self._pieces)

    def feed(self, raw: Any) -> list[dict[str, Any]]:
        if not isinstance(raw, list):
            return []
        deltas: list[dict[str, Any]] = []
        for call in raw:
            if not isinstance(call, dict):
                continue
            call_id, name, arguments = _call_parts(call)
            if not call_id and not name and not arguments:
                continue  # the null finalization entry
            upstream_index = call.get("index")
            index: int | None = None
            if isinstance(upstream_index, int):
                index = self._by_upstream_index.get(upstream_index)
            elif not name and self.count:
                index = self.count - 1  # a piece without index continues the last call
            args = "" if arguments is None else _arguments_text(arguments)
            if args:
                self._pieces.append(args)
            if index is None:
                if not name:
                    continue  # arguments for a call whose start was never seen
                index = self.count
                self.count += 1
                if isinstance(upstream_index, int):
                    self._by_upstream_index[upstream_index] = index
                deltas.append({"index": index, "type": "function",
                               "id": str(call_id or f"call_{self._request_id}_{index}"),
                               "function": {"name": str(name), "arguments": args}})
            elif args:
                deltas.append({"index": index, "function": {"arguments": args}})
        return deltas


class _ChunkFramer:
    """Builds the OpenAI chunks of one stream (chat or text completion)."""

    def __init__(self, request: InferenceRequest, chat: bool) -> None:
        self._chat = chat
        self._base = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{request.request_id}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": request.model,
        }
        self._sent_role = False

    def _choice(self, text: str | None, finish: str | None) -> dict[str, Any]:
        if not self._chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta: dict[str, Any] = {} if text is None else {"content": text}
        if not self._sent_role:
            self._sent_role = True
            delta = {"role": "assistant", **delta}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def piece(self, text: str) -> dict[str, Any]:
        return {**self._base, "choices": [self._choice(text, None)]}

    def tool_calls(self, deltas: list[dict[str, Any]]) -> dict[str, Any]:
        delta: dict[str, Any] = {"tool_calls": deltas}
        if not self._sent_role:
            self._sent_role = True
            delta = {"role": "assistant", "content": None, **delta}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        return {**self._base, "choices": [choice]}

    def finish(self, reason: str) -> dict[str, Any]:
        return {**self._base, "choices": [self._choice(None, reason)]}

    def usage(self, usage: Usage) -> dict[str, Any]:
        return {**self._base, "choices": [], "usage": usage.to_openai()}


__all__ = [
    "CloudflareProvider",
    "chat_to_cloudflare",
    "completion_to_cloudflare",
    "envelope_error",
    "image_to_cloudflare",
    "infer_kind",
]
