"""OpenAI's Responses API spoken natively, for the `openai` adapter.

A `/v1/responses` request travels the mesh as a chat request (so every provider can serve it)
whose body carries the Responses body itself under `RESPONSES_NATIVE_FIELD`. An upstream that
speaks the Responses API (OpenAI) is sent that body as it is (`POST {base_url}/responses`,
`store: false`: the node keeps its own store), and its answer comes back unchanged: a
`response` object as the Completion body, or each Responses stream event as one StreamChunk.
The front end (`meshnode.api.responses_http`) recognises those and relays them, so reasoning
items with their encrypted content, annotations and OpenAI's exact semantics survive.

Usage comes from the response's `usage` (whole answers, and the `response.completed` /
`response.incomplete` event of a stream). Errors: HTTP errors go through `HttpUpstream` like
every call (retryable before the first event, as chat); an `error` event, or a stream that ends
without a terminal event, is `UpstreamUnavailable` (a broken stream once an event was relayed).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from typing import Any

import aiohttp
import orjson

from meshnode.config import TimeoutsConfig
from meshnode.errors import MeshError, UpstreamUnavailable
from meshnode.providers.http import (
    STREAM_ACCEPT,
    HttpUpstream,
    as_stream_broken,
    iter_sse,
    request_id_headers,
)
from meshnode.types import (
    RESPONSES_NATIVE_FIELD,
    Completion,
    InferenceRequest,
    ModelOffer,
    RequestKind,
    StreamChunk,
    Usage,
)

PATH = "/responses"
TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})


def native_body(request: InferenceRequest) -> Mapping[str, Any] | None:
    """The Responses body a chat request carries, or None (a plain chat request)."""
    if request.kind is not RequestKind.CHAT:
        return None
    native = request.body.get(RESPONSES_NATIVE_FIELD)
    return native if isinstance(native, dict) else None


def usage_of(response: Any) -> Usage | None:
    usage = response.get("usage") if isinstance(response, dict) else None
    if not isinstance(usage, dict):
        return None
    return Usage(prompt_tokens=int(usage.get("input_tokens") or 0),
                 completion_tokens=int(usage.get("output_tokens") or 0))


def _payload(native: Mapping[str, Any], offer: ModelOffer, stream: bool) -> bytes:
    return orjson.dumps({**native, "model": offer.upstream_model, "stream": stream,
                         "store": False})


async def complete(http: HttpUpstream, provider: str, request: InferenceRequest,
                   offer: ModelOffer, timeouts: TimeoutsConfig,
                   native: Mapping[str, Any]) -> Completion:
    data = await http.post_json(PATH, _payload(native, offer, False), deadline=request.deadline,
                                timeouts=timeouts, headers=request_id_headers(request.request_id))
    if data.get("object") != "response":
        raise UpstreamUnavailable(f"{provider} answered /responses without a response object",
                                  provider=provider)
    usage = usage_of(data) or Usage(prompt_tokens=request.prompt_tokens_estimate,
                                    estimated=True)
    return Completion(body=data, usage=usage)


async def stream(http: HttpUpstream, provider: str, request: InferenceRequest,
                 offer: ModelOffer, timeouts: TimeoutsConfig,
                 native: Mapping[str, Any]) -> AsyncIterator[StreamChunk]:
    started = False
    ended = False
    try:
        async with http.stream(
            PATH, _payload(native, offer, True), deadline=request.deadline, timeouts=timeouts,
            headers={**STREAM_ACCEPT, **request_id_headers(request.request_id)},
        ) as resp:
            async with aclosing(iter_sse(resp)) as events:
                async for event in events:
                    if event.data == "[DONE]":
                        break
                    try:
                        data = orjson.loads(event.data)
                    except orjson.JSONDecodeError:
                        raise UpstreamUnavailable(
                            f"{provider} sent a Responses event that is not JSON",
                            provider=provider) from None
                    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
                        raise UpstreamUnavailable(
                            f"{provider} sent a Responses event without a type",
                            provider=provider)
                    if data["type"] == "error":
                        message = data.get("message") or "error event"
                        raise UpstreamUnavailable(f"{provider} reported: {message}",
                                                  provider=provider)
                    usage = None
                    if data["type"] in TERMINAL_EVENTS:
                        ended = True
                        usage = usage_of(data.get("response"))
                    yield StreamChunk(data, usage=usage)
                    started = True
        if not ended:
            raise UpstreamUnavailable(f"{provider} ended the stream before the response ended",
                                      provider=provider)
    except MeshError as err:
        raise (as_stream_broken(err) if started else err) from None
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        error = http.error_for_exception(exc, request.deadline)
        raise (as_stream_broken(error) if started else error) from exc


__all__ = ["PATH", "TERMINAL_EVENTS", "complete", "native_body", "stream", "usage_of"]
