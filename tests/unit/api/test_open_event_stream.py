"""The one opening of every SSE answer (`handlers.open_event_stream`): a client that goes away
before the headers are out is `client_closed` with its route closed, never an internal error
(with `prepare` made to fail, and on a real socket reset before the headers)."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from meshnode.api.app import create_app
from meshnode.api.handlers import open_event_stream
from meshnode.api.server import CONNECTIONS, LimitedAppRunner
from meshnode.api.state import CONTEXT, RequestContext
from meshnode.observability.logging import REQUEST_LOGGER
from meshnode.providers.fake import FakeProvider
from meshnode.routing.outcome import RoutedStream, Served
from tests.kit.wait import wait_for
from tests.unit.api.conftest import make_router
from tests.unit.api.test_sse import FINISH, OFFER, content


class _Router:
    """Opens a stream whose settlement (the router's finish callback) is recorded."""

    def __init__(self, closed: list[bool]) -> None:
        self.closed = closed

    async def open_stream(self, inference: Any) -> RoutedStream:
        async def rest() -> Any:
            yield FINISH

        def finish(served: Served, error: BaseException | None) -> None:
            self.closed.append(True)

        return RoutedStream(content("a"), rest(), Served(offer=OFFER, node="n1",
                                                          strategy="cost_optimized"), finish)


def _request() -> web.Request:
    request = make_mocked_request("POST", "/v1/chat/completions")
    request[CONTEXT] = RequestContext(request_id="req-1", started=0.0)
    return request


async def test_a_client_gone_before_the_headers_is_client_closed_and_the_route_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def gone(self: web.StreamResponse, request: web.BaseRequest) -> None:
        raise ConnectionResetError("client gone")

    monkeypatch.setattr(web.StreamResponse, "prepare", gone)
    closed: list[bool] = []
    request = _request()
    state: Any = SimpleNamespace(router=_Router(closed))
    response, routed = await open_event_stream(request, state, object(), cached=False)
    assert routed is None and not response.prepared
    assert request[CONTEXT].error_code == "client_closed"
    assert closed == [True]  # the route was closed and settled, not left open


async def test_extra_headers_ride_on_the_event_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[web.StreamResponse] = []

    async def prepared(self: web.StreamResponse, request: web.BaseRequest) -> None:
        seen.append(self)

    monkeypatch.setattr(web.StreamResponse, "prepare", prepared)
    state: Any = SimpleNamespace(router=_Router([]))
    response, routed = await open_event_stream(
        _request(), state, object(), cached=False, headers={"request-id": "req-1"})
    assert routed is not None and seen == [response]
    assert response.headers["request-id"] == "req-1"
    assert response.headers["x-request-id"] == "req-1"
    assert response.content_type == "text/event-stream"
    await routed.aclose()


class _HeldProvider(FakeProvider):
    """Streams only once released; says when a request has reached it."""

    def __init__(self) -> None:
        super().__init__("held", models=["m"])
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    async def _behave(self) -> Any:
        self.reached.set()
        await self.release.wait()
        return await super()._behave()


async def test_a_real_socket_closed_before_the_headers_is_client_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On a real connection: the client resets its socket while the route is being opened,
    and the server's handler goes on to send the head (with the first events) on the closed
    transport. The request is `client_closed` (logged 499), the route is closed, nothing is
    logged as an error. (Without handler cancellation, so the handler always reaches the
    write after the disconnect: in production it does when the disconnect is seen in the loop
    turn the route opened in, before the cancellation lands.)"""
    caplog.set_level(logging.INFO)
    held = _HeldProvider()
    app = create_app(make_router([held]), node_id="node-test")
    guard = app[CONNECTIONS]
    lost = asyncio.Event()
    closed = guard.closed

    def closed_and_seen(handler: Any) -> None:
        closed(handler)
        lost.set()

    guard.closed = closed_and_seen  # type: ignore[method-assign]
    runner = LimitedAppRunner(app, handler_cancellation=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = orjson.dumps({"model": "m", "stream": True,
                             "messages": [{"role": "user", "content": "hi"}]})
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        await writer.drain()
        await asyncio.wait_for(held.reached.wait(), 10)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # a reset: the server sees the connection lost at once
        await asyncio.wait_for(lost.wait(), 10)
        held.release.set()

        def request_lines() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.name == REQUEST_LOGGER]

        await wait_for(request_lines, "the request's log line")
        (line,) = request_lines()
        assert line.__dict__["error"] == "client_closed"
        assert line.__dict__["status"] == 499
        await wait_for(lambda: held.closed_streams == 1, "the route closed")
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        await runner.cleanup()
