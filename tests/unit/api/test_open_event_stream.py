"""The one opening of every SSE answer (`handlers.open_event_stream`): a client that goes away
before the headers are out is `client_closed` with its route closed, never an internal error."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from meshnode.api.handlers import open_event_stream
from meshnode.api.state import CONTEXT, RequestContext
from meshnode.routing.outcome import RoutedStream, Served
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
