"""A stream on a real socket, written by the fast door (`sse.DirectEventStream`, straight to the
transport) and by aiohttp's writer (`sse.EventStreamResponse`, on a connection handed to
aiohttp): the same bytes in the same writes (but the `Date` and `openai-processing-ms` values),
flow control while the client does not read, and a client that leaves mid-stream.

The production runner (`LimitedAppRunner`) around a real Router with a frozen clock (so
`x_aiproxy.latency_ms` is the same in both streams) and an in-process provider whose chunks are
fixed; `paced`, it waits a loop turn before each chunk (as for another upstream read), so each
chunk goes out in its own write."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web

from meshnode.api.app import create_app
from meshnode.api.fastdoor import FastDoor
from meshnode.api.server import LimitedAppRunner, LimitedRequestHandler
from meshnode.config import CorsConfig, RoutingConfig, ServerConfig, TimeoutsConfig
from meshnode.errors import StreamBroken
from meshnode.observability.logging import REQUEST_LOGGER
from meshnode.providers.fake import FakeProvider
from meshnode.routing.router import Router
from meshnode.types import InferenceRequest, ModelOffer, StreamChunk, Usage
from tests.kit.wait import wait_for

ORIGIN = "http://app.example"
END = b"\r\n0\r\n\r\n"


class _Provider(FakeProvider):
    """Streams `pieces` as content chunks, then a finish and a usage chunk, every one the same
    bytes on every call. `paced`: a loop turn before each chunk after the first. `broken`: a
    `StreamBroken` after the content. `hang_after_first`: waits for good after the first
    chunk."""

    def __init__(self, pieces: list[str], *, paced: bool = False, broken: bool = False,
                 hang_after_first: bool = False) -> None:
        super().__init__("p", models=["m"], cost_per_1k=0.01)
        self.pieces = pieces
        self.paced = paced
        self.broken = broken
        self.hang_after_first = hang_after_first
        self.handed = 0  # chunks handed to the relay

    def _chunk(self, choices: list[Any], **extra: Any) -> StreamChunk:
        return StreamChunk({"id": "chatcmpl-w", "object": "chat.completion.chunk",
                            "created": 1, "model": "m", "choices": choices, **extra},
                           usage=Usage(3, 2) if "usage" in extra else None)

    async def stream(self, request: InferenceRequest, offer: ModelOffer,
                     timeouts: TimeoutsConfig) -> AsyncIterator[StreamChunk]:
        self.calls.append(request)
        try:
            for i, piece in enumerate(self.pieces):
                if i:
                    if self.hang_after_first:
                        try:
                            await asyncio.Event().wait()
                        except asyncio.CancelledError:
                            self.cancelled += 1
                            raise
                    if self.paced:
                        await asyncio.sleep(0)
                self.handed += 1
                yield self._chunk([{"index": 0, "delta": {"content": piece},
                                    "finish_reason": None}])
            if self.broken:
                raise StreamBroken("the upstream broke", provider=self.name)
            if self.paced:
                await asyncio.sleep(0)
            yield self._chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])
            yield self._chunk([], usage={"prompt_tokens": 3, "completion_tokens": 2,
                                         "total_tokens": 5})
        finally:
            self.closed_streams += 1


@dataclass
class Node:
    runner: LimitedAppRunner
    provider: _Provider
    port: int
    writes: list[bytes] = field(default_factory=list)
    buffered: list[int] = field(default_factory=list)  # the transport's buffer after each write

    def protocols(self) -> list[type]:
        return [type(c) for c in self.runner.server.connections]  # type: ignore[union-attr]

    def connection(self) -> Any:
        (only,) = self.runner.server.connections  # type: ignore[union-attr]
        return only

    def record(self, transport: asyncio.Transport) -> None:
        """Record every write on the server's side of the connection (the fast door's and,
        after a hand-off, aiohttp's: the same transport)."""
        write = transport.write

        def recorded(data: Any) -> None:
            self.writes.append(bytes(data))
            write(data)
            self.buffered.append(transport.get_write_buffer_size())

        transport.write = recorded  # type: ignore[method-assign]


async def _start(provider: _Provider, *, cors: bool = False) -> Node:
    server = ServerConfig(cors=CorsConfig(allow_origins=[ORIGIN] if cors else []))
    router = Router(RoutingConfig(), ["p"], [provider], "node-w", clock=lambda: 100.0)
    app = create_app(router, node_id="node-w", server=server)
    runner = LimitedAppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return Node(runner, provider, runner.addresses[0][1])


@pytest.fixture
async def started() -> AsyncIterator[Callable[..., Any]]:
    nodes: list[Node] = []

    async def start(provider: _Provider, **kw: Any) -> Node:
        node = await _start(provider, **kw)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        await node.runner.cleanup()


def _stream_request(*extra: bytes) -> bytes:
    body = orjson.dumps({"model": "m", "stream": True, "stream_options": {"include_usage": True},
                         "messages": [{"role": "user", "content": "hi"}]})
    head = [b"POST /v1/chat/completions HTTP/1.1", b"Host: x", b"Content-Type: application/json",
            b"x-request-id: wire-1", b"Content-Length: %d" % len(body), *extra]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


async def _connect(node: Node) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    await wait_for(lambda: node.protocols() == [FastDoor], "the connection accepted")
    transport = node.connection().transport
    node.record(transport)
    return reader, writer


async def _stream_once(node: Node, *, via_aiohttp: bool, extra: tuple[bytes, ...] = ()
                       ) -> tuple[bytes, list[bytes]]:
    """One stream on a new connection (first handed to aiohttp by a GET when `via_aiohttp`):
    what the client read and the server's writes of it. The connection is closed after."""
    reader, writer = await _connect(node)
    try:
        if via_aiohttp:
            await _hand_off(node, reader, writer)
        node.writes.clear()
        writer.write(_stream_request(*extra))
        closing = b"Connection: close" in extra
        raw = await reader.read() if closing else await reader.readuntil(END)
        assert raw.endswith(END)
        if not closing:
            # The connection is kept and serves its next request.
            assert node.protocols() == [LimitedRequestHandler if via_aiohttp else FastDoor]
            writer.write(_stream_request())
            assert (await reader.readuntil(END)).startswith(b"HTTP/1.1 200 OK\r\n")
        return raw, node.writes[:len(node.writes) if closing else _writes_of_one(node.writes)]
    finally:
        writer.close()
        await wait_for(lambda: node.protocols() == [], "the connection forgotten")
        node.writes.clear()


async def _hand_off(node: Node, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
    """A request the fast door leaves to aiohttp: the connection is aiohttp's from then on."""
    writer.write(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    length = re.search(rb"(?i)content-length: (\d+)", head)
    assert length is not None
    await reader.readexactly(int(length.group(1)))
    assert node.protocols() == [LimitedRequestHandler]


def _writes_of_one(writes: list[bytes]) -> int:
    """How many of `writes` belong to the first stream (up to its terminating chunk)."""
    return next(i for i, w in enumerate(writes) if w.endswith(END)) + 1


def _masked(data: bytes) -> bytes:
    return re.sub(rb"(?m)^(Date|openai-processing-ms): [^\r\n]*", rb"\1: -", data)


@pytest.mark.parametrize(("paced", "broken", "cors", "extra"), [
    (False, False, False, ()),
    (True, False, True, (b"Origin: " + ORIGIN.encode(),)),
    (True, True, False, ()),
    (True, False, False, (b"Connection: close",)),
], ids=["whole", "paced-with-a-prepare-hook", "broken-mid-stream", "connection-close"])
async def test_a_stream_is_the_same_bytes_in_the_same_writes_on_both_doors(
    started: Callable[..., Any], paced: bool, broken: bool, cors: bool, extra: tuple[bytes, ...],
) -> None:
    node = await started(_Provider(["a", "b", "c"], paced=paced, broken=broken), cors=cors)
    fast, fast_writes = await _stream_once(node, via_aiohttp=False, extra=extra)
    plain, plain_writes = await _stream_once(node, via_aiohttp=True, extra=extra)
    assert _masked(fast) == _masked(plain)
    assert [_masked(w) for w in fast_writes] == [_masked(w) for w in plain_writes]
    assert b"".join(fast_writes) == fast

    head, _, body = fast.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert re.search(rb"(?m)^Transfer-Encoding: chunked\r?$", head)
    assert re.search(rb"(?m)^x-request-id: wire-1\r?$", head)
    assert (b"Access-Control-Allow-Origin: " + ORIGIN.encode() in head) == cors
    assert (b"Connection: close" in head) == (extra == (b"Connection: close",))
    # The head went out with the first events; paced, each chunk in a write of its own.
    assert fast_writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and b"data: " in fast_writes[0]
    assert len(fast_writes) == (4 if paced and not broken else 3 if paced else 1)
    frames = _dechunked(body)
    assert len(frames) == len(fast_writes)
    events = b"".join(frames)
    if broken:
        assert b'"error"' in events and b"[DONE]" not in events
    else:
        assert events.endswith(b"data: [DONE]\n\n") and b'"latency_ms":0.0' in events


def _dechunked(body: bytes) -> list[bytes]:
    """The data of each chunk of a chunked body, checking its framing (and its end)."""
    frames: list[bytes] = []
    while True:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert rest == b"\r\n"
            return frames
        frames.append(rest[:size])
        assert rest[size:size + 2] == b"\r\n"
        body = rest[size + 2:]


async def test_the_fast_door_waits_for_a_client_that_does_not_read(
    started: Callable[..., Any],
) -> None:
    """Big chunks to a client that reads nothing for a while: past the transport's high-water
    mark the writer waits for it to drain (nothing piles up in the server's buffer), and the
    stream is whole once the client reads."""
    pieces = [str(i) * 64 * 1024 for i in range(10)] * 4
    node = await started(_Provider(pieces, paced=True))
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port, limit=1 << 23)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    client = writer.transport
    assert isinstance(client, asyncio.Transport)
    client.pause_reading()  # the client reads nothing until told
    try:
        await wait_for(lambda: node.protocols() == [FastDoor], "the connection accepted")
        door = node.connection()
        transport = door.transport
        transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
        transport.set_write_buffer_limits(high=32 * 1024)
        node.record(transport)
        writer.write(_stream_request())
        await wait_for(lambda: door.writing_paused, "the server's writes paused")
        assert node.provider.handed < len(pieces)  # the relay waits, the source with it
        client.resume_reading()
        raw = await reader.readuntil(END)
    finally:
        writer.close()
    frames = _dechunked(raw.partition(b"\r\n\r\n")[2])
    contents = [orjson.loads(f[6:])["choices"][0]["delta"]["content"] for f in frames[:-1]]
    assert contents == pieces
    # Never more than about one chunk held in the server's buffer past the mark.
    assert max(node.buffered) < 32 * 1024 + 2 * (64 * 1024 + 1024)


def _request_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == REQUEST_LOGGER]


@pytest.mark.parametrize("via_aiohttp", [False, True], ids=["fast-door", "aiohttp"])
async def test_a_client_that_leaves_mid_stream_is_client_closed_and_the_upstream_closed(
    started: Callable[..., Any], caplog: pytest.LogCaptureFixture, via_aiohttp: bool,
) -> None:
    caplog.set_level(logging.INFO)
    node = await started(_Provider(["a", "b"], hang_after_first=True))
    reader, writer = await _connect(node)
    if via_aiohttp:
        await _hand_off(node, reader, writer)
    writer.write(_stream_request())
    first = await reader.readuntil(b"\n\n\r\n")  # the head and the first event
    assert first.startswith(b"HTTP/1.1 200 OK\r\n") and b'"content":"a"' in first
    writer.close()  # mid-stream: the source waits for its next upstream read
    await wait_for(lambda: node.provider.closed_streams == 1, "the upstream call closed")
    assert node.provider.cancelled == 1
    await wait_for(lambda: _request_lines(caplog), "the request's log line")
    (line,) = _request_lines(caplog)
    assert (line.__dict__["status"], line.__dict__["error"]) == (499, "client_closed")
    await wait_for(lambda: node.protocols() == [], "the connection forgotten")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
