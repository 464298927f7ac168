"""The fast door (meshnode/api/fastdoor.py) on a real socket: the production runner
(`LimitedAppRunner`) in front of a real OpenAI provider and the in-process fake upstream.

Each test looks at which protocol holds the connection on the server (`FastDoor` or aiohttp's
`LimitedRequestHandler`), so a fast door that handed everything to aiohttp would fail them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import select
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import hdrs, web
from multidict import CIMultiDict, istr

from meshnode.api import app as app_module
from meshnode.api.app import create_app
from meshnode.api.fastdoor import _HEAD, FastDoor, HeadHeaders
from meshnode.api.server import (
    CONNECTIONS,
    ConnectionGuard,
    LimitedAppRunner,
    LimitedRequestHandler,
)
from meshnode.api.state import CONTEXT, GATE, STATE, Gate
from meshnode.config import validate
from meshnode.observability.logging import REQUEST_LOGGER
from meshnode.providers.registry import ProviderContext, build_providers
from meshnode.routing.router import Router
from tests.kit.fake_openai import Behaviour, FakeOpenAI
from tests.kit.wait import wait_for

HEADER_TIMEOUT_S = 0.5
CHAT = orjson.dumps({"model": "gpt", "messages": [{"role": "user", "content": "hi"}]})


def chat_request(body: bytes = CHAT, extra: bytes = b"") -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s\r\n%s" % (len(body), extra, body))


@dataclass
class Node:
    runner: LimitedAppRunner
    upstream: FakeOpenAI
    port: int

    def guard(self) -> ConnectionGuard:
        return self.runner.app[CONNECTIONS]

    def protocols(self) -> list[type]:
        return [type(c) for c in self.runner.server.connections]  # type: ignore[union-attr]


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with started_node(tmp_path) as running:
        yield running


@contextlib.asynccontextmanager
async def started_node(tmp_path: Path, gate: Gate | None = None) -> AsyncIterator[Node]:
    async with FakeOpenAI() as upstream:
        config = validate({
            "server": {"header_timeout_s": HEADER_TIMEOUT_S, "idle_timeout_s": 30.0,
                       "shutdown_grace_s": 10.0},
            "providers": {"openai": {
                "base_url": upstream.base_url, "credentials": {"api_key": "sk-test"},
                "models": [{"name": "gpt", "openai_model": "gpt-4o"}]}},
        })
        providers = build_providers(
            config, ProviderContext("node-f", tmp_path, config.routing.timeouts))
        router = Router(config.routing, config.fallback_chain(), providers, "node-f")
        app = create_app(router, node_id="node-f", server=config.server,
                         timeouts=config.routing.timeouts)
        if gate is not None:
            app[GATE] = gate
        runner = LimitedAppRunner(app, handler_cancellation=True, access_log=None,
                                  shutdown_timeout=config.server.shutdown_grace_s)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            yield Node(runner, upstream, runner.addresses[0][1])
        finally:
            await runner.cleanup()


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:]
                                                    if line)}
    body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


async def test_keep_alive_chat_then_a_handed_off_request_then_chat_again(node: Node) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    try:
        writer.write(chat_request())
        status, headers, body = await read_answer(reader)
        assert status == 200 and orjson.loads(body)["x_aiproxy"]["provider"] == "openai"
        assert headers["x-aiproxy-node"] == "node-f" and headers["x-request-id"]
        assert "openai-processing-ms" in headers
        assert node.protocols() == [FastDoor]  # served by the fast door, connection kept
        assert node.guard().open_connections == 1

        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = await read_answer(reader)
        assert status == 200 and orjson.loads(body)["data"][0]["id"] == "gpt"
        assert node.protocols() == [LimitedRequestHandler]  # handed to aiohttp for good
        assert node.guard().open_connections == 1  # counted once, before and after

        writer.write(chat_request())
        status, headers, body = await read_answer(reader)
        assert status == 200 and orjson.loads(body)["choices"]
        assert node.upstream.request_count == 2
    finally:
        writer.close()


async def test_two_pipelined_requests_in_one_write_get_two_answers_in_order(node: Node) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    try:
        writer.write(chat_request(extra=b"x-request-id: first\r\n")
                     + chat_request(extra=b"x-request-id: second\r\n"))
        first = await read_answer(reader)
        second = await read_answer(reader)
        assert [first[0], second[0]] == [200, 200]
        assert [first[1]["x-request-id"], second[1]["x-request-id"]] == ["first", "second"]
        assert node.upstream.request_count == 2
        assert node.protocols() == [FastDoor]
    finally:
        writer.close()


async def test_a_fast_door_error_is_the_same_answer_as_aiohttps(node: Node) -> None:
    # A body that is not JSON: 400 in OpenAI's shape from the fast door, and the same bytes
    # (but the request id) once the connection is aiohttp's.
    bad = chat_request(b"{nope", b"x-request-id: r1\r\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    try:
        writer.write(bad)
        fast = await read_answer(reader)
        assert node.protocols() == [FastDoor]
        writer.write(b"OPTIONS /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")  # 405: handed off
        assert (await read_answer(reader))[0] == 405
        writer.write(bad)
        slow = await read_answer(reader)
        assert node.protocols() == [LimitedRequestHandler]
    finally:
        writer.close()
    assert fast[0] == slow[0] == 400
    assert fast[2] == slow[2] and orjson.loads(fast[2])["error"]["type"] == "invalid_request_error"
    same = ("content-type", "x-request-id", "x-aiproxy-node", "server", "content-length")
    assert {k: fast[1][k] for k in same} == {k: slow[1][k] for k in same}


async def test_a_slow_head_is_closed_after_the_header_deadline(
    node: Node, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    try:
        writer.write(b"POST /v1/chat/comp")  # and nothing more
        # Closed by the node (idle_timeout_s is 30 s: this is the header deadline).
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        writer.close()
    # The fast door's own deadline (aiohttp's handler logs under meshnode.api.server).
    assert [r.name for r in caplog.records if "server.header_timeout_s" in r.getMessage()] \
        == ["meshnode.api.fastdoor"]
    await wait_for(lambda: node.protocols() == [], "the connection is forgotten")
    assert node.guard().open_connections == 0


async def test_a_client_that_leaves_mid_request_cancels_the_upstream_call_and_logs_499(
    node: Node, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    node.upstream.script(Behaviour.hang())
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    writer.write(chat_request())
    await node.upstream.wait_until(lambda f: f.request_count == 1, "the upstream has it")
    assert node.protocols() == [FastDoor]
    writer.close()
    await node.upstream.wait_until(lambda f: f.disconnects == 1, "the upstream call closed")

    def lines() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == REQUEST_LOGGER]

    await wait_for(lines, "the request log line")
    assert [r.__dict__["status"] for r in lines()] == [499]
    assert lines()[0].__dict__["error"] == "client_closed"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_shutdown_drains_an_in_flight_fast_request_and_closes_idle_ones(
    node: Node,
) -> None:
    node.upstream.script(Behaviour.ok(delay_s=0.5))
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", node.port)
    try:
        writer.write(chat_request())
        await node.upstream.wait_until(lambda f: f.request_count == 1, "the upstream has it")
        await wait_for(lambda: node.protocols() == [FastDoor, FastDoor], "both accepted")
        cleanup = asyncio.create_task(node.runner.cleanup())
        status, headers, body = await read_answer(reader)  # answered, not cut off
        assert status == 200 and orjson.loads(body)["choices"]
        assert headers.get("connection", "").lower() == "close"
        assert await asyncio.wait_for(reader.read(), 10) == b""
        assert await asyncio.wait_for(idle_reader.read(), 10) == b""  # the idle one: closed
        await asyncio.wait_for(cleanup, 20)
    finally:
        writer.close()
        idle_writer.close()


async def test_a_stream_on_the_fast_door_keeps_the_connection(node: Node) -> None:
    body = orjson.dumps({"model": "gpt", "stream": True,
                         "messages": [{"role": "user", "content": "hi"}]})
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    try:
        writer.write(chat_request(body))
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
        assert re.search(rb"(?i)transfer-encoding: chunked", head)
        events = await reader.readuntil(b"0\r\n\r\n")
        assert b"data: [DONE]" in events and b"x_aiproxy" in events
        assert node.protocols() == [FastDoor]
        writer.write(chat_request())
        assert (await read_answer(reader))[0] == 200
    finally:
        writer.close()


async def test_other_shapes_go_to_aiohttp(node: Node) -> None:
    # HTTP/1.0, a chunked body, a query string: each connection is aiohttp's, and answered.
    cases: list[tuple[bytes, Any]] = [  # (each kept alive, to see who holds it after)
        (b"POST /v1/chat/completions HTTP/1.0\r\nConnection: keep-alive\r\n"
         b"Content-Length: %d\r\n\r\n%s"
         % (len(CHAT), CHAT), None),
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"%x\r\n%s\r\n0\r\n\r\n" % (len(CHAT), CHAT), None),
        (chat_request().replace(b"completions HTTP", b"completions?x=1 HTTP"), None),
    ]
    for raw, _ in cases:
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        try:
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            assert b" 200 " in head.split(b"\r\n")[0], head
            assert node.protocols() == [LimitedRequestHandler]
        finally:
            writer.close()
            await wait_for(lambda: node.protocols() == [], "the connection is forgotten")


async def test_a_body_after_its_head_is_served_here_or_by_aiohttp_once_the_deadline_passed(
    node: Node,
) -> None:
    head, _, body = chat_request().partition(b"\r\n\r\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    try:
        # The body in a later write, as httpx sends it (which door answers depends on whether
        # the header deadline passed in between: either way, the answer).
        writer.write(head + b"\r\n\r\n")
        await writer.drain()
        writer.write(body)
        assert (await read_answer(reader))[0] == 200

        writer.write(head + b"\r\n\r\n")
        # Past the header deadline the connection is aiohttp's, which reads the body.
        await wait_for(lambda: node.protocols() == [LimitedRequestHandler], "handed off")
        writer.write(body)
        status, _, answer = await read_answer(reader)
        assert status == 200 and orjson.loads(answer)["choices"]
    finally:
        writer.close()


async def test_a_head_whose_body_comes_in_later_writes_is_read_once(
    node: Node, monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads = 0
    read_head = FastDoor._read_head

    def counted(self: FastDoor, buffer: bytearray) -> Any:
        nonlocal reads
        reads += 1
        return read_head(self, buffer)

    monkeypatch.setattr(FastDoor, "_read_head", counted)
    head, _, body = chat_request().partition(b"\r\n\r\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    try:
        writer.write(head + b"\r\n\r\n")
        door = await wait_for(lambda: next(
            (c for c in node.runner.server.connections  # type: ignore[union-attr]
             if isinstance(c, FastDoor) and c._head is not None), None), "the head read")
        # The fixture's header deadline (0.5 s) moved out of the way: this test is about the
        # parse, not the deadline (the timer re-arms itself for a later deadline).
        door._deadline = asyncio.get_running_loop().time() + 60.0
        writer.write(body[:5])
        await wait_for(lambda: len(door._buffer) > len(head) + 4, "the body's first bytes")
        writer.write(body[5:])
        status, _, answer = await read_answer(reader)
        assert status == 200 and orjson.loads(answer)["choices"]
        assert reads == 1 and door._head is None
        assert node.protocols() == [FastDoor]
    finally:
        writer.close()


class _Transport(asyncio.Transport):
    """What aiohttp's handler writes, kept (no socket: the test decides when bytes arrive)."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@pytest.mark.parametrize("turns", [0, 1, 2, 3])
async def test_a_malformed_messages_head_is_refused_in_anthropics_envelope_whenever_the_rest_comes(
    node: Node, turns: int,
) -> None:
    # A 100 KB header arrives in several reads; aiohttp refuses it at the first and answers
    # from a task. Bytes of the same head that arrive before that task runs must not be taken
    # for a new request's first line (they were: the refusal came in OpenAI's envelope).
    handler = node.runner.server.make_handler()  # type: ignore[union-attr]
    transport = _Transport()
    handler.connection_made(transport)
    handler.data_received(b"POST /v1/messages HTTP/1.1\r\nX-Huge: " + b"a" * 9000)
    for _ in range(turns):
        await asyncio.sleep(0)
    handler.data_received(b"a" * 4096)
    await wait_for(lambda: b"\r\n\r\n" in transport.written, "the refusal")
    head, _, body = bytes(transport.written).partition(b"\r\n\r\n")
    assert b" 400 " in head.split(b"\r\n")[0], head
    answer = orjson.loads(body)
    assert answer["type"] == "error"
    assert answer["error"]["message"].startswith("malformed HTTP request")
    handler.connection_lost(None)


@pytest.mark.parametrize("length", ["\u00b2", "\u0661\u0662", "+5", "5 5", "0x5"])
async def test_a_content_length_that_is_not_ascii_digits_is_aiohttps_to_refuse(
    node: Node, length: str,
) -> None:
    # str.isdigit() is true for "²" and Arabic-Indic digits, and int() reads the latter: the
    # fast door must not frame a body by a length aiohttp's parser would refuse.
    body = b"{}" + b"x" * 10
    raw = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: " + length.encode() + b"\r\n\r\n" + body)
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    try:
        writer.write(raw)
        status, _, answer = await read_answer(reader)
        assert status == 400, answer
        assert orjson.loads(answer)["error"]["code"] == "malformed_request"
        assert node.upstream.requests == []  # nothing was framed and forwarded
    finally:
        writer.close()


# Header lines (after Host, Content-Type, Content-Length) and whether the fast door serves the
# request: anything `_HEAD` refuses goes to aiohttp, which refuses the malformed ones and serves
# the unusual-but-valid ones (no space or several after the colon, an empty value).
HEADS = [
    (b"X-A: a: b\r\n", True),
    (b"X-A: a\tb c\r\n", True),
    (b"X-A: caf\xc3\xa9\r\n", True),
    (b"X-A: a\r\n b\r\n", False),  # obs-fold
    (b"X-A: a\nX-B: b\r\n", False),  # bare LF
    (b"X-A: a\rb\r\n", False),  # bare CR
    (b"X-A: a\x00b\r\n", False),  # NUL
    (b"X-A: a\x01b\r\n", False),  # control byte
    (b"X-A: a\x7fb\r\n", False),  # DEL
    (b"X-A : a\r\n", False),  # space before the colon
    (b"X-A: a \r\n", False),  # trailing whitespace
    (b"X-A: a\t\r\n", False),
    (b"X(A): a\r\n", False),  # non-token name characters
    (b"X@A: a\r\n", False),
    (b": a\r\n", False),  # empty name
    (b"X-A\r\n", False),  # no colon
    (b"X-A:a\r\n", False),  # no space after the colon: aiohttp serves it
    (b"X-A:  a\r\n", False),  # two
    (b"X-A:\ta\r\n", False),  # a tab
    (b"X-A:\r\n", False),  # empty value
    (b"Transfer-Encoding: chunked\r\n", False),
    (b"TRANSFER-ENCODING: chunked\r\n", False),  # names are case-insensitive
    (b"upgrade: h2c\r\n", False),
    # Names that contain or are contained in the framing ones, and their text in a value:
    # other headers (the lookups match whole names at a line's start).
    (b"X-Transfer-Encoding: chunked\r\n", True),
    (b"Transfer-Encodings: chunked\r\n", True),
    (b"X-A: x\r\nX-B: Transfer-Encoding: chunked\r\n", True),
    (b"Content-Length-Extra: 5\r\n", True),
    (b"X-Content-Length: 5\r\n", True),
]


@pytest.mark.parametrize(("extra", "served_here"), HEADS)
async def test_a_head_is_served_here_only_when_it_is_plain_tokens_and_values(
    node: Node, extra: bytes, served_here: bool,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    try:
        writer.write(chat_request(extra=extra))
        status, _, answer = await read_answer(reader)
        if served_here:
            assert status == 200, answer
            assert node.protocols() == [FastDoor]
        else:
            assert FastDoor not in node.protocols()  # aiohttp's answer (a 400, or served)
    finally:
        writer.close()


async def test_a_duplicate_content_length_goes_to_aiohttp(node: Node) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    try:
        writer.write(chat_request(extra=b"Content-Length: %d\r\n" % len(CHAT)))
        status, _, answer = await read_answer(reader)
        assert status == 400, answer
        assert FastDoor not in node.protocols()
        assert node.upstream.requests == []
    finally:
        writer.close()


# --------------------------------------------------------------------------- the answer first
class _Client:
    """A raw client socket whose received bytes a hook on the node's loop can look at without
    taking them (MSG_PEEK): what the client has at the moment the hook runs."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setblocking(False)

    def has(self) -> bytes:
        # The node writes straight to the socket: once written, the bytes are here at once.
        # (0.2 s: long enough for loopback, short enough for a hook run before the write.)
        if self.sock.fileno() < 0 or not select.select([self.sock], [], [], 0.2)[0]:
            return b""
        return self.sock.recv(1 << 16, socket.MSG_PEEK)

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def read_all(self) -> bytes:
        loop, out = asyncio.get_running_loop(), bytearray()
        while chunk := await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 16), 10):
            out += chunk
        return bytes(out)


class _RecordingGate:
    """A gate that admits every request with a settle due, recording each step in `events`
    (with what the client has by then: `_Client.has`)."""

    def __init__(self, events: list[tuple[str, str, bytes]]) -> None:
        self.events = events
        self.client: _Client | None = None

    async def admit(self, request: Any) -> bool:
        self.events.append(("admit", request[CONTEXT].request_id, b""))
        return True

    def settle(self, request: Any) -> None:
        assert self.client is not None
        self.events.append(("settle", request[CONTEXT].request_id, self.client.has()))


@contextlib.asynccontextmanager
async def recorded_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        caplog: pytest.LogCaptureFixture,
                        ) -> AsyncIterator[tuple[Node, _RecordingGate]]:
    """A node whose gate, metrics (`record_served`, `record_failed`) and request log line
    record what its client has when each runs."""
    events: list[tuple[str, str, bytes]] = []
    gate = _RecordingGate(events)
    async with started_node(tmp_path, gate) as node:
        metrics = node.runner.app[STATE].metrics

        def recording(name: str) -> Any:
            real = getattr(metrics, name)

            def record(*args: Any, **kwargs: Any) -> None:
                assert gate.client is not None
                events.append((name, kwargs["request_id"], gate.client.has()))
                real(*args, **kwargs)

            return record

        for name in ("record_served", "record_failed"):
            monkeypatch.setattr(metrics, name, recording(name))

        class LogHook(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                assert gate.client is not None
                events.append((f"log {record.__dict__['status']}", record.__dict__["request_id"],
                               gate.client.has()))

        caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
        hook = LogHook()
        logging.getLogger(REQUEST_LOGGER).addHandler(hook)
        try:
            yield node, gate
        finally:
            logging.getLogger(REQUEST_LOGGER).removeHandler(hook)


async def test_a_whole_answer_reaches_the_client_before_its_bookkeeping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    # The gate's settle, the metrics and the log line run after the answer was written (the
    # client has every byte of it by then), and a pipelined request's admission after all of
    # its predecessor's bookkeeping.
    async with recorded_node(tmp_path, monkeypatch, caplog) as (node, gate):
        client = gate.client = _Client(node.port)
        try:
            await client.send(chat_request(extra=b"x-request-id: one\r\n")
                              + chat_request(b"{nope", b"x-request-id: two\r\n")
                              + chat_request(extra=b"x-request-id: three\r\n"
                                             b"Connection: close\r\n"))
            # (nothing read before the last step: `has` sees every byte from the first)
            await wait_for(lambda: len(gate.events) == 12, "three requests' bookkeeping")
            answers = await client.read_all()
        finally:
            client.sock.close()
        one, two, three = (answers.index(b"x-request-id: %s\r\n" % r) for r in
                           (b"one", b"two", b"three"))
        assert one < two < three and answers.count(b"HTTP/1.1 ") == 3
        ends = [answers.index(b"HTTP/1.1 ", two - 200), answers.index(b"HTTP/1.1 ", three - 200),
                len(answers)]  # where each answer ends: the next one's status line
        assert [(step, rid) for step, rid, _ in gate.events] == [
            ("admit", "one"), ("settle", "one"), ("record_served", "one"), ("log 200", "one"),
            ("admit", "two"), ("settle", "two"), ("record_failed", "two"), ("log 400", "two"),
            ("admit", "three"), ("settle", "three"), ("record_served", "three"),
            ("log 200", "three")]
        for (step, rid, has), end in zip(gate.events, [e for e in ends for _ in range(4)],
                                         strict=True):
            if step != "admit":  # each answer whole at the client, the next not yet there
                assert has == answers[:end], (step, rid)
        assert node.guard()._busy_general == 0


async def test_a_client_gone_when_its_answer_is_written_is_499_and_settled_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    # The transport closes between the handler's answer and its write (no cancellation came):
    # the client never got it, so it is recorded as 499, client_closed, the gate settled and
    # the guard's count released once, no error logged.
    answered = app_module._answered

    def closing(state: Any, ctx: Any, request: Any, response: Any) -> int:
        request.protocol.transport.close()
        return answered(state, ctx, request, response)

    monkeypatch.setattr(app_module, "_answered", closing)
    async with recorded_node(tmp_path, monkeypatch, caplog) as (node, gate):
        client = gate.client = _Client(node.port)
        try:
            await client.send(chat_request(extra=b"x-request-id: gone\r\n"))
            assert await client.read_all() == b""
        finally:
            client.sock.close()
        assert [(step, rid) for step, rid, _ in gate.events] == [
            ("admit", "gone"), ("settle", "gone"), ("record_served", "gone"), ("log 499", "gone")]
        log_line = next(r for r in caplog.records if r.name == REQUEST_LOGGER)
        assert log_line.__dict__["error"] == "client_closed"
        assert node.guard()._busy_general == 0
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_client_gone_mid_request_is_settled_once_and_recorded_499(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    async with recorded_node(tmp_path, monkeypatch, caplog) as (node, gate):
        node.upstream.script(Behaviour.hang())
        client = gate.client = _Client(node.port)
        await client.send(chat_request(extra=b"x-request-id: left\r\n"))
        await node.upstream.wait_until(lambda f: f.request_count == 1, "the upstream has it")
        client.sock.close()
        await wait_for(lambda: len(gate.events) == 4, "the bookkeeping")
        assert [(step, rid) for step, rid, _ in gate.events] == [
            ("admit", "left"), ("settle", "left"), ("record_failed", "left"), ("log 499", "left")]
        assert node.guard()._busy_general == 0


# --------------------------------------------------------------------------- HeadHeaders
LOOKUP_HEADS = [
    b"",
    b"Host: x\r\n",
    b"Host: x\r\nContent-Length: 12\r\ncontent-length: 13\r\nX-A: a: b\r\n",
    b"Hostx: 1\r\nxHost: 2\r\nHost: 3\r\nHOST: 4\r\n",
    b"X-AIProxy-Team: Red\r\nAuthorization: Bearer k\r\nX-A: caf\xc3\xa9 \xff\r\n",
    b"X-B: Transfer-Encoding: chunked\r\nAccept: */*\r\n",
]
LOOKUP_NAMES = ["Host", "host", "HOST", istr("Host"), "Hostx", "xhost", "ost", "Content-Length",
                hdrs.CONTENT_LENGTH, hdrs.TRANSFER_ENCODING, "x-aiproxy-team", "X-A", "x-b",
                "Authorization", "accept", "", "Ho:st", "Host\r\n", "Hést", "\u212aey"]


def _reference(block: bytes) -> CIMultiDict[str]:
    """The multidict the door built before `HeadHeaders`: each line split at its first ': '."""
    text = block.decode("utf-8", "surrogateescape")
    return CIMultiDict([line.split(": ", 1) for line in text.split("\r\n")[:-1]])


@pytest.mark.parametrize("block", LOOKUP_HEADS)
def test_head_headers_answers_every_lookup_as_the_multidict_would(block: bytes) -> None:
    head = b"POST /v1/chat/completions HTTP/1.1\r\n" + block
    match = _HEAD.fullmatch(head)
    assert match is not None  # a head the fast door serves
    start, end = match.span(2)
    headers = HeadHeaders(head[start - 2:end], head[start - 2:end].lower())
    reference = _reference(block)
    for name in LOOKUP_NAMES:
        assert headers.get(name) == reference.get(name), name
        assert headers.get(name, "d") == reference.get(name, "d"), name
        assert headers.getall(name, []) == reference.getall(name, []), name
        assert (name in headers) == (name in reference), name
        if name in reference:
            assert headers[name] == reference[name]
        else:
            with pytest.raises(KeyError):
                headers[name]
            with pytest.raises(KeyError):
                headers.getall(name)
    assert 7 not in headers and None not in headers and b"Host" not in headers
    # Everything else is the multidict's own answer.
    assert list(headers.items()) == list(reference.items())
    assert list(headers) == list(reference) and len(headers) == len(reference)
    assert bool(headers) == bool(reference) and headers == reference
    assert dict(headers) == dict(reference)
    assert headers.has_prefix(b"x-aiproxy-") == any(
        k.lower().startswith("x-aiproxy-") for k in reference)
