"""The fast door: a thin asyncio protocol that serves the common inference request itself.

aiohttp's server machinery around the front door (its `RequestHandler`, `BaseRequest`, the
`StreamReader` of the body, the application's route resolution, the answer's finishing) cost
about a quarter of a proxied request's CPU. Every HTTP connection the node accepts starts on a
`FastDoor`. A message that is exactly the common shape, at a message boundary:

- `POST` to one of `FAST_PATHS` (no query string), `HTTP/1.1`;
- one `Content-Length` of at most `FAST_BODY_MAX_BYTES` (and within `server.max_body_bytes`),
  no `Transfer-Encoding`, `Expect` or `Upgrade`;
- a head of `name: value` lines, one space after the colon (`_HEAD` matches it whole), under
  `MAX_HEAD_BYTES`;
- tracing off;

is served here: the front door's steps (`meshnode.api.app.fast_front_door`: request id,
connection guard, gate, the same error mapping, metrics and log line, its per-app parts
resolved once) and the same route handler aiohttp would run are called with a `FastRequest`
(the few parts of `web.Request` they use). A whole JSON answer is written, head and body, in
one `transport.write` by that front door as soon as its headers are set, before the request's
bookkeeping (`JsonAnswer.write_whole`, when the app has no prepare hooks); a stream writes
itself to the transport (`meshnode.api.sse.DirectEventStream`); other answers
(gzipped answers, an app with hooks) go through aiohttp's response classes and a
`StreamWriter` on this protocol.

Anything else (another route, `OPTIONS`, a chunked body, HTTP/1.0, an odd head, a body that is
still arriving when the header deadline passes) hands the connection ONE-WAY to aiohttp's
handler (`LimitedRequestHandler`): the transport is given to it with every byte not yet
served, and the connection is aiohttp's from then on. A request is only served here once its
whole body has arrived, so a body this door holds was read before the gate ran (at most
`FAST_BODY_MAX_BYTES`; bigger bodies go to aiohttp, whose front door admits before reading).

Kept from aiohttp's handler: a client that disconnects cancels its handler (and so its
upstream call; the front door logs 499); `server.header_timeout_s` from a head's first byte;
`server.idle_timeout_s` on a connection waiting for a request (from its opening too);
graceful shutdown (the runner's `Server.pre_shutdown`/`shutdown` see fast connections in its
connection table: idle ones are closed, in-flight requests drain within the grace);
`ConnectionGuard` counts fast connections as it counts aiohttp's.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpVersion11
from aiohttp.http_writer import StreamWriter
from aiohttp.tcp_helpers import tcp_keepalive
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

from meshnode.observability import tracing

if TYPE_CHECKING:
    from meshnode.api.server import ConnectionGuard, LimitedServer

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The answer, and True/False when the door wrote it whole (keep the connection or not).
FrontDoor = Callable[[web.Request, Handler], Awaitable[tuple[web.StreamResponse, bool | None]]]

# The routes served here (when the app has them: their POST handlers are looked up in it).
FAST_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages",
              "/v1/responses")
# Bigger bodies go to aiohttp: its front door runs the gate before reading a body.
FAST_BODY_MAX_BYTES = 256 * 1024
# aiohttp's own limits on a request line and a header line are 8190 bytes each.
MAX_HEAD_BYTES = 8190
# Stop reading while this much is buffered behind a request in flight (pipelining).
_READ_BUFFER_LIMIT = 2 * FAST_BODY_MAX_BYTES
# A head this door serves: `POST <path> HTTP/1.1`, then `name: value` lines of an RFC 9110
# token, a colon, ONE space and a value of visible characters (and inner spaces/tabs) that starts
# and ends with a visible one, nothing else: obs-fold, bare CR or LF, NUL, control bytes, an
# empty value, whitespace at a value's end (the lookbehind: aiohttp strips it), no space or
# more than one space or a tab after the colon go to aiohttp (its strict parser refuses the
# malformed ones in our error shape, and serves the rest). So a value is the line's rest after
# ": ", with no strip, and a header is found in the head's text (`HeadHeaders`). Possessive
# repeats (`*+`, `++`): each class stops at the byte that must follow it (a space, a colon, a
# CR), so backtracking could never find another match, and sre keeps no state for it.
_HEAD = re.compile(
    rb"POST (/[!-~]*+) HTTP/1\.1\r\n"
    rb"((?:[!#$%&'*+\-.^_`|~0-9A-Za-z]++: [!-~\x80-\xff][\t\x20-\x7e\x80-\xff]*+(?<![ \t])\r\n)*+)"
)
_EMPTY_QUERY: MultiDictProxy[str] = MultiDictProxy(MultiDict())
# A head read: its path, the route's handler, its headers, where its body starts, its length,
# whether the connection may be kept after its answer.
_Head = tuple[str, Handler, "HeadHeaders", int, int, bool]
# In a head's lower-cased text (`HeadHeaders`): the headers that decide how a message is framed
# and whether its connection is kept, with their values, in one pass.
_FRAMING = re.compile(
    rb"\r\n(content-length|transfer-encoding|expect|upgrade|connection): ([^\r]*+)")
# The lookup keys of header names (`header_key`), by the name as the code asks it: names come
# from our code, not from clients, but the cache is bounded all the same.
_KEYS: dict[str, bytes] = {}
_KEYS_MAX = 512


def header_key(name: object) -> bytes:
    """b"\r\n<name lower-cased>: ", what starts a header named `name` in a `HeadHeaders`'
    lower-cased text; b"" for a name no header can have (not a str, empty, not ASCII once
    lower-cased, with a CR, LF or colon)."""
    if not isinstance(name, str):
        return b""
    lowered = name.lower()
    if not lowered or not lowered.isascii() or any(c in lowered for c in "\r\n:"):
        return b""
    key = b"\r\n" + lowered.encode("ascii") + b": "
    if len(_KEYS) < _KEYS_MAX:
        _KEYS[str(name)] = key  # (an istr hashes and compares as its text: one entry for both)
    return key


class HeadHeaders:
    """The headers of a head `_HEAD` matched, looked up by name in the head's text; the
    multidict (`CIMultiDictProxy`, what aiohttp gives a handler) is built only when something
    asks for more than a lookup by name (iteration, `items()`, `len`, ...).

    Exact because of what `_HEAD` let through: every line is `name: value` CRLF with a token
    name (ASCII, no colon, no space), one space, a value with no CR or LF in it and no
    whitespace at either end. So a header named N starts where the lower-cased text has CRLF,
    N, colon, space (CRLF appears nowhere else: not in a value, and the text starts with the
    request line's); its value runs from there to the next CRLF. ASCII lower-casing keeps every
    offset, so the value is cut from the text as it came. Lookups are case-insensitive as a
    `CIMultiDict`'s (the name asked is `str.lower()`ed, the text's names are ASCII); the first
    of repeated headers is `get`'s answer, as a multidict's; values are decoded as aiohttp
    decodes them (UTF-8, `surrogateescape`).

    Building the multidict cost ~2k instructions a header line (a split, two strings and an
    entry per line: -29k on the openai SDK's 17-line head) where a request needs a handful of lookups, the door's own done on the
    text directly (`FastDoor._read_head`)."""

    __slots__ = ("_text", "_lower", "_proxy")

    def __init__(self, text: bytes, lower: bytes) -> None:
        # The head from the request line's CRLF to the last header line's CRLF, and the same
        # lower-cased.
        self._text = text
        self._lower = lower
        self._proxy: CIMultiDictProxy[str] | None = None

    def get(self, name: str, default: Any = None) -> Any:
        key = _KEYS.get(name) or header_key(name)
        at = self._lower.find(key) if key else -1
        if at < 0:
            return default
        text = self._text
        at += len(key)
        return text[at:text.index(b"\r\n", at)].decode("utf-8", "surrogateescape")

    def getone(self, name: str, default: Any = ...) -> Any:
        value = self.get(name, ...)
        if value is ...:
            if default is ...:
                raise KeyError(name)
            return default
        return value

    def __getitem__(self, name: str) -> str:
        return self.getone(name)  # type: ignore[no-any-return]

    def getall(self, name: str, default: Any = ...) -> Any:
        key = _KEYS.get(name) or header_key(name)
        out: list[str] = []
        if key:
            text, lower, skip = self._text, self._lower, len(key)
            at = lower.find(key)
            while at >= 0:
                at += skip
                out.append(text[at:text.index(b"\r\n", at)].decode("utf-8", "surrogateescape"))
                at = lower.find(key, at)
        if not out:
            if default is ...:
                raise KeyError(name)
            return default
        return out

    def __contains__(self, name: object) -> bool:
        key = (_KEYS.get(name) if isinstance(name, str) else None) or header_key(name)
        return bool(key) and self._lower.find(key) >= 0

    def has_prefix(self, prefix: bytes) -> bool:
        """Whether a header's lower-cased name starts with `prefix` (lower-case ASCII bytes)."""
        return self._lower.find(b"\r\n" + prefix) >= 0

    # Everything else, from the multidict.
    def multidict(self) -> CIMultiDictProxy[str]:
        proxy = self._proxy
        if proxy is None:
            lines = self._text[2:-2].decode("utf-8", "surrogateescape")
            # (Lists of two, which CIMultiDict takes as pairs: no tuple() per line.)
            proxy = self._proxy = CIMultiDictProxy(CIMultiDict(
                [line.split(": ", 1) for line in lines.split("\r\n")]  # type: ignore[misc]
                if lines else ()))
        return proxy

    def __getattr__(self, name: str) -> Any:  # keys, values, items, copy, ...
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.multidict(), name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.multidict())

    def __len__(self) -> int:
        return len(self.multidict())

    def __bool__(self) -> bool:
        return len(self._text) > 2

    def __eq__(self, other: object) -> bool:
        if isinstance(other, HeadHeaders):
            other = other.multidict()
        return self.multidict() == other

    __hash__ = None  # type: ignore[assignment]  # as a multidict's

    def __repr__(self) -> str:
        return f"<HeadHeaders({list(self.multidict().items())!r})>"


Mapping.register(HeadHeaders)


class FastRequest(dict[Any, Any]):
    """What the front door, the gate and the inference handlers use of a `web.Request`, for a
    request whose body is here whole (so `read()` never waits and `content.is_eof()`).

    The request's own mapping (`request[CONTEXT]`, `.get`) is the object itself, a dict: its
    item access runs in C, not through a Python `__getitem__` per use. Still compared, hashed
    and true as an object (as `web.Request`), never as a dict."""

    __slots__ = ("app", "method", "path", "headers", "protocol", "_keep_alive", "task",
                 "_body", "_writer")

    version = HttpVersion11
    query = _EMPTY_QUERY
    __hash__ = object.__hash__  # type: ignore[assignment]
    __eq__ = object.__eq__  # type: ignore[assignment]
    __ne__ = object.__ne__  # type: ignore[assignment]

    def __bool__(self) -> bool:
        return True

    def __init__(self, app: web.Application, path: str, headers: HeadHeaders,
                 body: bytes, protocol: FastDoor, keep_alive: bool) -> None:
        self.app = app
        self.method = "POST"
        self.path = path
        self.headers = headers
        self.protocol = protocol
        self._keep_alive = keep_alive
        self.task: asyncio.Task[None] | None = None
        self._body = body
        self._writer: StreamWriter | None = None

    @property
    def keep_alive(self) -> bool:
        """False when the client asked to close, or the node is shutting down (the answer then
        says `Connection: close`)."""
        return self._keep_alive and not self.protocol._closing

    @property
    def content_length(self) -> int:
        return len(self._body)

    @property
    def body_exists(self) -> bool:
        return bool(self._body)

    can_read_body = body_exists

    @property
    def content(self) -> FastRequest:
        return self  # `read_body` asks `request.content.is_eof()`

    def is_eof(self) -> bool:
        return True

    async def read(self) -> bytes:
        return self._body

    async def text(self) -> str:
        return self._body.decode()

    async def json(self) -> Any:
        import orjson

        return orjson.loads(self._body)

    @property
    def remote(self) -> str | None:
        transport = self.protocol.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        return str(peer[0]) if isinstance(peer, (tuple, list)) and peer else None

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.protocol.transport

    # What aiohttp's response classes use to send (`StreamResponse._start`, `JsonAnswer`).
    @property
    def _payload_writer(self) -> StreamWriter:
        if self._writer is None:
            self._writer = StreamWriter(self.protocol, self.protocol._loop)
        return self._writer

    @property
    def writer(self) -> StreamWriter:
        return self._payload_writer

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        hooks = self.app.on_response_prepare
        if hooks:
            await hooks.send(self, response)  # type: ignore[arg-type]  # CORS, rate-limit headers


def fast_routes(app: web.Application) -> dict[str, Handler]:
    """The app's POST handlers of `FAST_PATHS` (those it has)."""
    routes: dict[str, Handler] = {}
    for resource in app.router.resources():
        path = resource.canonical
        if path not in FAST_PATHS:
            continue
        for route in resource:
            if route.method == "POST":
                routes[path] = route.handler  # type: ignore[assignment]
    return routes


class FastDoor(BaseProtocol):
    """One HTTP connection: served here while its requests are the common shape, then handed to
    aiohttp for good (`_hand_off`)."""

    def __init__(self, server: LimitedServer, guard: ConnectionGuard, app: web.Application,
                 routes: Mapping[str, Handler], front_door: FrontDoor,
                 keepalive_timeout: float) -> None:
        super().__init__(server._loop)
        self._server = server
        self._guard = guard
        self._app = app
        self._routes = routes
        self._front_door = front_door
        self._keepalive_timeout = keepalive_timeout
        self._header_timeout = guard.config.header_timeout_s
        self._max_body = min(FAST_BODY_MAX_BYTES, guard.config.max_body_bytes)
        self._buffer = bytearray()
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._deadline: float | None = None
        self._phase = "idle"  # "idle", "head" (one is arriving) or "busy" (one is served)
        self._closing = False  # shutting down or the client asked to close: no new requests
        self._handed_off = False
        self._head: _Head | None = None  # read, its body still arriving (`_next`)

    # ----------------------------------------------------------------- connection
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # TCP_NODELAY, as aiohttp's handler
        assert self.transport is not None
        if self._server._kwargs.get("tcp_keepalive", True):
            tcp_keepalive(self.transport)  # SO_KEEPALIVE, as aiohttp's handler
        self._server._connections[self] = self.transport  # type: ignore[index]
        self._guard.opened(self)  # type: ignore[arg-type]
        self._idle()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_timer()
        if not self._handed_off:
            self._server._connections.pop(self, None)  # type: ignore[call-overload]
            self._guard.closed(self)  # type: ignore[arg-type]
        super().connection_lost(exc)
        task = self._task
        if task is not None and not task.done():
            task.cancel()  # the client left: its handler, and so its upstream call, stop

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._task is None:
            self._next()
        elif len(self._buffer) > _READ_BUFFER_LIMIT:
            self._pause_reading_for_buffer()

    # What the runner and ConnectionGuard call on a connection.
    def close(self) -> None:
        """Close once the request in flight (if any) is answered."""
        self._closing = True
        if self._task is None and self.transport is not None:
            self.transport.close()

    def force_close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        """Let the request in flight finish within `timeout`, then cancel it; close."""
        self._closing = True
        self._cancel_timer()
        task = self._task
        if task is not None and not task.done():
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(task)
            except (asyncio.CancelledError, TimeoutError):
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
            if not task.done():
                task.cancel()
        self.force_close()

    # ----------------------------------------------------------------- timers
    # One timer at a time, re-armed lazily: a request on a kept-alive connection moves the
    # deadline (`_deadline`), and the timer, when it fires early, waits for the rest.
    def _arm(self, phase: str, timeout: float) -> None:
        self._phase = phase
        if timeout <= 0:
            self._deadline = None
            return
        deadline = self._deadline = self._loop.time() + timeout
        if self._timer is not None:
            if self._timer_when <= deadline:
                return
            self._timer.cancel()
        self._timer_when = deadline
        self._timer = self._loop.call_at(deadline, self._timed_out)

    def _cancel_timer(self) -> None:
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _idle(self) -> None:
        """Waiting for a request: closed after `server.idle_timeout_s`."""
        self._arm("idle", self._keepalive_timeout)

    def _head_deadline(self) -> None:
        """A head has begun: it must be whole within `server.header_timeout_s`."""
        if self._phase != "head":
            self._arm("head", self._header_timeout)

    def _timed_out(self) -> None:
        self._timer = None
        deadline = self._deadline
        if self._task is not None or self.transport is None or deadline is None:
            return
        if self._loop.time() < deadline:
            self._timer_when = deadline
            self._timer = self._loop.call_at(deadline, self._timed_out)
            return
        self._deadline = None
        if self._phase == "idle":
            self.force_close()
            return
        if self._buffer.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4) >= 0:
            # The head came, its body is still arriving: aiohttp reads it, within
            # server.body_timeout_s.
            self._hand_off()
            return
        log.warning(
            "closed an HTTP connection whose request headers did not arrive within %ss "
            "(server.header_timeout_s)", self._header_timeout,
        )
        self.force_close()

    # ----------------------------------------------------------------- requests
    def _next(self) -> None:
        """Serve the next message in the buffer if it is whole, wait for more if it may still
        be the fast shape, else hand the connection to aiohttp."""
        buffer = self._buffer
        if not buffer:
            return
        if self._closing:
            if self.transport is not None:
                self.transport.close()
            return
        # A head read earlier whose body was still arriving: not parsed again (most clients,
        # http.client, urllib3 and httpx among them, write the head and the body apart).
        head = self._head
        if head is None:
            head = self._read_head(buffer)
            if head is None:
                return
        path, handler, headers, start, length, keep_alive = head
        if len(buffer) < start + length:
            self._head = head
            self._head_deadline()
            return
        self._head = None
        self._phase = "busy"
        body = bytes(buffer[start:start + length])
        del buffer[:start + length]
        request = FastRequest(self._app, path, headers, body, self, keep_alive)
        self._task = task = self._loop.create_task(self._serve(request, handler))
        request.task = task

    def _read_head(self, buffer: bytearray) -> _Head | None:
        """The head at the start of `buffer` if it is whole and the fast shape; None when it is
        not whole yet (the head's deadline armed) or not the fast shape (handed to aiohttp)."""
        end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
        if end < 0:
            if len(buffer) > MAX_HEAD_BYTES or not b"POST /v1/".startswith(bytes(buffer[:9])):
                self._hand_off()
            else:
                self._head_deadline()
            return None
        match = _HEAD.fullmatch(buffer, 0, end + 2)
        if match is None or tracing._tracer is not None:  # tracing.enabled(), without a call
            self._hand_off()
            return None
        path = match.group(1).decode("ascii")
        handler = self._routes.get(path)
        if handler is None:
            self._hand_off()
            return None
        block_start, block_end = match.span(2)
        # From the request line's CRLF: each header line starts after a CRLF (`HeadHeaders`).
        text = bytes(buffer[block_start - 2:block_end])
        lower = text.lower()
        # One Content-Length of ASCII digits (str.isdigit() is also true for "²" and other
        # scripts' digits; bytes.isdigit() only for ASCII ones), no other framing; else
        # aiohttp's to judge. The first Connection header decides, as aiohttp reads it.
        length = -1
        keep_alive: bool | None = None
        for name, value in _FRAMING.findall(lower):
            if name == b"content-length" and length < 0 and value.isdigit():
                length = int(value)
            elif name == b"connection":
                if keep_alive is None:
                    keep_alive = value.find(b"close") < 0
            else:
                length = -2  # a second length, one not digits, another framing
                break
        if length < 0:
            self._hand_off()
            return None
        if length > self._max_body:
            self._hand_off()  # aiohttp's path: 413 on the length, or the gate before the body
            return None
        return (path, handler, HeadHeaders(text, lower), end + 4, length,
                keep_alive is not False)

    async def _serve(self, request: FastRequest, handler: Handler) -> None:
        keep = False
        try:
            # A whole JSON answer is written by the door, before its bookkeeping (`written`).
            response, written = await self._front_door(request, handler)  # type: ignore[arg-type]
            if written is None:
                if not response._eof_sent:  # (a stream ended itself: `sse.relay`)
                    await response.prepare(request)  # type: ignore[arg-type]
                    await response.write_eof()
                keep = request.keep_alive and response.keep_alive is not False
            else:
                keep = written and not self._closing
                if self.writing_paused:
                    await request.writer.drain()
        except asyncio.CancelledError:
            keep = False
            raise
        except ConnectionError:
            keep = False  # the client left while its answer was written
        except Exception:  # noqa: BLE001 - a bug past the front door: as aiohttp, log and close
            log.exception("answering %s failed", request.path)
            keep = False
        finally:
            self._task = None
            if not keep or self._closing:
                self.force_close()
            elif self.transport is not None:
                if self._buffer_paused and len(self._buffer) <= _READ_BUFFER_LIMIT:
                    self._resume_reading_for_buffer()
                self._arm("idle", self._keepalive_timeout)  # `_idle`, one call less
                self._next()

    def _hand_off(self) -> None:
        """Give the connection, with every byte not yet served, to aiohttp's handler."""
        transport = self.transport
        if transport is None or self._handed_off:
            return
        self._cancel_timer()
        self._handed_off = True
        self._server._connections.pop(self, None)  # type: ignore[call-overload]
        self._guard.closed(self)  # type: ignore[arg-type]
        if self._buffer_paused:
            self._resume_reading_for_buffer()
        data, self._buffer = bytes(self._buffer), bytearray()
        handler = self._server.make_handler()
        transport.set_protocol(handler)
        self.transport = None
        handler.connection_made(transport)  # counted by the server and the guard there
        if data:
            handler.data_received(data)
