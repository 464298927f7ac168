"""The SSE writer against the streaming contract (see meshnode/api/sse.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from meshnode.api.sse import ChatEvents, EventStreamResponse, StreamReport, relay
from meshnode.api.state import RequestContext
from meshnode.errors import StreamBroken
from meshnode.routing.outcome import RoutedStream, Served
from meshnode.types import ModelOffer, StreamChunk, Usage

OFFER = ModelOffer(model="m", provider="p", provider_kind="openai", upstream_model="m",
                   cost_per_1k_input=1.0, cost_per_1k_output=1.0)


class Recorder:
    """Stands in for aiohttp's StreamResponse: records each write as it happens (the end of
    the body, `write_eof`, is a write too)."""

    def __init__(self, fail_after: int | None = None, fail_at_end: bool = False) -> None:
        self.writes: list[bytes] = []
        self.fail_after = fail_after
        self.fail_at_end = fail_at_end
        self.wrote = asyncio.Event()
        self.ended = False

    async def write(self, data: bytes | bytearray) -> None:
        if self.fail_after is not None and len(self.writes) >= self.fail_after:
            raise ConnectionResetError("client gone")
        assert not self.ended
        self.writes.append(bytes(data))
        self.wrote.set()

    async def write_eof(self, data: bytes = b"") -> None:
        if self.fail_at_end:
            raise ConnectionResetError("client gone")
        await self.write(data)
        self.ended = True

    def events(self) -> list[Any]:
        return self.parse(b"".join(self.writes))

    @staticmethod
    def parse(blob: bytes) -> list[Any]:
        out: list[Any] = []
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


async def relay_chat(rec: Recorder, routed: RoutedStream, *, include_usage: bool,
                     request_id: str = "r", ctx: RequestContext | None = None) -> StreamReport:
    """`relay` with OpenAI's chunk encoder, as the chat handler runs it."""
    encoder = ChatEvents(routed.served, include_usage=include_usage, request_id=request_id)
    ctx = ctx or RequestContext(request_id=request_id, started=0.0)
    return await relay(rec, routed, encoder, ctx)  # type: ignore[arg-type]


def routed_from(chunks: list[StreamChunk], *, error: Exception | None = None,
                closed: list[bool] | None = None, paced: bool = False,
                settled: list[BaseException | None] | None = None) -> RoutedStream:
    """A routed stream of `chunks`. `paced`: the source waits (one loop turn, as for another
    upstream read) before each chunk after the first; else they come as from one read."""
    served = Served(offer=OFFER, node="n1", strategy="cost_optimized")

    async def rest() -> AsyncIterator[StreamChunk]:
        try:
            for chunk in chunks[1:]:
                if paced:
                    await asyncio.sleep(0)
                yield chunk
            if error is not None:
                if paced:
                    await asyncio.sleep(0)
                raise error
        finally:
            if closed is not None:
                await asyncio.sleep(0)  # an async cleanup, as an upstream connection's release
                closed.append(True)

    def finish(s: Served, err: BaseException | None) -> None:
        s.cost = OFFER.cost(s.usage)
        if settled is not None:
            settled.append(err)

    return RoutedStream(chunks[0], rest(), served, finish)


async def test_x_aiproxy_rides_the_finish_chunk_and_usage_is_dropped() -> None:
    rec = Recorder()
    report = await relay_chat(rec, routed_from([content("a"), content("b"), FINISH, USAGE]),
                         include_usage=False)
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
    await relay_chat(rec, routed_from([content("a"), FINISH, USAGE]),
                include_usage=True)
    events = rec.events()
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["total_tokens"] == 5
    assert usage_chunk["x_aiproxy"]["node"] == "n1"
    finish = events[-3]
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert "x_aiproxy" not in finish


async def test_a_chunk_kept_as_it_came_is_relayed_byte_for_byte() -> None:
    """A chunk with `raw` goes out as those bytes (no second serialization), with or without
    being held; the one that carries x_aiproxy is serialized with it."""
    raw = b'{"id": "c",  "object": "chat.completion.chunk", "created": 1, "model": "m", ' \
          b'"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": null}]}'
    spaced = StreamChunk(orjson.loads(raw), raw=raw)
    finish_raw = b'{"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}'
    finish = StreamChunk(orjson.loads(finish_raw), raw=finish_raw)
    rec = Recorder()
    await relay_chat(rec, routed_from([spaced, finish, USAGE]), include_usage=True)
    wire = b"".join(rec.writes)
    assert wire.startswith(b"data: " + raw + b"\n\n")
    assert b"data: " + finish_raw + b"\n\n" in wire  # held, then released as it came
    assert rec.events()[-2]["x_aiproxy"]["node"] == "n1"
    rec = Recorder()
    await relay_chat(rec, routed_from([spaced, finish]), include_usage=False)
    last = rec.events()[-2]
    assert last["choices"][0]["finish_reason"] == "stop" and last["x_aiproxy"]["node"] == "n1"


async def test_closing_chunk_when_no_finish_and_no_usage() -> None:
    rec = Recorder()
    await relay_chat(rec, routed_from([content("a"), content("b")]),
                include_usage=False)
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
    await relay_chat(rec, routed, include_usage=False)
    assert gate.is_set()
    assert rec.events()[-1] == "[DONE]"


async def test_failure_after_first_byte_ends_with_error_and_no_done() -> None:
    rec = Recorder()
    report = await relay_chat(
        rec,
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
    await relay_chat(rec, routed_from([content("a")], error=RuntimeError("secret sk-abcdefghijk")),
                include_usage=False, request_id="r-9")
    last = rec.events()[-1]
    assert last["error"]["type"] == "internal_error"
    assert "r-9" in last["error"]["message"]
    assert "sk-" not in last["error"]["message"]


async def test_client_gone_closes_upstream() -> None:
    rec = Recorder(fail_after=1)
    closed: list[bool] = []
    settled: list[BaseException | None] = []
    ctx = RequestContext(request_id="r", started=0.0)
    report = await relay_chat(
        rec,
        routed_from([content("a"), content("b"), content("c"), FINISH], closed=closed,
                    paced=True, settled=settled),
        include_usage=False, ctx=ctx,
    )
    assert report.client_gone and not report.completed
    assert ctx.error_code == "client_closed"
    # The write failed while the source waited for its next read: the source was cancelled
    # there, its cleanup ran, and the route was settled once.
    assert closed == [True]
    assert len(settled) == 1
    assert len(rec.writes) == 1


async def test_client_gone_at_the_last_write() -> None:
    rec = Recorder(fail_at_end=True)
    closed: list[bool] = []
    ctx = RequestContext(request_id="r", started=0.0)
    report = await relay_chat(rec, routed_from([content("a"), FINISH], closed=closed),
                              include_usage=False, ctx=ctx)
    assert report.client_gone and ctx.error_code == "client_closed"
    assert closed == [True] and not rec.ended


async def test_the_events_of_one_read_go_out_in_one_write() -> None:
    rec = Recorder()
    ctx = RequestContext(request_id="r", started=0.0)
    await relay_chat(rec, routed_from([content("a"), content("b"), FINISH, USAGE]),
                     include_usage=True, ctx=ctx)
    # Every chunk came without the source waiting: one write, which also ends the body.
    assert len(rec.writes) == 1 and rec.ended
    events = rec.events()
    assert [e["choices"][0]["delta"].get("content") for e in events[:2]] == ["a", "b"]
    assert events[-1] == "[DONE]" and events[-2]["x_aiproxy"]["node"] == "n1"
    assert ctx.ttft_s is not None and ctx.error_code is None


async def test_each_read_is_written_before_the_source_waits_again() -> None:
    rec = Recorder()
    await relay_chat(rec, routed_from([content("a"), content("b"), content("c"), FINISH],
                                      paced=True), include_usage=False)
    per_write = [[e if e == "[DONE]" else e["choices"][0]["delta"].get("content")
                  for e in Recorder.parse(w)] for w in rec.writes]
    # a, b and c each arrived alone and went out alone, before the next was read; the held
    # finish chunk goes out with [DONE] and the end of the body.
    assert per_write[:3] == [["a"], ["b"], ["c"]]
    assert rec.events()[-1] == "[DONE]" and len(rec.writes) == 4 and rec.ended


async def test_cancelled_while_the_source_waits_closes_it_and_reraises() -> None:
    rec = Recorder()
    closed: list[bool] = []
    never = asyncio.Event()

    async def rest() -> AsyncIterator[StreamChunk]:
        try:
            await never.wait()
            yield FINISH
        finally:
            closed.append(True)

    served = Served(offer=OFFER, node="n1", strategy="s")
    routed = RoutedStream(content("a"), rest(), served, lambda s, e: None)
    task = asyncio.ensure_future(relay_chat(rec, routed, include_usage=False))
    await asyncio.wait_for(rec.wrote.wait(), timeout=10)  # "a" went out before the wait
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert closed == [True]
    assert [e["choices"][0]["delta"]["content"] for e in rec.events()] == ["a"]


async def test_a_connection_error_of_the_source_is_an_error_not_a_client_gone() -> None:
    rec = Recorder()
    ctx = RequestContext(request_id="r-2", started=0.0)
    report = await relay_chat(
        rec, routed_from([content("a")], error=ConnectionResetError("untranslated")),
        include_usage=False, ctx=ctx)
    assert not report.client_gone and isinstance(report.error, ConnectionResetError)
    assert ctx.error_code == "internal_error"
    assert rec.events()[-1]["error"]["type"] == "internal_error" and rec.ended


async def test_the_head_goes_out_at_the_first_wait_even_with_nothing_to_say() -> None:
    rec = Recorder()
    gate = asyncio.Event()
    served = Served(offer=OFFER, node="n1", strategy="s")

    async def rest() -> AsyncIterator[StreamChunk]:
        # The finish chunk is held (for x_aiproxy), so nothing is written yet; the upstream
        # then waits: the head (an empty write here) must not wait with it.
        await asyncio.wait_for(rec.wrote.wait(), timeout=10)
        gate.set()
        yield USAGE

    routed = RoutedStream(FINISH, rest(), served, lambda s, e: None)
    await relay_chat(rec, routed, include_usage=True)
    assert gate.is_set() and rec.writes[0] == b""
    events = rec.events()
    assert events[0]["choices"][0]["finish_reason"] == "stop" and events[-1] == "[DONE]"


async def test_a_stream_that_arrived_whole_is_one_write_on_the_wire() -> None:
    """On a real aiohttp server: head, every event and the body's end in one transport write."""
    writes: list[bytes] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        write = transport.write

        def counted(data: Any) -> None:
            writes.append(bytes(data))
            write(data)

        transport.write = counted  # type: ignore[method-assign]
        response = EventStreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await relay(response, routed_from([content("a"), content("b"), FINISH, USAGE]),
                    ChatEvents(Served(offer=OFFER, node="n1", strategy="s"),
                               include_usage=True, request_id="r"),
                    RequestContext(request_id="r", started=0.0))
        return response

    app = web.Application()
    app.router.add_get("/s", handler)
    async with TestServer(app, host="127.0.0.1") as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), timeout=10)
        writer.close()
    assert len(writes) == 1 and writes[0] == raw
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and raw.endswith(b"\r\n0\r\n\r\n")
    body = raw.split(b"\r\n\r\n", 1)[1]
    assert b'"content":"a"' in body and b'"content":"b"' in body and b"data: [DONE]" in body
