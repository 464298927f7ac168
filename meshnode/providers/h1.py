"""A lean keep-alive HTTP/1.1 client for the providers' hot calls (issue 20).

Owns, for ONE upstream origin (scheme, host, port):
- `H1Pool`: keep-alive connections (at most `limit` open, idle ones reused newest first and
  closed after `keepalive_s`), DNS answers cached for `dns_cache_s`, TLS through the stdlib's
  `ssl` (certificates and host names checked unless the caller's context says otherwise);
- `_Connection`: an `asyncio.Protocol` that parses responses with `httptools` (llhttp, the
  parser uvicorn uses): content-length, chunked and read-until-close bodies, gzip/deflate,
  flow control (reading pauses while a slow consumer leaves too much buffered);
- `H1Pool.fetch`: one whole call (the request sent, the whole answer read, the connection back
  in the pool), in one coroutine: the non-stream calls;
- `H1Response`: the status and headers of an answer whose body is read as bytes arrive
  (`content.iter_any()`, `content.read(n)`, `content.at_eof()`, the calls `iter_sse` and the
  adapters make), then `release()` (back to the pool when the body was read to its end and the
  server keeps the connection) or `close()` (dropped: the upstream sees us go and stops work).

Timeouts, with one timer handle per call (`loop.call_at`, re-armed lazily, never per read):
`connect_timeout` bounds the TCP connect and the TLS handshake, `read_timeout` every wait for
data (the head, and each wait for body bytes: a body that stalls that long is broken; time a
consumer spends not reading does not count), and the call's `deadline` (a `time.monotonic()`
instant, the loop's clock) bounds the whole call, body included. A call that waits for a free
connection is bounded by its deadline alone.

A non-idempotent request (every call of ours is a POST) is never retried: like aiohttp, a
pooled connection the server closed at the very moment we wrote to it fails the call with
`ServerDisconnected` (the router's failover decides what to do). A connection the server closed
while it sat idle is noticed (EOF) and never handed out.

It must not know about `MeshError`, vendors or JSON: `providers/http.py` builds the request
head and translates the exceptions below, once, into MeshErrors (`error_for_exception`).
Proxies are not spoken here (none is configured anywhere: `HttpUpstream` ignores the
environment's, as it always did).

Exceptions (all `OSError`s, so the adapters' `except (..., OSError, TimeoutError)` holds):

    H1Error(OSError)
     ├── ConnectError          the TCP connect or the TLS handshake failed (refused, DNS,
     │                         an untrusted certificate): nothing was sent
     ├── ConnectTimeout        (also a TimeoutError) connect + handshake took too long
     ├── ReadTimeout           (also a TimeoutError) no data for `read_timeout`
     ├── DeadlineTimeout       (also a TimeoutError) the call's deadline passed
     ├── ServerDisconnected    the server closed before the response head was complete
     ├── PayloadError          the body broke: truncated, bad chunk framing, bad encoding
     └── ProtocolError         the response head is not HTTP/1.1
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
import time
import zlib
from collections import deque
from collections.abc import Coroutine, Sequence
from typing import Any, cast

import httptools

# Reading pauses when this much body is buffered and unread, and resumes below the low mark.
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024

_CONTENT_TYPE = b"content-type"
_CONTENT_ENCODING = b"content-encoding"
_CONTENT_LENGTH = b"content-length"
_TRANSFER_ENCODING = b"transfer-encoding"
# aiohttp's default without brotli/zstd installed, so upstreams answer as they did before
ACCEPT_ENCODING = "gzip, deflate"


class H1Error(OSError):
    """Base of this module's errors (see the module docstring for the tree)."""


class ConnectError(H1Error):
    """Connecting failed before anything was sent."""


class ConnectTimeout(H1Error, TimeoutError):
    """Connecting (TCP and TLS) took longer than `connect_timeout`."""


class ReadTimeout(H1Error, TimeoutError):
    """The upstream sent nothing for `read_timeout` while we waited for data."""


class DeadlineTimeout(H1Error, TimeoutError):
    """The call's deadline passed."""


class ServerDisconnected(H1Error):
    """The server closed the connection before the response head was complete."""


class PayloadError(H1Error):
    """The response body is broken (truncated, malformed framing, undecodable)."""


class ProtocolError(H1Error):
    """The response head is not valid HTTP/1.1."""


_default_context: ssl.SSLContext | None = None


def default_ssl_context() -> ssl.SSLContext:
    """The stdlib's default client context (system CAs, host names checked), made once (it
    reads the CA bundle from disk), with ALPN http/1.1 as aiohttp sets it."""
    global _default_context
    if _default_context is None:
        context = ssl.create_default_context()
        context.set_alpn_protocols(["http/1.1"])
        _default_context = context
    return _default_context


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: at most one request in flight (no pipelining).

    Concurrency: used by one task at a time (the pool hands it out); the protocol callbacks
    run on the loop and only set state and wake the waiting task, they never block."""

    __slots__ = (
        "_body_bytes", "_chunks", "raw_content_type", "_decoder", "_encoding", "_exc",
        "_framed", "_head_done", "_last", "_loop", "_paused", "_pool", "raw_headers",
        "_read_timeout", "_deadline", "_timer", "_waiter", "busy", "closed", "complete",
        "counted", "idle_since", "keep_alive", "parser", "status", "transport",
    )

    def __init__(self, pool: H1Pool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.counted = True  # holds one of the pool's `limit` slots until discarded
        self.idle_since = 0.0
        self.busy = False
        self._timer: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._begin_state()

    def _begin_state(self) -> None:
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.raw_content_type = ""
        self._encoding = b""
        self._framed = False  # content-length or transfer-encoding seen
        self._head_done = False
        self.complete = False
        self.keep_alive = False
        self._chunks: list[bytes] = []
        self._body_bytes = 0
        self._exc: BaseException | None = None
        self._decoder: zlib._Decompress | None = None
        self._paused = False
        self._deadline = 0.0
        self._read_timeout = 0.0
        self._last = 0.0

    # ---- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self.busy:
            # bytes while no request is in flight: nothing can be trusted on this connection
            self.close()
            return
        self._last = self._loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self._exc is None:
                kind = PayloadError if self._head_done else ProtocolError
                self._exc = kind(f"malformed response from the upstream ({exc})")
            self._fail(self._exc)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.discard(self)
        if self.busy and not self.complete and self._exc is None:
            if self._head_done and not self._framed and self._body_allowed():
                self._finish_body()  # a read-until-close body ends here
                self.keep_alive = False
            elif self._head_done:
                self._exc = PayloadError("the response payload is not complete")
            elif exc is not None:
                self._exc = ServerDisconnected(f"the server closed the connection ({exc})")
            else:
                self._exc = ServerDisconnected("the server closed the connection")
        self._cancel_timer()
        self._wake()

    def pause_writing(self) -> None:  # bodies are whole bytes already in memory: nothing to do
        pass

    def resume_writing(self) -> None:
        pass

    # ---- httptools callbacks (run inside feed_data)
    def on_message_begin(self) -> None:
        if self.complete:
            # bytes after the answer's end (a second answer nobody asked for): this one stands,
            # the rest is ignored and the connection is not reused
            self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.complete:
            return
        self.raw_headers.append((name, value))
        lower = name.lower()
        if lower == _CONTENT_TYPE:
            self.raw_content_type = value.decode("latin-1")
        elif lower == _CONTENT_ENCODING:
            self._encoding = value.strip().lower()
        elif lower == _CONTENT_LENGTH or lower == _TRANSFER_ENCODING:
            self._framed = True

    def on_headers_complete(self) -> None:
        if self.complete:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an informational answer: the real one follows
            self.raw_headers = []
            self.raw_content_type = ""
            self._encoding = b""
            self._framed = False
            return
        self.status = status
        encoding = self._encoding
        if encoding == b"gzip" or encoding == b"x-gzip":
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == b"deflate":
            self._decoder = zlib.decompressobj(zlib.MAX_WBITS)  # may switch to raw below
        elif encoding in (b"br", b"zstd"):
            self._exc = PayloadError(f"cannot decode content-encoding {encoding.decode()}")
        self._head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._exc is not None or self.complete:
            return
        decoder = self._decoder
        if decoder is not None:
            try:
                if self._encoding == b"deflate" and not self._chunks and not self._body_bytes \
                        and body and body[0] & 0x0F != 8:
                    # "deflate" that is raw deflate (no zlib header), as some servers send
                    decoder = self._decoder = zlib.decompressobj(-zlib.MAX_WBITS)
                body = decoder.decompress(body)
            except zlib.error as exc:
                self._exc = PayloadError(f"cannot decode the response body ({exc})")
                raise
            if not body:
                return
        self._chunks.append(body)
        self._body_bytes += len(body)
        if self._body_bytes > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        if self._waiter is not None:  # (_wake, inline: this runs for every chunk of a stream)
            self._wake()

    def on_message_complete(self) -> None:
        if not self._head_done or self.complete:  # an informational answer's end; an extra one
            return
        self.keep_alive = self.parser.should_keep_alive()
        self._finish_body()

    def _finish_body(self) -> None:
        decoder = self._decoder
        if decoder is not None:
            try:
                rest = decoder.flush()
            except zlib.error as exc:
                self._exc = PayloadError(f"cannot decode the response body ({exc})")
                rest = b""
            if rest:
                self._chunks.append(rest)
                self._body_bytes += len(rest)
        self.complete = True  # the timer stays armed: it finds the call complete, or the next
        if self._waiter is not None:  # (none, when the head already woke the caller)
            self._wake()

    def _body_allowed(self) -> bool:
        return self.status >= 200 and self.status not in (204, 304)

    # ---- the request side (the task that holds the connection)
    def send(self, data: bytes, deadline: float, read_timeout: float) -> None:
        """Write one request and make sure its timer is armed. The connection's state is fresh:
        a new one's, or reset when the pool took it back (`H1Pool.release`)."""
        self.busy = True
        self._deadline = deadline
        self._read_timeout = read_timeout
        transport = self.transport
        if transport is None or self.closed:
            raise ServerDisconnected("the server closed the connection")
        transport.write(data)
        now = self._last = self._loop.time()
        when = now + read_timeout
        if deadline < when:
            when = deadline
        # The timer outlives the answer it was armed for (one less timer made and cancelled
        # per request): one due no later than this call needs is kept; it looks at the call
        # in flight when it fires and re-arms for it (`_on_timer`).
        timer = self._timer
        if timer is None or timer.when() > when:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(when, self._on_timer)

    async def _wait(self) -> None:
        await self.waiter()
        if self._exc is not None:
            raise self._exc

    def waiter(self) -> asyncio.Future[None]:
        """A future the next data, the end or a failure resolves (the connection's failure
        raised now, if it has one). A wait starts the read clock."""
        if self._exc is not None:
            raise self._exc
        waiter = self._waiter = self._loop.create_future()
        self._last = self._loop.time()
        return waiter

    async def read_any(self) -> bytes:
        """The body bytes buffered now (waiting for some), b"" at the end of the body."""
        while not self._chunks:
            if self._exc is not None:
                raise self._exc
            if self.complete:
                return b""
            await self._wait()
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._consumed(0)
        return data

    async def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes of the body (all of it when n < 0), less only at its end."""
        if n < 0:
            while not self.complete:
                await self._wait()
        else:
            while self._body_bytes < n and not self.complete:
                await self._wait()
        return self.take(n)

    def take(self, n: int = -1) -> bytes:
        """`read`'s end, once its waits are over: up to `n` bytes of what is buffered (all of
        it when n < 0); the connection's failure when nothing is."""
        if self._exc is not None and not self._chunks:
            raise self._exc
        data = b"".join(self._chunks)
        if 0 <= n < len(data):
            data, rest = data[:n], data[n:]
            self._chunks = [rest]
            self._consumed(len(rest))
        else:
            self._chunks = []
            self._consumed(0)
        return data

    def _consumed(self, left: int) -> None:
        self._body_bytes = left
        if self._paused and left < _LOW_WATER and not self.closed and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def at_eof(self) -> bool:
        return self.complete and not self._chunks and self._exc is None

    def reusable(self) -> bool:
        return (self.complete and self.keep_alive and self._exc is None and not self.closed
                and not self._chunks)

    # ---- timer and failure
    def _on_timer(self) -> None:
        self._timer = None
        if self.complete or self._exc is not None or not self.busy:
            return
        now = self._loop.time()
        if now >= self._deadline:
            self._fail(DeadlineTimeout("the call's deadline passed"))
            return
        waiting = self._waiter is not None
        transport = self.transport
        if waiting and now - self._last >= self._read_timeout and (
                transport is None or transport.get_write_buffer_size() == 0):
            self._fail(ReadTimeout(
                f"no data from the upstream for {self._read_timeout:g}s"))
            return
        when = (self._last if waiting else now) + self._read_timeout
        if when <= now:  # still writing a large body: look again a little later
            when = now + min(self._read_timeout, 1.0)
        self._timer = self._loop.call_at(min(self._deadline, when), self._on_timer)

    def _cancel_timer(self) -> None:
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._exc is None:
            self._exc = exc
        self._cancel_timer()
        self._wake()
        self.close()

    def close(self) -> None:
        """Drop the connection (idempotent)."""
        self._cancel_timer()
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
        self._pool.discard(self)


def header_dict(raw: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    """An answer's header lines by lower-case name, repeated ones joined by ", "."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in raw:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def media_type(raw_content_type: str) -> str:
    """A Content-Type's media type without parameters (aiohttp's rule: absent is
    `application/octet-stream`)."""
    return (raw_content_type.partition(";")[0].strip().lower() if raw_content_type
            else "application/octet-stream")


class H1Response:
    """An answer whose head has arrived. `headers`: lower-case names, repeated ones joined by
    ", "; `content_type`: the media type without parameters (aiohttp's rule: absent is
    `application/octet-stream`). Leave with `release()` or `close()` (both idempotent)."""

    __slots__ = ("_conn", "_headers", "_pool", "_raw", "_reader", "content", "content_type",
                 "status")

    def __init__(self, pool: H1Pool, conn: _Connection) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self._reader = conn  # the body's connection (kept after release, as `_conn` is not)
        self.status = conn.status
        # The body, read as bytes arrive (the shape of aiohttp's `StreamReader` that
        # `iter_sse` and the adapters use): the response itself, one object less per call.
        self.content = self
        self._headers: dict[str, str] | None = None
        self._raw = conn.raw_headers
        self.content_type = media_type(conn.raw_content_type)

    @property
    def headers(self) -> dict[str, str]:
        headers = self._headers
        if headers is None:
            headers = self._headers = header_dict(self._raw)
        return headers

    # ---- the body (`content`)
    def at_eof(self) -> bool:
        """The whole body arrived and was read (a broken body is never at its end)."""
        return self._reader.at_eof()

    def read(self, n: int = -1) -> Coroutine[Any, Any, bytes]:
        """Up to `n` bytes of the body (all of it when n < 0), less only at its end."""
        return self._reader.read(n)

    def read_any(self) -> Coroutine[Any, Any, bytes]:
        """What is buffered now (waiting for some); b"" at the end of the body."""
        return self._reader.read_any()

    def iter_any(self) -> H1Response:
        """`async for data in body.iter_any()`: each read yields what is buffered."""
        return self

    def __aiter__(self) -> H1Response:
        return self

    async def __anext__(self) -> bytes:
        data = await self._reader.read_any()
        if not data:
            raise StopAsyncIteration
        return data

    def release(self) -> None:
        """Done with the answer: the connection goes back to the pool when its body was read
        to the end and the server keeps it open; it is closed otherwise."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.release(conn)

    def close(self) -> None:
        """Drop the connection now (the body is abandoned)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


# `H1Pool.fetch`'s answer: status, body, raw Content-Type ("" when absent; `media_type`),
# raw header lines (`header_dict`)
Whole = tuple[int, bytes, str, list[tuple[bytes, bytes]]]


class H1Pool:
    """Keep-alive connections to one origin (see the module docstring).

    Concurrency: one event loop, many tasks; `request` may be called concurrently. A task that
    finds all `limit` connections busy waits for one (bounded by its deadline)."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        tls: bool,
        limit: int,
        keepalive_s: float = 30.0,
        dns_cache_s: float = 300.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.limit = max(1, limit)
        self.keepalive_s = keepalive_s
        self.dns_cache_s = dns_cache_s
        self.ssl_context = (ssl_context or default_ssl_context()) if tls else None
        self.loop = asyncio.get_running_loop()
        self.opened = 0  # connections opened so far (tests count reuse with it)
        self._open = 0
        self._idle: list[_Connection] = []
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._all: set[_Connection] = set()
        self._addresses: Sequence[str] = ()
        self._addresses_until = 0.0
        self._sweep: asyncio.TimerHandle | None = None
        self.closed = False  # close() was called: no new calls (read it, never set it)
        try:
            ipaddress.ip_address(host)
            self._literal = True
        except ValueError:
            self._literal = False

    @property
    def idle(self) -> int:
        """Connections waiting in the pool now (closed ones are dropped as they close)."""
        return len(self._idle)

    async def request(
        self, data: bytes, *, deadline: float, connect_timeout: float, read_timeout: float
    ) -> H1Response:
        """Send one whole request (`data`: head and body) and wait for the response head."""
        conn = self._take_idle()
        if conn is None:
            conn = await self._acquire(deadline, connect_timeout)
        try:
            conn.send(data, deadline, read_timeout)
            # Wait for the response head, in this frame (one coroutine less per call).
            while not conn._head_done:
                await conn.waiter()
            if conn._exc is not None:
                raise conn._exc
        except BaseException:
            conn.close()
            raise
        return H1Response(self, conn)

    async def fetch(
        self, data: bytes, *, deadline: float, connect_timeout: float, read_timeout: float,
        error_limit: int,
    ) -> Whole:
        """Send one whole request (`data`: head and body) and read its whole answer, in this
        frame (no `H1Response`, no body reader: one coroutine for the call): its status, body
        (of a status >= 300, only its first `error_limit` bytes), raw Content-Type and raw
        header lines. The connection goes back to the pool before this returns, or is closed
        when the call failed or left part of the answer unread."""
        conn = self._take_idle()
        if conn is None:
            conn = await self._acquire(deadline, connect_timeout)
        try:
            conn.send(data, deadline, read_timeout)
            while not conn._head_done:
                await conn.waiter()
            if conn._exc is not None:
                raise conn._exc
            status = conn.status
            limit = -1 if status < 300 else error_limit
            # (`_Connection.read`'s waits, here: its coroutine would be one more per call)
            while not conn.complete and (limit < 0 or conn._body_bytes < limit):
                await conn.waiter()
                if conn._exc is not None:
                    raise conn._exc
            body = conn.take(limit)
        except BaseException:
            conn.close()
            raise
        answer = (status, body, conn.raw_content_type, conn.raw_headers)
        self.release(conn)
        return answer

    def release(self, conn: _Connection) -> None:
        conn.busy = False
        if self.closed or not conn.reusable():
            conn.close()
            return
        conn._begin_state()  # noqa: SLF001 - drop the last answer's buffers now
        conn.idle_since = self.loop.time()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)
        if self._sweep is None:
            self._sweep = self.loop.call_at(conn.idle_since + self.keepalive_s, self._on_sweep)

    def discard(self, conn: _Connection) -> None:
        """`conn` is closed: free its slot (once) and let a waiter connect."""
        self._all.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)
        if conn.counted:
            conn.counted = False
            self._open -= 1
            self._wake_waiter()

    async def close(self) -> None:
        """Close every connection, idle or busy (a busy call fails), and refuse new calls."""
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conn in list(self._all):
            conn.close()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectError("the client was closed"))
        await asyncio.sleep(0)  # let the transports' connection_lost run

    # ---- internals
    def _take_idle(self) -> _Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if self.loop.time() - conn.idle_since > self.keepalive_s:
                conn.close()
                continue
            return conn
        return None

    async def _acquire(self, deadline: float, connect_timeout: float) -> _Connection:
        while True:
            if self.closed:
                raise ConnectError("the client was closed")
            conn = self._take_idle()
            if conn is not None:
                return conn
            if self._open < self.limit:
                self._open += 1
                try:
                    return await self._connect(deadline, connect_timeout)
                except BaseException:
                    self._open -= 1
                    self._wake_waiter()
                    raise
            waiter: asyncio.Future[_Connection | None] = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    handed = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    given = waiter.result()
                    if given is not None:
                        self.release(given)  # handed to us as we gave up: pass it on
                    else:
                        self._wake_waiter()
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
                raise
            if handed is not None:
                return handed
            # None: a slot was freed; try again

    def _wake_waiter(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _connect(self, deadline: float, connect_timeout: float) -> _Connection:
        loop = self.loop
        limit_at = min(deadline, loop.time() + connect_timeout)
        where = f"{self.host}:{self.port} ssl:{self.tls}"
        try:
            async with asyncio.timeout_at(limit_at):
                last: OSError | None = None
                for address in await self._resolve():
                    try:
                        _, made = await loop.create_connection(
                            lambda: _Connection(self), address, self.port,
                            ssl=self.ssl_context,
                            server_hostname=self.host if self.tls else None,
                        )
                    except OSError as exc:
                        last = exc
                        continue
                    conn = cast(_Connection, made)
                    if self.closed:
                        conn.close()
                        raise ConnectError("the client was closed")
                    self.opened += 1
                    self._all.add(conn)
                    return conn
                raise last or ConnectError(f"no address for {self.host}")
        except H1Error:
            raise
        except TimeoutError:
            raise ConnectTimeout(f"timed out connecting to {where}") from None
        except OSError as exc:
            detail = f"{type(exc).__name__}: {exc}"
            raise ConnectError(f"cannot connect to host {where} [{detail}]") from exc

    async def _resolve(self) -> Sequence[str]:
        if self._literal:
            return (self.host,)
        now = time.monotonic()
        if self._addresses and now < self._addresses_until:
            return self._addresses
        infos = await self.loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        addresses = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
        self._addresses, self._addresses_until = addresses, now + self.dns_cache_s
        return addresses

    def _on_sweep(self) -> None:
        """Close idle connections older than `keepalive_s`; re-arm while some stay idle."""
        self._sweep = None
        now = self.loop.time()
        for conn in [c for c in self._idle if now - c.idle_since >= self.keepalive_s]:
            conn.close()
        if self._idle:
            oldest = min(c.idle_since for c in self._idle)
            self._sweep = self.loop.call_at(oldest + self.keepalive_s, self._on_sweep)


__all__ = [
    "ACCEPT_ENCODING",
    "ConnectError",
    "ConnectTimeout",
    "DeadlineTimeout",
    "H1Error",
    "H1Pool",
    "H1Response",
    "PayloadError",
    "ProtocolError",
    "ReadTimeout",
    "ServerDisconnected",
    "Whole",
    "default_ssl_context",
    "header_dict",
    "media_type",
]
