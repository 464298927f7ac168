"""providers/h1.py through HttpUpstream, against raw loopback servers that control every byte:
keep-alive reuse (connections counted on the server), a server that closes an idle connection,
content-length, chunked, read-until-close and gzip bodies, broken bodies, slow first byte,
stalls and deadlines, a client that goes away mid-stream, the pool limit, TLS with a CA made
at test time (trusted: works; untrusted: a clear error), the request on the wire, uvloop."""

from __future__ import annotations

import asyncio
import gzip
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import uvloop

from meshnode.config import TimeoutsConfig
from meshnode.errors import DeadlineExceeded, UpstreamTimeout, UpstreamUnavailable
from meshnode.providers.http import HttpUpstream, SseEvent, iter_sse
from tests.kit.wait import wait_for
from tests.unit.rpc.tls_certs import TestCA

TIMEOUTS = TimeoutsConfig(connect_ms=2000, first_byte_ms=5000)
SHORT = TimeoutsConfig(connect_ms=2000, first_byte_ms=200)
JSON_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"

Handler = Callable[["Exchange"], Awaitable[None]]


def _soon(seconds: float = 10.0) -> float:
    return time.monotonic() + seconds


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def json_answer(body: bytes = b'{"ok": 1}', extra: bytes = b"") -> bytes:
    return JSON_HEAD + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body


class Exchange:
    """One accepted connection, as the handler sees it."""

    def __init__(self, server: RawServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, number: int) -> None:
        self.server, self.reader, self.writer, self.number = server, reader, writer, number

    async def request(self) -> tuple[bytes, bytes] | None:
        """The next request's head and body, or None when the client closed."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await self.reader.readexactly(length) if length else b""
        self.server.requests.append((head, body))
        return head, body

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def client_gone(self) -> None:
        """Returns when the client closed its side (EOF or reset)."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.server.hangups += 1


class RawServer:
    """A loopback HTTP/1.1 server whose handler runs once per accepted connection."""

    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext | None = None,
                 host: str = "127.0.0.1") -> None:
        self.handler = handler
        self.host = host
        self.ssl_context = ssl_context
        self.connections = 0
        self.hangups = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._accept, self.host, 0,
                                                  ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{self.host}:{self.port}/v1"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            await self.handler(Exchange(self, reader, writer, self.connections))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def keep_alive(exchange: Exchange) -> None:
    """Answers every request on the connection with a small JSON body."""
    while await exchange.request() is not None:
        await exchange.send(json_answer())


@pytest.fixture
async def http_factory() -> AsyncIterator[Callable[..., HttpUpstream]]:
    made: list[HttpUpstream] = []

    def make(url: str, **kw: object) -> HttpUpstream:
        http = HttpUpstream(provider="raw", base_url=url, **kw)  # type: ignore[arg-type]
        made.append(http)
        return http

    yield make
    for http in made:
        await http.close()


# --------------------------------------------------------------------------- keep-alive
async def test_sequential_calls_reuse_one_connection(http_factory: Callable[..., HttpUpstream]
                                                     ) -> None:
    async with RawServer(keep_alive) as server:
        http = http_factory(server.url)
        for _ in range(5):
            assert await http.post_json("/chat", b"{}", deadline=_soon(),
                                        timeouts=TIMEOUTS) == {"ok": 1}
        assert server.connections == 1 and len(server.requests) == 5


async def test_concurrent_calls_open_what_they_need_then_reuse(
        http_factory: Callable[..., HttpUpstream]) -> None:
    gate = asyncio.Event()

    async def held(exchange: Exchange) -> None:
        while await exchange.request() is not None:
            await gate.wait()
            await exchange.send(json_answer())

    async with RawServer(held) as server:
        http = http_factory(server.url, max_concurrency=8)
        calls = [asyncio.create_task(http.post_json("/c", b"{}", deadline=_soon(),
                                                    timeouts=TIMEOUTS)) for _ in range(3)]
        await wait_for(lambda: len(server.requests) == 3, "three requests in flight")
        gate.set()
        assert await asyncio.gather(*calls) == [{"ok": 1}] * 3
        for _ in range(3):
            await http.post_json("/c", b"{}", deadline=_soon(), timeouts=TIMEOUTS)
        assert server.connections == 3 and len(server.requests) == 6


async def test_max_concurrency_bounds_connections_and_waiters_see_the_deadline(
        http_factory: Callable[..., HttpUpstream]) -> None:
    gate = asyncio.Event()

    async def held(exchange: Exchange) -> None:
        while await exchange.request() is not None:
            await gate.wait()
            await exchange.send(json_answer())

    async with RawServer(held) as server:
        http = http_factory(server.url, max_concurrency=1)
        first = asyncio.create_task(http.post_json("/c", b"{}", deadline=_soon(),
                                                   timeouts=TIMEOUTS))
        second = asyncio.create_task(http.post_json("/c", b"{}", deadline=_soon(),
                                                    timeouts=TIMEOUTS))
        await wait_for(lambda: len(server.requests) == 1, "the first request")
        with pytest.raises(DeadlineExceeded):  # waits for the one connection, then gives up
            await http.post_json("/c", b"{}", deadline=_soon(0.2), timeouts=TIMEOUTS)
        gate.set()
        assert await asyncio.gather(first, second) == [{"ok": 1}] * 2
        assert server.connections == 1 and len(server.requests) == 2


async def test_an_idle_connection_the_server_closed_is_not_reused(
        http_factory: Callable[..., HttpUpstream]) -> None:
    async def one_then_close(exchange: Exchange) -> None:
        if await exchange.request() is not None:
            await exchange.send(json_answer())  # keep-alive as far as the headers say

    async with RawServer(one_then_close) as server:
        http = http_factory(server.url)
        await http.post_json("/c", b"{}", deadline=_soon(), timeouts=TIMEOUTS)
        pool = http._pool  # noqa: SLF001
        assert pool is not None
        await wait_for(lambda: pool.idle == 0, "the client noticed the server's close")
        assert await http.post_json("/c", b"{}", deadline=_soon(),
                                    timeouts=TIMEOUTS) == {"ok": 1}
        assert server.connections == 2


async def test_a_connection_idle_past_keepalive_is_closed_by_us(
        http_factory: Callable[..., HttpUpstream]) -> None:
    async def serve(exchange: Exchange) -> None:
        if await exchange.request() is not None:
            await exchange.send(json_answer())
            await exchange.client_gone()

    async with RawServer(serve) as server:
        http = http_factory(server.url, keepalive_s=0.2)
        await http.post_json("/c", b"{}", deadline=_soon(), timeouts=TIMEOUTS)
        await wait_for(lambda: server.hangups == 1, "the idle connection was closed")
        await http.post_json("/c", b"{}", deadline=_soon(), timeouts=TIMEOUTS)
        assert server.connections == 2


async def test_connection_close_and_http10_answers_are_not_reused(
        http_factory: Callable[..., HttpUpstream]) -> None:
    answers = [json_answer(extra=b"Connection: close\r\n"),
               json_answer().replace(b"HTTP/1.1", b"HTTP/1.0", 1)]

    async def answer(exchange: Exchange) -> None:
        if await exchange.request() is not None:
            await exchange.send(answers[exchange.number - 1])
            await exchange.client_gone()

    async with RawServer(answer) as server:
        http = http_factory(server.url)
        for _ in answers:
            await http.post_json("/c", b"{}", deadline=_soon(), timeouts=TIMEOUTS)
        await wait_for(lambda: server.hangups == 2, "the client closed both connections")
        assert server.connections == 2


async def test_a_post_is_not_retried_when_the_server_drops_it(
        http_factory: Callable[..., HttpUpstream]) -> None:
    async def drop(exchange: Exchange) -> None:
        await exchange.request()  # read it, then close without an answer

    async with RawServer(drop) as server:
        http = http_factory(server.url)
        with pytest.raises(UpstreamUnavailable, match="closed the connection") as info:
            await http.post_json("/c", b"{}", deadline=_soon(), timeouts=TIMEOUTS)
        assert info.value.retryable and info.value.provider == "raw"
        assert len(server.requests) == 1  # like aiohttp: a POST is never sent twice


async def test_bytes_after_the_answer_make_the_connection_unfit_for_reuse(
        http_factory: Callable[..., HttpUpstream]) -> None:
    async def extra(exchange: Exchange) -> None:
        while await exchange.request() is not None:
            if exchange.number == 1:  # an answer, then a second one nobody asked for
                await exchange.send(json_answer() + json_answer(b'{"stray": 1}'))
            else:
                await exchange.send(json_answer())

    async with RawServer(extra) as server:
        http = http_factory(server.url)
        assert await http.post_json("/c", b"{}", deadline=_soon(),
                                    timeouts=TIMEOUTS) == {"ok": 1}
        assert await http.post_json("/c", b"{}", deadline=_soon(),
                                    timeouts=TIMEOUTS) == {"ok": 1}  # never the stray one
        assert server.connections == 2


async def test_an_informational_answer_is_skipped(
        http_factory: Callable[..., HttpUpstream]) -> None:
    async def early(exchange: Exchange) -> None:
        while await exchange.request() is not None:
            await exchange.send(b"HTTP/1.1 100 Continue\r\n\r\n" + json_answer())

    async with RawServer(early) as server:
        http = http_factory(server.url)
        for _ in range(2):
            assert await http.post_json("/c", b"{}", deadline=_soon(),
                                        timeouts=TIMEOUTS) == {"ok": 1}
        assert server.connections == 1


# --------------------------------------------------------------------------- bodies
async def test_content_length_chunked_until_close_and_gzip_bodies_read_the_same(
        http_factory: Callable[..., HttpUpstream]) -> None:
    body = b'{"text": "' + b"x" * 5000 + b'"}'
    packed = gzip.compress(body)
    answers = [
        json_answer(body),
        JSON_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
        + chunk(body[:7]) + chunk(body[7:3000]) + chunk(body[3000:]) + b"0\r\n\r\n",
        JSON_HEAD + b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(packed)
        + packed,
        JSON_HEAD + b"Connection: close\r\n\r\n" + body,  # no length: the body ends at EOF
    ]

    async def answer(exchange: Exchange) -> None:
        while await exchange.request() is not None:
            data = answers[len(exchange.server.requests) - 1]
            for i in range(0, len(data), 997):  # in pieces, so framing spans reads
                await exchange.send(data[i:i + 997])
            if b"Connection: close" in data:
                return

    async with RawServer(answer) as server:
        http = http_factory(server.url)
        for _ in answers:
            resp = await http.request("POST", "/c", b"{}", deadline=_soon(), timeouts=TIMEOUTS)
            assert resp.body == body and resp.content_type == "application/json"
        assert server.connections == 1
        head = server.requests[0][0].lower()
        assert b"accept-encoding: gzip, deflate\r\n" in head


@pytest.mark.parametrize("answer", [
    JSON_HEAD + b"Content-Length: 100\r\n\r\n" + b'{"short": ',  # then the server closes
    JSON_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunk(b'{"a": ') + b"zz\r\n",
])
async def test_a_broken_body_is_upstream_unavailable(
        http_factory: Callable[..., HttpUpstream], answer: bytes) -> None:
    async def broken(exchange: Exchange) -> None:
        if await exchange.request() is not None:
            await exchange.send(answer)

    async with RawServer(broken) as server:
        http = http_factory(server.url)
        with pytest.raises(UpstreamUnavailable, match="broken response body") as info:
            await http.post_json("/c", b"{}", deadline=_soon(), timeouts=TIMEOUTS)
        assert info.value.retryable


async def test_a_response_that_is_not_http_is_upstream_unavailable(
        http_factory: Callable[..., HttpUpstream]) -> None:
    async def garbage(exchange: Exchange) -> None:
        if await exchange.request() is not None:
            await exchange.send(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")

    async with RawServer(garbage) as server:
        http = http_factory(server.url)
        with pytest.raises(UpstreamUnavailable, match="raw"):
            await http.post_json("/c", b"{}", deadline=_soon(), timeouts=TIMEOUTS)


async def test_an_error_status_keeps_its_translation_and_retry_after(
        http_factory: Callable[..., HttpUpstream]) -> None:
    from meshnode.errors import UpstreamRateLimited

    async def limited(exchange: Exchange) -> None:
        while await exchange.request() is not None:
            body = b'{"error": {"message": "slow down sk-test-secret-123456"}}'
            await exchange.send(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\n"
                                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    async with RawServer(limited) as server:
        http = http_factory(server.url, secrets=["sk-test-secret-123456"])
        with pytest.raises(UpstreamRateLimited) as info:
            await http.post_json("/c", b"{}", deadline=_soon(), timeouts=TIMEOUTS)
        assert info.value.retry_after == 3.0
        assert "slow down" in info.value.message and "secret" not in info.value.message
        with pytest.raises(UpstreamRateLimited):
            await http.post_json("/c", b"{}", deadline=_soon(), timeouts=TIMEOUTS)
        assert server.connections == 1  # the error body was read: the connection stayed


async def test_an_error_body_is_read_only_up_to_its_bound(
        http_factory: Callable[..., HttpUpstream]) -> None:
    from meshnode.providers.http import MAX_ERROR_BODY_BYTES

    async def flood(exchange: Exchange) -> None:
        while await exchange.request() is not None:
            if exchange.number == 1:  # a huge error body, its end never sent
                message = b"x" * (2 * MAX_ERROR_BODY_BYTES)
                await exchange.send(b"HTTP/1.1 500 Internal Server Error\r\n"
                                    b"Content-Length: %d\r\n\r\n" % (len(message) + 1)
                                    + message)
                await exchange.client_gone()
                return
            await exchange.send(json_answer())

    async with RawServer(flood) as server:
        http = http_factory(server.url)
        # The stall is not waited for: the first MAX_ERROR_BODY_BYTES are the message (a wait
        # for the rest would end in the deadline's error, not this one).
        with pytest.raises(UpstreamUnavailable, match="HTTP 500"):
            await http.post_json("/c", b"{}", deadline=_soon(), timeouts=TIMEOUTS)
        await wait_for(lambda: server.hangups == 1, "the unread rest dropped the connection")
        assert await http.post_json("/c", b"{}", deadline=_soon(), timeouts=TIMEOUTS) == {"ok": 1}
        assert server.connections == 2


# --------------------------------------------------------------------------- timeouts
async def test_slow_first_byte_times_out_and_hangs_up(
        http_factory: Callable[..., HttpUpstream]) -> None:
    async def silent(exchange: Exchange) -> None:
        if await exchange.request() is not None:
            await exchange.client_gone()

    async with RawServer(silent) as server:
        http = http_factory(server.url)
        with pytest.raises(UpstreamTimeout, match="waiting for data") as info:
            await http.post_json("/c", b"{}", deadline=_soon(), timeouts=SHORT)
        assert info.value.retryable
        await wait_for(lambda: server.hangups == 1, "the client hung up")


async def test_a_reused_connection_times_each_call_by_its_own_read_timeout(
        http_factory: Callable[..., HttpUpstream]) -> None:
    """The connection's timer outlives a call: a call after one with a shorter read timeout
    is not cut by it, and one after a longer timeout is still cut by its own."""
    async def varied(exchange: Exchange) -> None:
        while (got := await exchange.request()) is not None:
            if got[1] == b'"slow"':
                await asyncio.sleep(0.5)  # past SHORT's 200 ms, well inside TIMEOUTS' 5 s
            elif got[1] == b'"silent"':
                await exchange.client_gone()
                return
            await exchange.send(json_answer())

    async with RawServer(varied) as server:
        http = http_factory(server.url)
        assert await http.post_json("/c", b"{}", deadline=_soon(), timeouts=SHORT) == {"ok": 1}
        assert await http.post_json("/c", b'"slow"', deadline=_soon(),
                                    timeouts=TIMEOUTS) == {"ok": 1}
        # A timer kept at the 5 s of the call before would let the 3 s deadline pass first.
        with pytest.raises(UpstreamTimeout, match="waiting for data"):
            await http.post_json("/c", b'"silent"', deadline=_soon(3.0), timeouts=SHORT)
        assert server.connections == 1


async def test_a_stream_that_stalls_mid_way_times_out(
        http_factory: Callable[..., HttpUpstream]) -> None:
    async def stall(exchange: Exchange) -> None:
        if await exchange.request() is not None:
            await exchange.send(SSE_HEAD + chunk(b"data: one\n\n"))
            await exchange.client_gone()

    async with RawServer(stall) as server:
        http = http_factory(server.url)
        events: list[SseEvent] = []
        with pytest.raises(TimeoutError) as info:
            async with http.stream("/c", b"{}", deadline=_soon(), timeouts=SHORT) as resp:
                async for event in iter_sse(resp):
                    events.append(event)
        assert events == [SseEvent("message", "one")]
        assert isinstance(http.error_for_exception(info.value, _soon()), UpstreamTimeout)
        await wait_for(lambda: server.hangups == 1, "the client hung up")


async def test_the_deadline_bounds_a_body_that_keeps_trickling(
        http_factory: Callable[..., HttpUpstream]) -> None:
    async def trickle(exchange: Exchange) -> None:
        if await exchange.request() is not None:
            await exchange.send(SSE_HEAD)
            for _ in range(200):
                await exchange.send(chunk(b": ping\n\n"))  # data, but never an event
                await asyncio.sleep(0.05)

    async with RawServer(trickle) as server:
        http = http_factory(server.url)
        deadline = _soon(0.5)
        with pytest.raises(TimeoutError) as info:
            async with http.stream("/c", b"{}", deadline=deadline, timeouts=SHORT) as resp:
                async for _ in iter_sse(resp):
                    pass
        assert isinstance(http.error_for_exception(info.value, deadline), DeadlineExceeded)
        assert server.connections == 1


async def test_connect_timeout_is_reported_as_connecting() -> None:
    # 10.255.255.1 is not routed anywhere here; use a listening socket whose backlog is full
    # instead, which never completes a handshake on loopback
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):  # fill the accept queue so further SYNs are dropped
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(s)
        http = HttpUpstream(provider="full", base_url=f"http://127.0.0.1:{port}")
        try:
            with pytest.raises(UpstreamTimeout, match="connecting"):
                await http.post_json("/c", b"{}", deadline=_soon(),
                                     timeouts=TimeoutsConfig(connect_ms=300))
        finally:
            await http.close()
    finally:
        for s in fillers:
            s.close()
        listener.close()


# --------------------------------------------------------------------------- streams
async def test_a_stream_read_to_its_end_gives_the_connection_back(
        http_factory: Callable[..., HttpUpstream]) -> None:
    async def stream(exchange: Exchange) -> None:
        while await exchange.request() is not None:
            await exchange.send(SSE_HEAD + chunk(b"data: a\n\n") + chunk(b"data: [DONE]\n\n")
                                + b"0\r\n\r\n")

    async with RawServer(stream) as server:
        http = http_factory(server.url)
        for i in range(3):
            async with http.stream("/c", b"{}", deadline=_soon(), timeouts=TIMEOUTS,
                                   headers={"Accept": "text/event-stream", "x-n": str(i)}
                                   ) as resp:
                assert [e.data async for e in iter_sse(resp)] == ["a", "[DONE]"]
        assert server.connections == 1
        for i, (head, *_) in enumerate(server.requests):
            lines = head.lower().split(b"\r\n")
            # the stream's Accept replaced the JSON one (every call: the merged block is kept)
            assert [line for line in lines if line.startswith(b"accept:")] == [
                b"accept: text/event-stream"]
            assert lines.count(b"x-n: %d" % i) == 1


async def test_a_client_that_goes_away_mid_stream_drops_the_connection(
        http_factory: Callable[..., HttpUpstream]) -> None:
    more = asyncio.Event()

    async def stream(exchange: Exchange) -> None:
        while await exchange.request() is not None:
            if exchange.number == 1:
                await exchange.send(SSE_HEAD + chunk(b"data: first\n\n"))
                await exchange.client_gone()  # the rest would follow; the client left
                more.set()
                return
            await exchange.send(json_answer())

    async with RawServer(stream) as server:
        http = http_factory(server.url)
        seen = asyncio.Event()

        async def consume() -> None:
            async with http.stream("/c", b"{}", deadline=_soon(), timeouts=TIMEOUTS) as resp:
                async for _ in iter_sse(resp):
                    seen.set()

        task = asyncio.create_task(consume())
        await seen.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(more.wait(), 10)  # the upstream saw us go
        assert await http.post_json("/c", b"{}", deadline=_soon(),
                                    timeouts=TIMEOUTS) == {"ok": 1}
        assert server.connections == 2  # the abandoned connection was not reused


async def test_a_cancelled_whole_call_drops_the_connection(
        http_factory: Callable[..., HttpUpstream]) -> None:
    async def slow(exchange: Exchange) -> None:
        while await exchange.request() is not None:
            if exchange.number == 1:
                await exchange.client_gone()
                return
            await exchange.send(json_answer())

    async with RawServer(slow) as server:
        http = http_factory(server.url)
        task = asyncio.create_task(http.post_json("/c", b"{}", deadline=_soon(),
                                                  timeouts=TIMEOUTS))
        await wait_for(lambda: len(server.requests) == 1, "the request arrived")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_for(lambda: server.hangups == 1, "the client hung up")
        await http.post_json("/c", b"{}", deadline=_soon(), timeouts=TIMEOUTS)
        assert server.connections == 2


# --------------------------------------------------------------------------- the wire
async def test_the_request_on_the_wire(http_factory: Callable[..., HttpUpstream]) -> None:
    async with RawServer(keep_alive) as server:
        http = http_factory(server.url.replace("http://", "http://user:p%40ss@"),
                            headers={"X-Extra": "1"})
        await http.post_json("/chat/completions", b'{"a": 1}', deadline=_soon(),
                             timeouts=TIMEOUTS, headers={"accept": "x/y", "x-request-id": "r1"})
        head, body = server.requests[0]
        lines = head.decode().split("\r\n")
        assert lines[0] == "POST /v1/chat/completions HTTP/1.1"
        fields = {k.lower(): v for k, _, v in (ln.partition(": ") for ln in lines[1:] if ln)}
        assert fields["host"] == f"127.0.0.1:{server.port}"
        assert fields["accept"] == "x/y"  # the call's header replaced ours, whatever its case
        assert sum(1 for line in lines if line.lower().startswith("accept:")) == 1
        assert fields["content-length"] == "8" and body == b'{"a": 1}'
        assert fields["x-extra"] == "1" and fields["x-request-id"] == "r1"
        assert fields["authorization"] == "Basic dXNlcjpwQHNz"  # user:p@ss
        assert fields["user-agent"].startswith("meshnode/")


async def test_a_header_with_a_line_break_is_never_sent(
        http_factory: Callable[..., HttpUpstream]) -> None:
    async with RawServer(keep_alive) as server:
        http = http_factory(server.url)
        with pytest.raises(ValueError, match="line break"):
            await http.post_json("/c", b"{}", deadline=_soon(), timeouts=TIMEOUTS,
                                 headers={"x-request-id": "a\r\nX-Evil: 1"})
        assert server.requests == []


# --------------------------------------------------------------------------- TLS
@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    ca = TestCA(tmp_path_factory.mktemp("h1tls"), "upstream")
    leaf = ca.issue("server")
    return leaf.cert_file, leaf.key_file, leaf.ca_file


def _server_context(tls_files: tuple[Path, Path, Path]) -> ssl.SSLContext:
    cert, key, _ = tls_files
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


async def test_tls_with_a_trusted_ca_works_and_reuses(
        tls_files: tuple[Path, Path, Path], http_factory: Callable[..., HttpUpstream]) -> None:
    async with RawServer(keep_alive, _server_context(tls_files)) as server:
        trusted = ssl.create_default_context(cafile=str(tls_files[2]))
        http = http_factory(server.url, ssl_context=trusted)
        for _ in range(2):
            assert await http.post_json("/c", b"{}", deadline=_soon(),
                                        timeouts=TIMEOUTS) == {"ok": 1}
        assert server.connections == 1


async def test_tls_with_an_untrusted_certificate_is_a_clear_error(
        tls_files: tuple[Path, Path, Path], http_factory: Callable[..., HttpUpstream]) -> None:
    async with RawServer(keep_alive, _server_context(tls_files)) as server:
        http = http_factory(server.url)  # the system's CAs: the test CA is not among them
        with pytest.raises(UpstreamUnavailable, match="certificate verify failed") as info:
            await http.post_json("/c", b"{}", deadline=_soon(), timeouts=TIMEOUTS)
        assert info.value.message.startswith("cannot connect to raw")
        assert server.requests == []


async def test_tls_checks_the_host_name(
        tls_files: tuple[Path, Path, Path], http_factory: Callable[..., HttpUpstream]) -> None:
    # the certificate names 127.0.0.1 and localhost, not 127.0.0.2
    async with RawServer(keep_alive, _server_context(tls_files), host="127.0.0.2") as server:
        trusted = ssl.create_default_context(cafile=str(tls_files[2]))
        http = http_factory(server.url, ssl_context=trusted)
        with pytest.raises(UpstreamUnavailable, match="IP address mismatch"):
            await http.post_json("/c", b"{}", deadline=_soon(), timeouts=TIMEOUTS)


# --------------------------------------------------------------------------- uvloop
def test_the_same_calls_on_uvloop() -> None:
    """The node runs on uvloop, whose transports are not asyncio's classes."""

    async def scenario() -> tuple[int, list[str]]:
        async def both(exchange: Exchange) -> None:
            while (request := await exchange.request()) is not None:
                if b"stream" in request[1]:
                    await exchange.send(SSE_HEAD + chunk(b"data: a\n\n") + b"0\r\n\r\n")
                else:
                    await exchange.send(json_answer())

        async with RawServer(both) as server:
            http = HttpUpstream(provider="uv", base_url=server.url)
            try:
                await http.post_json("/c", b"{}", deadline=_soon(), timeouts=TIMEOUTS)
                async with http.stream("/c", b'{"stream": true}', deadline=_soon(),
                                       timeouts=TIMEOUTS) as resp:
                    data = [e.data async for e in iter_sse(resp)]
                await http.post_json("/c", b"{}", deadline=_soon(), timeouts=TIMEOUTS)
            finally:
                await http.close()
            return server.connections, data

    assert uvloop.run(scenario()) == (1, ["a"])
