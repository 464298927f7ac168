"""The SSE writer against the streaming contract (see meshnode/api/sse.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from meshnode.api.sse import relay
from meshnode.errors import StreamBroken
from meshnode.routing.outcome import RoutedStream, Served
from meshnode.types import ModelOffer, StreamChunk, Usage

OFFER = ModelOffer(model="m", provider="p", provider_kind="openai", upstream_model="m",
                   cost_per_1k_input=1.0, cost_per_1k_output=1.0)


class Recorder:
    """Stands in for aiohttp's StreamResponse: records each write as it happens."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.writes: list[bytes] = []
        self.fail_after = fail_after
        self.wrote = asyncio.Event()

    async def write(self, data: bytes) -> None:
        if self.fail_after is not None and len(self.writes) >= self.fail_after:
            raise ConnectionResetError("client gone")
        self.writes.append(data)
        self.wrote.set()

    def events(self) -> list[Any]:
        out: list[Any] = []
        for blob in self.writes:
            for event in blob.split(b"\n\n"):
                if not event:
                    continue
                assert event.startswith(b"data: ")
                payload = event[6:]
                out.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
        return out


def content(text: str) -> StreamChunk:
    return StreamChunk({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                        "choices": [{"index": 0, "delta": {"content": text},
                                     "finish_reason": None}]})


FINISH = StreamChunk({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                      "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
USAGE = StreamChunk({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                     "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                              "total_tokens": 5}},
                    usage=Usage(3, 2))


def routed_from(chunks: list[StreamChunk], *, error: Exception | None = None,
                closed: list[bool] | None = None) -> RoutedStream:
    served = Served(offer=OFFER, node="n1", strategy="cost_optimized")

    async def rest() -> AsyncIterator[StreamChunk]:
        try:
            for chunk in chunks[1:]:
                yield chunk
            if error is not None:
                raise error
        finally:
            if closed is not None:
                closed.append(True)

    def finish(s: Served, err: BaseException | None) -> None:
        s.cost = OFFER.cost(s.usage)

    return RoutedStream(chunks[0], rest(), served, finish)


async def test_x_aiproxy_rides_the_finish_chunk_and_usage_is_dropped() -> None:
    rec = Recorder()
    report = await relay(rec, routed_from([content("a"), content("b"), FINISH, USAGE]),  # type: ignore[arg-type]
                         include_usage=False, request_id="r")
    events = rec.events()
    assert events[-1] == "[DONE]"
    assert [e["choices"][0]["delta"].get("content") for e in events[:2]] == ["a", "b"]
    last = events[-2]
    assert last["choices"][0]["finish_reason"] == "stop"
    assert last["x_aiproxy"]["provider"] == "p"
    assert last["x_aiproxy"]["cost"] == pytest.approx(0.005)
    assert all(e == "[DONE]" or "x_aiproxy" not in e for e in events[:-2])
    assert not any(e != "[DONE]" and e["choices"] == [] for e in events)
    assert report.error is None and not report.client_gone


async def test_usage_chunk_carries_x_aiproxy_when_asked() -> None:
    rec = Recorder()
    await relay(rec, routed_from([content("a"), FINISH, USAGE]),  # type: ignore[arg-type]
                include_usage=True, request_id="r")
    events = rec.events()
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["total_tokens"] == 5
    assert usage_chunk["x_aiproxy"]["node"] == "n1"
    finish = events[-3]
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert "x_aiproxy" not in finish


async def test_closing_chunk_when_no_finish_and_no_usage() -> None:
    rec = Recorder()
    await relay(rec, routed_from([content("a"), content("b")]),  # type: ignore[arg-type]
                include_usage=False, request_id="r")
    events = rec.events()
    assert events[-1] == "[DONE]"
    closing = events[-2]
    assert closing["choices"] == [] and closing["id"] == "c"
    assert closing["object"] == "chat.completion.chunk"
    assert closing["x_aiproxy"]["provider"] == "p"


async def test_content_is_relayed_before_the_next_chunk_arrives() -> None:
    rec = Recorder()
    gate = asyncio.Event()
    served = Served(offer=OFFER, node="n1", strategy="s")

    async def rest() -> AsyncIterator[StreamChunk]:
        # The upstream sends its second chunk only once the first reached the client.
        await asyncio.wait_for(rec.wrote.wait(), timeout=10)
        gate.set()
        yield FINISH

    routed = RoutedStream(content("a"), rest(), served, lambda s, e: None)
    await relay(rec, routed, include_usage=False, request_id="r")  # type: ignore[arg-type]
    assert gate.is_set()
    assert rec.events()[-1] == "[DONE]"


async def test_failure_after_first_byte_ends_with_error_and_no_done() -> None:
    rec = Recorder()
    report = await relay(
        rec,  # type: ignore[arg-type]
        routed_from([content("a"), content("b")], error=StreamBroken("upstream reset")),
        include_usage=True, request_id="r",
    )
    events = rec.events()
    assert "[DONE]" not in events
    assert events[-1]["error"]["code"] == "stream_broken"
    assert events[-1]["error"]["type"] == "upstream_error"
    assert [e["choices"][0]["delta"]["content"] for e in events[:-1]] == ["a", "b"]
    assert isinstance(report.error, StreamBroken)


async def test_unexpected_error_mid_stream_is_generic() -> None:
    rec = Recorder()
    await relay(rec, routed_from([content("a")], error=RuntimeError("secret sk-abcdefghijk")),  # type: ignore[arg-type]
                include_usage=False, request_id="r-9")
    last = rec.events()[-1]
    assert last["error"]["type"] == "internal_error"
    assert "r-9" in last["error"]["message"]
    assert "sk-" not in last["error"]["message"]


async def test_client_gone_closes_upstream() -> None:
    rec = Recorder(fail_after=1)
    closed: list[bool] = []
    report = await relay(
        rec,  # type: ignore[arg-type]
        routed_from([content("a"), content("b"), content("c"), FINISH], closed=closed),
        include_usage=False, request_id="r",
    )
    assert report.client_gone
    assert closed == [True]
    assert len(rec.writes) == 1
