"""The aiohttp application factory: typed state, middlewares, routes, resource lifetimes.

`create_app(router, ...)` is used by production (`meshnode.node.Node`) and by tests alike. The
app owns the providers' lifetime through a `cleanup_ctx` (started when the app starts, closed on
cleanup, which aiohttp runs only after the server stopped accepting and in-flight handlers
drained). It does not bind sockets; the caller runs it (build the runner with
`handler_cancellation=True` so a client that disconnects cancels its upstream call).

Requests reach the front door through aiohttp, or through the fast door
(`meshnode.api.fastdoor`: whole inference POSTs on a thin protocol, with a `FastRequest` in place
of aiohttp's request), which calls `front_door` and the route's handler directly.

One middleware, `front_door` (each layer of middleware cost a coroutine frame and a call per
request), does in order:
- CORS preflights (only with `server.cors.allow_origins`) are answered first
  (`meshnode.api.cors`), before auth;
- the request id (a sane client `x-request-id` is honoured, else one is generated; echoed in
  the response), the error mapping (`meshnode.api.errors`, the one place), and the
  per-request log line and metrics;
- 503 for inference once the connections kept for `/health/*` and `/admin/*` are all that is
  left (`ConnectionGuard`, meshnode/api/server.py);
- a declared body over `server.max_body_bytes` is refused with 413 before it is read
  (aiohttp's `client_max_size` catches bodies without a length);
- the gate a registrar installed at `GATE` (governance: auth, rate limits);
- the body is read whole within `server.body_timeout_s` or answered 408 (`read_body`).

Every answer gets `openai-processing-ms` (set here on whole answers, by
`handlers.open_event_stream` on streams); whole answers of at least `GZIP_MIN_BYTES` are
gzipped for clients that send `Accept-Encoding: gzip`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web
from multidict import istr

from meshnode.api import cors, handlers
from meshnode.api.answer import JsonAnswer
from meshnode.api.anthropic_door import add_anthropic_routes, render_error
from meshnode.api.cors import CORS
from meshnode.api.errors import http_error_response, unexpected_error_response
from meshnode.api.images import add_image_routes
from meshnode.api.responses_http import add_responses_routes
from meshnode.api.server import CONNECTIONS, ConnectionGuard, read_body
from meshnode.api.state import CONTEXT, GATE, STATE, ApiState, RequestContext, new_request_id
from meshnode.config import ServerConfig, TimeoutsConfig
from meshnode.dashboard import add_dashboard_routes
from meshnode.errors import MeshError, PayloadTooLarge
from meshnode.observability import tracing
from meshnode.observability.logging import REQUEST_LOGGER, log_request
from meshnode.observability.metrics import Metrics
from meshnode.routing.router import Router

log = logging.getLogger(__name__)
# The request log line's logger: `_finish` gathers the line's fields only when it is written
# (a call of fifteen keywords to a line that is off cost ~2.5k instructions per request).
_request_log = logging.getLogger(REQUEST_LOGGER)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RouteRegistrar = Callable[[web.Application], None]

# Status logged when the client went away before the answer (nginx's convention).
CLIENT_CLOSED = 499
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")
# Whole answers at least this big are gzipped when the client accepts it (about one packet).
GZIP_MIN_BYTES = 1400
# The headers the front door reads and sets, as `istr`: a multidict lower-cases and hashes a
# plain str name anew on every lookup, an `istr` once.
_REQUEST_ID = istr("x-request-id")
_NODE = istr("x-aiproxy-node")
_PROCESSING_MS = istr("openai-processing-ms")


@web.middleware
async def front_door(
    request: web.Request, handler: Handler, span: Any = None
) -> web.StreamResponse:
    """The one middleware: every step of a request's way in and out, in order, in one frame
    (each middleware layer cost a coroutine and a call per request)."""
    app = request.app
    if request.method == "OPTIONS":
        cors_policy = app.get(CORS)
        if cors_policy is not None:
            preflight = cors_policy.preflight(request)
            if preflight is not None:
                return preflight
    if span is None and tracing.enabled() and request.path.startswith("/v1/"):
        return await _traced(request, handler)
    ctx = _context(request.headers)
    request[CONTEXT] = ctx
    state = app[STATE]
    try:
        guard = app.get(CONNECTIONS)
        protocol, path = request.protocol, request.path
        if guard is not None:
            guard.request_started(protocol, path)  # 503 when only the reserved ones are left
        try:
            length = request.content_length
            if length is not None and length > state.max_body_bytes:
                # Refused on the declared length alone: the body is never read into memory.
                raise PayloadTooLarge(f"request body is {length} bytes; this node accepts at "
                                      f"most {state.max_body_bytes}")
            gate = app.get(GATE)
            settle = gate is not None and await gate.admit(request)
            try:
                if request.body_exists:
                    # After the gate: an unauthenticated body is never read.
                    await read_body(request)
                response = await handler(request)
            finally:
                if settle and gate is not None:
                    gate.settle(request)
        finally:
            if guard is not None:
                guard.request_finished(protocol, path)
    except asyncio.CancelledError:
        # The client disconnected (handler_cancellation): record it, let cancellation go on.
        ctx.error_code = "client_closed"
        _finish(state, ctx, request, CLIENT_CLOSED)
        raise
    except Exception as exc:  # noqa: BLE001 - mapped in the one place (`_error_answer`)
        response = _error_answer(exc, ctx, request, state)
    # (aiohttp writes the answer after this returns: its bookkeeping cannot wait for the write)
    _finish(state, ctx, request, _answered(state, ctx, request, response))
    return response


def _context(headers: Any) -> RequestContext:
    """A request's context: the client's `x-request-id` when it is sane, else a new one."""
    incoming = headers.get(_REQUEST_ID)
    if incoming is not None and _SANE_REQUEST_ID.fullmatch(incoming):
        request_id = incoming
    else:
        request_id = new_request_id()
    return RequestContext(request_id, time.perf_counter())


def _answered(state: ApiState, ctx: RequestContext, request: Any,
              response: web.StreamResponse) -> int:
    """An answer's headers on either door: one not yet sent gets the request id, the node and
    `openai-processing-ms` (and gzip when it is big and the client accepts it). Returns the
    status its metrics and log line record (`_finish`)."""
    # A client gone before its answer was whole (`handlers.open_event_stream`, `sse.relay`) is
    # 499 whichever way its going was noticed, as it is when it cancels the handler.
    status = CLIENT_CLOSED if ctx.error_code == "client_closed" else response.status
    if type(response) is JsonAnswer and response._payload_writer is None \
            and not response._eof_sent:
        # The common answer: its headers set directly (`prepared`, `headers` are properties).
        headers = response._headers
        stamp = True
        body = response._body
        gzip = type(body) is bytes and len(body) >= GZIP_MIN_BYTES
    else:
        headers = response.headers
        stamp = gzip = not response.prepared
    if stamp:
        headers[_REQUEST_ID] = ctx.request_id
        if _NODE not in headers:
            headers[_NODE] = state.node_id
        if _PROCESSING_MS not in headers:
            headers[_PROCESSING_MS] = ctx.processing_ms()
        if gzip:
            _maybe_gzip(request, response)
    return status


def _error_answer(exc: Exception, ctx: RequestContext, request: web.Request,
                  state: ApiState) -> web.StreamResponse:
    """The answer to an error raised on a request's way in or in its handler (the one place
    errors become answers; `ctx` records what the log line and metrics say)."""
    request_id = ctx.request_id
    if isinstance(exc, MeshError):
        ctx.error_code = exc.code or exc.error_type
        ctx.error_provider = exc.provider
        ctx.attempts = exc.attempts
        # Errors raised before the Anthropic door's handler (auth, rate limits, body size)
        # still answer in the envelope its clients parse.
        return render_error(exc, request.path, request_id, state.node_id)
    if isinstance(exc, web.HTTPException):
        # aiohttp's own refusals (no such route, wrong method, body over client_max_size).
        ctx.error_code = "http_" + str(exc.status)
        return http_error_response(exc, request_id, state.node_id, state.max_body_bytes)
    # The one place a bug becomes a generic 500.
    ctx.error_code = "internal_error"
    return unexpected_error_response(exc, request_id, state.node_id)


def fast_front_door(app: web.Application) -> Callable[[Any, Handler], Awaitable[
        tuple[web.StreamResponse, bool | None]]]:
    """`front_door` for the fast door's requests (`meshnode.api.fastdoor.FastRequest`: a POST
    to an inference route whose body, within `server.max_body_bytes`, is here whole; tracing
    off), with what is per app resolved once (the app is frozen): the same steps, the same
    error mapping, log line and metrics, less the ones that are no-ops for such a request
    (preflight, tracing, the declared-length check, the body's read).

    One step more: a whole JSON answer (`JsonAnswer`, an app without prepare hooks) is written
    here (`JsonAnswer.write_whole`) as soon as its headers are set, BEFORE the request's
    bookkeeping (the gate's settle, the guard's count, the metrics and the log line), so the
    client does not wait for it; the bookkeeping follows in the same step of the event loop
    (no await between: nothing else runs before it). Its latency includes the write. A client
    gone when its answer is written (`ConnectionError`) is recorded as 499, `client_closed`.
    Returns the answer and whether it was written here: True/False (keep the connection or
    not), None when the caller sends it (compressed, an app with hooks) or it went out
    already (a stream)."""
    state = app[STATE]
    guard = app.get(CONNECTIONS)
    gate = app.get(GATE)
    plain = not app.on_response_prepare  # CORS, rate-limit headers: aiohttp's `prepare`

    async def door(request: Any, handler: Handler) -> tuple[web.StreamResponse, bool | None]:
        ctx = _context(request.headers)
        request[CONTEXT] = ctx  # a dict's item (C): FastRequest is its own mapping
        protocol = request.protocol
        busy = settle = False
        status: int | None = None  # None: no answer to record (a bug before it was stamped)
        try:
            try:
                if guard is not None:
                    # 503 when only the reserved are left (fast paths are never priority ones).
                    guard.general_started(protocol)
                    busy = True
                settle = gate is not None and await gate.admit(request)
                response = await handler(request)
            except asyncio.CancelledError:
                ctx.error_code = "client_closed"
                status = CLIENT_CLOSED
                raise
            except Exception as exc:  # noqa: BLE001 - mapped in the one place (`_error_answer`)
                response = _error_answer(exc, ctx, request, state)
            status = _answered(state, ctx, request, response)
            written = None
            if plain and type(response) is JsonAnswer:
                try:
                    written = response.write_whole(request)
                except ConnectionError:
                    ctx.error_code = "client_closed"  # never got it: 499, as in `_answered`
                    status = CLIENT_CLOSED
                    raise
            return response, written
        finally:
            # Once each, on every way out: answered, refused, failed, cancelled.
            if settle and gate is not None:
                gate.settle(request)
            if busy and guard is not None:
                guard.general_finished(protocol)
            if status is not None:
                _finish(state, ctx, request, status)

    return door


async def _traced(request: web.Request, handler: Handler) -> web.StreamResponse:
    # One server span per inference request, child of the client's traceparent when it sent
    # one; the router's attempt spans and the peer's spans hang below it.
    with tracing.request_span(
        f"{request.method} {request.path}", request.headers,
        {"http.request.method": request.method, "url.path": request.path},
    ) as span:
        # `span` tells the front door this request is traced already (True if none came).
        response = await front_door(request, handler, span if span is not None else True)
        ctx = request[CONTEXT]
        tracing.set_attributes(span, {
            "http.response.status_code": response.status, "meshnode.request_id": ctx.request_id,
            "meshnode.model": ctx.model or "", "meshnode.error": ctx.error_code or "",
        })
        return response


def _maybe_gzip(request: web.Request, response: web.StreamResponse) -> None:
    """Compress a whole answer above `GZIP_MIN_BYTES` for a client that accepts gzip (20
    embeddings are ~160 KB of JSON). Small answers (most chat answers) are sent as they are:
    gzip would cost more CPU than the bytes it saves; streams are never compressed (each event
    must reach the client the moment it is written)."""
    if not isinstance(response, web.Response) or response.compression:
        return
    body = response.body
    if not isinstance(body, bytes) or len(body) < GZIP_MIN_BYTES:
        return
    if "gzip" not in request.headers.get("Accept-Encoding", "").lower():
        return
    response.enable_compression(web.ContentCoding.gzip)


def _finish(state: ApiState, ctx: RequestContext, request: web.Request, status: int) -> None:
    """Metrics and the request log line, for inference requests only (health checks and
    scrapes would drown the log). A `/v1/` request refused before its handler ran (auth, rate
    limit) is an inference request too."""
    if ctx.kind is None:
        # A /v1/ listing (GET /v1/models) that answered is not an inference request.
        if not request.path.startswith("/v1/") or status < 400:
            return
        ctx.kind = "_unknown"
    latency_s = time.perf_counter() - ctx.started
    served = ctx.served
    key = ctx.key_name
    if served is not None:
        state.metrics.record_served(
            served, kind=ctx.kind, status=status, latency_s=latency_s, ttft_s=ctx.ttft_s,
            error_code=ctx.error_code, key=key, request_id=ctx.request_id,
        )
        if not _request_log.isEnabledFor(logging.INFO):
            return
        log_request(
            request_id=ctx.request_id, method=request.method, path=request.path, status=status,
            started=ctx.started, model=ctx.model, provider=served.offer.provider,
            node=served.node, attempts=len(served.attempts),
            prompt_tokens=served.usage.prompt_tokens,
            completion_tokens=served.usage.completion_tokens, cost=served.cost,
            stream=ctx.stream, error=ctx.error_code, key=key,
        )
    else:
        attempts: Any = ctx.attempts  # routing.outcome.Attempt, typed loosely in MeshError
        state.metrics.record_failed(
            model=ctx.model, kind=ctx.kind, status=status, code=ctx.error_code or str(status),
            provider=ctx.error_provider, attempts=attempts, key=key,
            request_id=ctx.request_id, latency_s=latency_s,
        )
        if not _request_log.isEnabledFor(logging.INFO):
            return
        log_request(
            request_id=ctx.request_id, method=request.method, path=request.path, status=status,
            started=ctx.started, model=ctx.model, provider=ctx.error_provider,
            attempts=len(attempts), stream=ctx.stream, error=ctx.error_code, key=key,
        )


def _providers_ctx(router: Router) -> Callable[[web.Application], AsyncIterator[None]]:
    async def providers_ctx(app: web.Application) -> AsyncIterator[None]:
        started = []
        try:
            for provider in router.providers:
                await provider.start()
                started.append(provider)
            yield
        finally:
            # Runs after the server drained in-flight handlers; close in reverse start order.
            for provider in reversed(started):
                try:
                    await provider.close()
                except Exception:  # noqa: BLE001 - one bad close must not skip the others
                    log.exception("closing provider %s failed", provider.name)

    return providers_ctx


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/chat/completions", handlers.chat_completions)
    r.add_post("/v1/completions", handlers.completions)
    r.add_post("/v1/embeddings", handlers.embeddings)
    r.add_get("/v1/models", handlers.list_models)
    r.add_get("/v1/models/{model_id:.+}", handlers.get_model)
    r.add_get("/health/live", handlers.live)
    r.add_get("/health/ready", handlers.ready)
    r.add_get("/metrics", handlers.metrics)
    r.add_get("/admin/route", handlers.admin_route)
    r.add_post("/admin/route", handlers.admin_route)
    r.add_get("/admin/stats", handlers.admin_stats)
    add_image_routes(app)  # POST /v1/images/generations
    add_anthropic_routes(app)  # POST /v1/messages, /v1/messages/count_tokens
    add_responses_routes(app)  # POST /v1/responses, GET/DELETE /v1/responses/{id}
    add_dashboard_routes(app)  # GET /dashboard (static page over /admin/*)


def create_app(
    router: Router,
    *,
    node_id: str,
    server: ServerConfig | None = None,
    timeouts: TimeoutsConfig | None = None,
    metrics: Metrics | None = None,
    extra_routes: Sequence[RouteRegistrar] = (),
    manage_providers: bool = True,
) -> web.Application:
    """Build the HTTP app around `router`.

    `extra_routes`: callables that add routes (e.g. the mesh's `/admin/mesh`); they run after
    the built-in routes and may use `app[STATE]` in their handlers. With `manage_providers` the
    app starts `router.providers` on startup and closes them on cleanup.
    """
    server = server or ServerConfig()
    # The router's own slice by default: one deadline for the front end and the failover loop.
    timeouts = timeouts or getattr(router, "timeouts", None) or TimeoutsConfig()
    app = web.Application(
        middlewares=[front_door],
        # Bodies without a Content-Length are cut off here while being read.
        client_max_size=server.max_body_bytes,
    )
    metrics = metrics or Metrics()
    metrics.watch_provider_problems(router.provider_problems)
    app[STATE] = ApiState(
        router=router,
        node_id=node_id,
        metrics=metrics,
        max_body_bytes=server.max_body_bytes,
        timeout_s=timeouts.total_ms / 1000.0,
    )
    cors.install(app, server.cors)  # the front door answers preflights first, before auth
    app[CONNECTIONS] = ConnectionGuard(server, node_id)
    add_routes(app)
    for registrar in extra_routes:
        registrar(app)
    if manage_providers:
        app.cleanup_ctx.append(_providers_ctx(router))
    return app
