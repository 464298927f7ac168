"""The route layer of the Responses API: `POST /v1/responses`, `GET`/`DELETE
/v1/responses/{id}` and `GET /v1/responses/{id}/input_items`.

A thin handler like the chat one: the body is validated and translated by
`meshnode.api.responses` into one chat request, routed by the same router (so every provider
of the mesh, local, cloud or peer, answers it, with the same failover, budgets and cache), and
the chat answer is written back as a response object or as Responses stream events, each
written the moment its chat chunk arrives. Errors before the first byte are MeshErrors answered
by the request middleware in OpenAI's shape; a failure after it is a `response.failed` event.

An upstream that speaks the Responses API natively (OpenAI) is sent the Responses body itself
(`meshnode.providers.openai_responses`): its response object, or its own stream events, are
relayed as they are, made this node's (our id, the public model name, `x_aiproxy`).

`store` (default true, as at OpenAI) keeps the finished response in the `ResponseStore`
(`RESPONSE_STORE`, scoped by the caller's API key); `previous_response_id` continues a stored
conversation of the same scope.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import time
from typing import Any

from aiohttp import web

from meshnode.api import sse
from meshnode.api.errors import internal_error_message
from meshnode.api.handlers import (
    _aiproxy_headers,
    _json,
    _served_headers,
    open_event_stream,
    require_model,
)
from meshnode.api.protocol import loads_body, parse_chat
from meshnode.api.responses import (
    ResponseEventWriter,
    ResponsesCall,
    chat_to_response,
    error_code,
    is_native_event,
    native_body,
    native_response,
    new_id,
    parse_create,
    to_chat,
)
from meshnode.api.state import CACHE, CONTEXT, STATE, ApiState
from meshnode.errors import InvalidRequest, MeshError, NotFound
from meshnode.governance.http import key_name_of
from meshnode.observability.redact import redact
from meshnode.responses_store import ResponseStore
from meshnode.routing.outcome import Served
from meshnode.types import RESPONSES_NATIVE_FIELD, InferenceRequest, RequestKind, StreamChunk

log = logging.getLogger(__name__)

RESPONSE_STORE = web.AppKey("meshnode_response_store", ResponseStore)


def _scope(request: web.Request) -> str:
    return key_name_of(request) or ""


def _not_found(response_id: str, param: str | None = None) -> NotFound:
    return NotFound(f"Response with id '{response_id}' not found.", param=param)


async def create_response(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    ctx = request[CONTEXT]
    ctx.kind = "responses"
    call = parse_create(loads_body(await request.read()))
    store = request.app[RESPONSE_STORE]
    history: list[dict[str, Any]] = []
    if call.previous_response_id is not None:
        previous = await store.get(_scope(request), call.previous_response_id)
        if previous is None:
            raise _not_found(call.previous_response_id, "previous_response_id")
        history = previous.conversation
    chat = to_chat(call, history)
    inference = parse_chat(
        chat, request_id=ctx.request_id, deadline=time.monotonic() + state.timeout_s,
        headers=_aiproxy_headers(request), key_name=key_name_of(request),
    )
    require_model(state, inference.model, RequestKind.CHAT)
    # An upstream that speaks the Responses API (OpenAI) is sent the Responses body itself.
    inference = dataclasses.replace(inference, body={
        **inference.body, RESPONSES_NATIVE_FIELD: native_body(call, history)})
    ctx.model = inference.model
    ctx.stream = inference.stream
    response_id = new_id("resp")
    created_at = int(time.time())
    state.metrics.in_flight.inc()
    try:
        if inference.stream:
            return await _stream(request, state, call, inference, history, response_id,
                                 created_at)
        cache = request.app.get(CACHE)
        if cache is not None:
            routed = await cache.complete(state.router, inference,
                                          request.headers.get("Cache-Control"))
        else:
            routed = await state.router.complete(inference)
    finally:
        state.metrics.in_flight.dec()
    ctx.served = routed.served
    answer = routed.completion.body
    if answer.get("object") == "response":  # served natively
        body = native_response(call, answer, response_id)
    else:
        body = chat_to_response(call, answer, response_id, created_at)
    body["x_aiproxy"] = routed.served.to_json()
    if call.store:
        await _keep(request, body, [*history, *call.items, *body["output"]])
    return _json(body, headers=_served_headers(routed.served))


async def _keep(request: web.Request, body: dict[str, Any],
                conversation: list[dict[str, Any]]) -> None:
    """Store a finished response. A failed write (disk full) costs a later
    `previous_response_id` its 404, never the answer the client is getting now."""
    try:
        await request.app[RESPONSE_STORE].put(_scope(request), body, conversation)
    except sqlite3.Error as exc:
        log.warning("could not store response %s: %s", body.get("id"), exc)


async def _stream(
    request: web.Request, state: ApiState, call: ResponsesCall, inference: InferenceRequest,
    history: list[dict[str, Any]], response_id: str, created_at: int,
) -> web.StreamResponse:
    ctx = request[CONTEXT]
    response, routed = await open_event_stream(request, state, inference)
    if routed is None:
        return response
    encoder: _ChatAsResponses | _NativeEvents
    if is_native_event(routed.first.data):
        encoder = _NativeEvents(call, response_id, routed.served, ctx.request_id)
    else:
        encoder = _ChatAsResponses(ResponseEventWriter(call, response_id, created_at),
                                   routed.served, ctx.request_id)
    report = await sse.relay(response, routed, encoder, ctx)
    final = encoder.final() if report.completed else None
    if final is not None and call.store:
        await _keep(request, final, [*history, *call.items, *final.get("output", [])])
    return response


def _failure_message(exc: BaseException, request_id: str) -> str:
    if isinstance(exc, MeshError):
        return redact(exc.message)
    return internal_error_message(request_id)


class _ChatAsResponses:
    """The `EventEncoder` of a chat stream as Responses events (`ResponseEventWriter`)."""

    __slots__ = ("_request_id", "_served", "_writer")

    def __init__(self, writer: ResponseEventWriter, served: Served, request_id: str) -> None:
        self._writer = writer
        self._served = served
        self._request_id = request_id

    def start(self) -> bytes:
        return self._writer.start()

    def feed(self, chunk: StreamChunk) -> bytes:
        return self._writer.feed(chunk.data)

    def finish(self) -> bytes:
        served = self._served
        return self._writer.finish(served.to_json(), served.usage.to_openai())

    def fail(self, exc: BaseException) -> bytes:
        return self._writer.fail(exc, _failure_message(exc, self._request_id))

    def final(self) -> dict[str, Any] | None:
        """The response object, once the stream completed."""
        return self._writer.response


class _NativeEvents:
    """The `EventEncoder` of an upstream's own Responses events: relayed as they come, each
    response object in them made ours (`native_response`), `x_aiproxy` on the terminal event."""

    __slots__ = ("_call", "_final", "_last", "_request_id", "_response_id", "_sequence",
                 "_served")

    def __init__(self, call: ResponsesCall, response_id: str, served: Served,
                 request_id: str) -> None:
        self._call = call
        self._response_id = response_id
        self._served = served
        self._request_id = request_id
        self._last: dict[str, Any] = {}
        self._sequence = -1
        self._final: dict[str, Any] | None = None

    def start(self) -> bytes:
        return b""

    def feed(self, chunk: StreamChunk) -> bytes:
        event = dict(chunk.data)
        self._sequence = int(event.get("sequence_number", self._sequence + 1))
        kind = event["type"]
        if isinstance(event.get("response"), dict):
            self._last = native_response(self._call, event["response"], self._response_id)
            event["response"] = self._last
        if kind in ("response.completed", "response.incomplete"):
            x_aiproxy = self._served.to_json()
            self._last = {**self._last, "x_aiproxy": x_aiproxy}
            event["response"] = self._last
            event["x_aiproxy"] = x_aiproxy
            self._final = self._last
        return sse.named_event(kind, event)

    def finish(self) -> bytes:
        return b""

    def fail(self, exc: BaseException) -> bytes:
        failed = {**self._last, "status": "failed",
                  "error": {"code": error_code(exc),
                            "message": _failure_message(exc, self._request_id)}}
        return sse.named_event("response.failed", {
            "type": "response.failed", "sequence_number": self._sequence + 1,
            "response": failed})

    def final(self) -> dict[str, Any] | None:
        """The terminal response (completed, or ended incomplete); None without one."""
        return self._final


async def get_response(request: web.Request) -> web.Response:
    response_id = request.match_info["response_id"]
    if request.query.get("stream") in ("true", "1"):
        raise InvalidRequest("streaming a stored response again is not supported here",
                             param="stream")
    stored = await request.app[RESPONSE_STORE].get(_scope(request), response_id)
    if stored is None:
        raise _not_found(response_id)
    return _json(stored.response)


async def delete_response(request: web.Request) -> web.Response:
    response_id = request.match_info["response_id"]
    if not await request.app[RESPONSE_STORE].delete(_scope(request), response_id):
        raise _not_found(response_id)
    return _json({"id": response_id, "object": "response", "deleted": True})


async def list_input_items(request: web.Request) -> web.Response:
    """The input items of a stored response (the conversation before its output)."""
    response_id = request.match_info["response_id"]
    stored = await request.app[RESPONSE_STORE].get(_scope(request), response_id)
    if stored is None:
        raise _not_found(response_id)
    outputs = len(stored.response.get("output") or ())
    items = stored.conversation[: len(stored.conversation) - outputs]
    data = []
    for i, item in enumerate(items):
        entry = {"type": "message", **item} if "type" not in item else dict(item)
        if entry["type"] == "message" and isinstance(entry.get("content"), str):
            kind = "output_text" if entry.get("role") == "assistant" else "input_text"
            entry["content"] = [{"type": kind, "text": entry["content"]}]
        entry.setdefault("id", f"{response_id}_item_{i}")
        entry.setdefault("status", "completed")
        data.append(entry)
    if request.query.get("order", "desc") == "desc":
        data.reverse()
    return _json({"object": "list", "data": data,
                  "first_id": data[0]["id"] if data else None,
                  "last_id": data[-1]["id"] if data else None, "has_more": False})


def _store_ctx(app: web.Application) -> Any:
    async def store_ctx(app: web.Application) -> Any:
        yield
        await app[RESPONSE_STORE].close()

    return store_ctx(app)


def add_responses_routes(app: web.Application, store: ResponseStore | None = None) -> None:
    """Register the routes; the store defaults to an in-memory one (a node passes its
    data_dir store)."""
    app[RESPONSE_STORE] = store or ResponseStore()
    app.cleanup_ctx.append(_store_ctx)
    r = app.router
    r.add_post("/v1/responses", create_response)
    r.add_get("/v1/responses/{response_id}", get_response)
    r.add_delete("/v1/responses/{response_id}", delete_response)
    r.add_get("/v1/responses/{response_id}/input_items", list_input_items)


__all__ = ["RESPONSE_STORE", "add_responses_routes"]
