"""The HTTP server's own limits: what a client may hold without sending, and how many it may hold.

aiohttp alone waits an hour for a silent connection, forever for a dribbled body, accepts until
the process runs out of file descriptors (then `/health/live` is unreachable too), and answers
its parser's refusals (header floods, oversized headers, TLS bytes on the HTTP port) in plain
text with a traceback at ERROR. This module owns the fixes, all read from `server.*`:

- `idle_timeout_s`: a connection with no request under way is closed (aiohttp's keep-alive
  timer, which also runs from the moment a connection opens);
- `header_timeout_s`: from a request's first byte, its line and headers must be complete;
- `body_timeout_s`: the body must arrive whole (`read_body`, which the front door calls after
  admission, so handlers find it read; 408, and the connection is closed without lingering);
- `max_connections`: lowered to what `RLIMIT_NOFILE` leaves after `FD_HEADROOM`; a new
  connection beyond it displaces the oldest idle one (a silent or half-sent one), or is closed
  when every connection is busy;
- `reserved_connections`: requests other than `/health/*`, `/admin/*` and `/metrics` get 503
  once `max_connections - reserved_connections` connections are busy, so those always have
  room;
- parser refusals are answered in OpenAI's error shape (Anthropic's on `/v1/messages`) with
  one WARNING line.

Every connection starts on the fast door (`meshnode.api.fastdoor.FastDoor`, made by
`LimitedServer`), which serves whole inference POSTs itself and hands any other connection to a
`LimitedRequestHandler` for good; both are counted by `ConnectionGuard` and drained by the
runner's shutdown alike (`LimitedAppRunner(app, fast_door=False)`: aiohttp's handler only).

`LimitedAppRunner` is the runner `meshnode.node.Node` uses; `ConnectionGuard` is shared by the
runner (connection counts) and the app (`CONNECTIONS`, read by the front door in
`meshnode.api.app`: `request_started`/`request_finished` around each request); it also drops
aiohttp's no-op per-request middleware layer of an app without sub-apps
(`drop_current_app_layer`). The handler
subclass reads three attributes of aiohttp's `RequestHandler` (`_request_in_progress`,
`_messages`, `_lingering_time`); the aiohttp version is pinned in requirements/lock.txt and
tests/integration/test_server_limits.py drives all of this against a real node process.
"""

from __future__ import annotations

import asyncio
import logging
import re
import resource
import time
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from meshnode.api.anthropic_door import render_error
from meshnode.api.state import new_request_id
from meshnode.config import ServerConfig
from meshnode.errors import InvalidRequest, MeshError, NoCapacity, RequestTimeout
from meshnode.observability.logging import is_grpc_on_http

log = logging.getLogger(__name__)

# File descriptors left for everything but HTTP connections: gRPC, peers, the worker's pipes,
# sqlite, logs, zeroconf.
FD_HEADROOM = 64
# Paths that keep answering while inference fills the connections (load balancers, meshctl).
PRIORITY_PREFIXES = ("/health/", "/admin/", "/metrics")
# A flood displaces connections by the thousand: say so at most once per this many seconds.
_EVICTION_LOG_INTERVAL_S = 10.0
_MAX_REASON_CHARS = 200
# The start of a request line (a method token, one space, a target): where a head begins.
_REQUEST_LINE = re.compile(rb"[A-Z]{3,10} \S")


def connection_cap(configured: int, reserved: int) -> int:
    """`configured`, lowered so the HTTP connections cannot exhaust the process's open-file
    limit (the soft `RLIMIT_NOFILE`, what `ulimit -n` sets)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    room = soft - FD_HEADROOM if soft > 2 * FD_HEADROOM else soft // 2
    return max(reserved + 1, min(configured, room))


def is_priority(path: str) -> bool:
    return path.startswith(PRIORITY_PREFIXES)


class ConnectionGuard:
    """Counts open and busy connections; decides who is displaced and who gets 503.

    Runs on the event loop only (aiohttp calls it from its protocol callbacks); nothing here
    blocks or awaits.
    """

    def __init__(self, config: ServerConfig, node_id: str) -> None:
        self.config = config
        self.node_id = node_id
        self.max_connections = connection_cap(config.max_connections,
                                              config.reserved_connections)
        self.general_limit = self.max_connections - config.reserved_connections
        # Insertion order is opening order: the first idle one is the oldest.
        self._open: dict[RequestHandler, None] = {}
        self._busy: set[RequestHandler] = set()
        self._busy_general = 0
        self.displaced = 0
        self.refused = 0
        self._displaced_logged = 0
        self._last_eviction_log = 0.0

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def opened(self, handler: RequestHandler) -> None:
        self._open[handler] = None
        if len(self._open) <= self.max_connections:
            return
        victim = next((h for h in self._open if h not in self._busy and h is not handler), None)
        if victim is None:
            self.refused += 1
            victim = handler  # every other connection is busy: this one cannot have room
        else:
            self.displaced += 1
        self._open.pop(victim, None)
        victim.force_close()
        self._log_eviction()

    def closed(self, handler: RequestHandler) -> None:
        self._open.pop(handler, None)
        self._busy.discard(handler)

    def request_started(self, handler: Any, path: str) -> None:
        """Raises NoCapacity when `path` is not a priority path and the general connections are
        all busy."""
        if is_priority(path):
            self._busy.add(handler)
            return
        self.general_started(handler)

    def general_started(self, handler: Any) -> None:
        """`request_started` for a path known not to be a priority one (the fast door's)."""
        if self._busy_general >= self.general_limit:
            raise NoCapacity(
                f"this node is serving {self._busy_general} requests, its limit "
                "(server.max_connections - server.reserved_connections); retry shortly",
                retry_after=1.0,
            )
        self._busy_general += 1
        self._busy.add(handler)

    def request_finished(self, handler: Any, path: str) -> None:
        if is_priority(path):
            self._busy.discard(handler)
            return
        self.general_finished(handler)

    def general_finished(self, handler: Any) -> None:
        """`request_finished` for a path known not to be a priority one."""
        self._busy.discard(handler)
        self._busy_general -= 1

    def _log_eviction(self) -> None:
        now = time.monotonic()
        if now - self._last_eviction_log < _EVICTION_LOG_INTERVAL_S:
            return
        self._last_eviction_log = now
        log.warning(
            "HTTP connections at the cap (%d, server.max_connections within ulimit -n): "
            "%d idle connections displaced, %d new ones refused so far",
            self.max_connections, self.displaced, self.refused,
        )


CONNECTIONS = web.AppKey("meshnode_connection_guard", ConnectionGuard)


class LimitedRequestHandler(RequestHandler):
    """aiohttp's connection handler with a header deadline, a way to drop an abandoned body
    without lingering, and parser refusals in our error shapes."""

    def __init__(self, manager: Server, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._header_deadline: asyncio.TimerHandle | None = None
        self._head_start = b""  # the first bytes of the request being received

    def data_received(self, data: bytes) -> None:
        waiting_for_head = not self._request_in_progress and not self._messages
        # Only bytes that begin a request line: the rest of a refused head can still arrive
        # after aiohttp took its refusal from the queue and before the task answering it ran.
        if waiting_for_head and self._header_deadline is None and _REQUEST_LINE.match(data):
            self._head_start = data[:64]
        super().data_received(data)
        if self._messages or self._request_in_progress:
            self._cancel_header_deadline()
        elif self._header_deadline is None and self.transport is not None:
            self._header_deadline = self._loop.call_later(
                self._guard.config.header_timeout_s, self._header_timed_out
            )

    def _header_timed_out(self) -> None:
        self._header_deadline = None
        if not self._messages and not self._request_in_progress:
            log.warning(
                "closed an HTTP connection whose request headers did not arrive within %ss "
                "(server.header_timeout_s)", self._guard.config.header_timeout_s,
            )
            self.force_close()

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_deadline()
        self._guard.closed(self)
        super().connection_lost(exc)

    def abandon_body(self) -> None:
        """Close after the current answer without reading the rest of the body (aiohttp
        would otherwise linger, reading, for up to `lingering_time`)."""
        self._lingering_time = 0.0
        self.close()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        reason = " ".join(str(message or exc or "malformed request").split())
        reason = reason[:_MAX_REASON_CHARS]
        if status >= 500:
            log.error("HTTP request from %s failed inside aiohttp: %s", request.remote, reason)
            error: MeshError = MeshError("internal error")
        elif is_grpc_on_http(exc):
            # A peer seeded with the HTTP port: aiohttp's own record, which
            # ProtocolMismatchFilter turns into one warning a minute that names the mistake.
            self.log_exception("Error handling request from %s", request.remote, exc_info=exc)
            error = InvalidRequest("this is the HTTP API port; gRPC peers use mesh.listen_addr",
                                   code="malformed_request")
        else:
            log.warning("refused a malformed HTTP request from %s: %s", request.remote, reason)
            error = InvalidRequest(f"malformed HTTP request: {reason}",
                                   code="malformed_request")
        path = "/v1/messages" if self._head_start.split(b" ", 2)[1:2] == [b"/v1/messages"] \
            else "/"
        response = render_error(error, path, new_request_id(), self._guard.node_id)
        if status < 500:
            response.set_status(status)
        response.force_close()
        return response


class LimitedServer(Server):
    """aiohttp's low-level server, making `LimitedRequestHandler`s and counting them; with
    `fast_door` (an app, its fast routes and its front door), every connection starts on a
    `meshnode.api.fastdoor.FastDoor`, which hands it to a `LimitedRequestHandler`
    (`make_handler`) at the first request it does not serve itself."""

    def __init__(self, base: Server, guard: ConnectionGuard,
                 fast_door: tuple[web.Application, dict[str, Any], Any] | None = None) -> None:
        # Built from the server aiohttp's AppRunner made, with every setting it chose.
        super().__init__(base.request_handler, request_factory=base.request_factory,
                         handler_cancellation=base.handler_cancellation,
                         loop=asyncio.get_running_loop(), **base._kwargs)
        self._guard = guard
        self._fast_door = fast_door

    def make_handler(self) -> RequestHandler:
        return LimitedRequestHandler(self, guard=self._guard, loop=self._loop, **self._kwargs)

    def __call__(self) -> Any:
        if self._fast_door is None:
            return self.make_handler()
        from meshnode.api.fastdoor import FastDoor

        app, routes, front_door = self._fast_door
        return FastDoor(self, self._guard, app, routes, front_door,
                        float(self._kwargs.get("keepalive_timeout", 75.0)))

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self._guard.opened(handler)


class LimitedAppRunner(web.AppRunner):
    """An AppRunner whose server applies `ConnectionGuard` and the timeouts of `server.*`."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        self._guard = app[CONNECTIONS]
        # aiohttp closes a connection that waits this long for a request, counted from its
        # opening too.
        kwargs.setdefault("keepalive_timeout", self._guard.config.idle_timeout_s)
        # False: every connection is aiohttp's from its first byte (no `FastDoor`).
        self._fast_door_enabled = bool(kwargs.pop("fast_door", True))
        super().__init__(app, **kwargs)

    async def _make_server(self) -> Server:
        base = await super()._make_server()  # runs the app's startup
        drop_current_app_layer(self.app)
        return LimitedServer(base, self._guard, self._fast_door(base))

    def _fast_door(self, base: Server) -> tuple[web.Application, dict[str, Any], Any] | None:
        """What the fast door needs, when it can serve this app: its only middleware is the
        front door (aiohttp's own layer dropped), and the server cancels a handler whose client
        left, as the fast door does."""
        from meshnode.api.app import fast_front_door, front_door
        from meshnode.api.fastdoor import fast_routes

        app = self.app
        layers = getattr(app, "_middlewares_handlers", None)
        if (not self._fast_door_enabled or not base.handler_cancellation
                or not layers or len(layers) != 1 or layers[0][0] is not front_door):
            return None
        routes = fast_routes(app)
        return (app, routes, fast_front_door(app)) if routes else None


# The layer aiohttp appends to every app's middlewares (`web_middlewares`).
_CURRENT_APP_LAYER = "_fix_request_current_app.<locals>.impl"


def drop_current_app_layer(app: web.Application) -> bool:
    """Drop aiohttp's own last middleware of a frozen app without sub-apps; True if dropped.

    aiohttp wraps each app's handlers in one more middleware that points
    `request.match_info.current_app` at the app whose middlewares run, and back. Without
    sub-apps that is the app the match info already names (aiohttp sets it when it resolves
    the route), so the layer changes nothing and costs a coroutine frame per request on every
    resumption of the handler. This reads aiohttp's `Application._subapps` and
    `_middlewares_handlers` (the version is pinned in requirements/lock.txt); if they look
    other than expected, nothing is changed."""
    handlers = getattr(app, "_middlewares_handlers", None)
    if not app.frozen or getattr(app, "_subapps", None) or not handlers:
        return False
    kept = tuple(h for h in handlers if getattr(h[0], "__qualname__", "") != _CURRENT_APP_LAYER)
    if len(kept) != len(handlers) - 1:
        return False
    app._middlewares_handlers = kept
    return True


async def read_body(request: web.Request) -> bytes:
    """The request's body, read whole within `server.body_timeout_s`, else `RequestTimeout`
    (408) and the connection is closed after the answer without reading the rest.

    A body that came with its headers (most: aiohttp has parsed it to the end already) is read
    without a timer; only one still arriving gets one (`asyncio.timeout`, one timer handle)."""
    guard = request.app.get(CONNECTIONS)
    if guard is None or request.content.is_eof():
        return await request.read()
    timeout_s = guard.config.body_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError:
        log.warning(
            "request body from %s for %s not complete within %ss "
            "(server.body_timeout_s): 408, connection closed",
            request.remote, request.path, timeout_s,
        )
        protocol = request.protocol
        if isinstance(protocol, LimitedRequestHandler):
            protocol.abandon_body()
        raise RequestTimeout(f"the request body did not arrive within {timeout_s} s") from None
