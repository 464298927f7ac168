"""The SSE relay: one loop that writes a `RoutedStream` to the client, for every event format.

Every streamed answer (chat and completions chunks, Responses events, Anthropic's events) goes
through `relay`; what differs is the `EventEncoder`, which turns chunks into wire bytes. The
relay owns what they share:
- the events of one upstream read go out in one write: encoded events are buffered while the
  source hands over chunks without waiting, and written the moment it is about to wait for
  the upstream (no timer, so no added latency: a chunk that arrives alone is written alone, as
  it arrives); the response head goes out with the first events (`EventStreamResponse`, or
  `DirectEventStream` on a fast door connection; at the source's first wait at the latest),
  and the last events with the end of the body, so a stream that arrived whole is one write;
- a failure after the first byte: the encoder's error event, without the normal ending; a
  MeshError keeps its code, anything else (a bug) is logged with its traceback here and ends
  as a generic `internal_error` naming the request id;
- a client that goes away: the upstream call is cancelled (`routed.aclose()`) and the request
  is `client_closed`; a CancelledError is re-raised after that;
- the request context: time to first token and the error code, for the log line and metrics.

`ChatEvents` is the encoder of OpenAI's `data: {...}` chunks (chat and completions); its
contract (router ↔ API):
- every content chunk is written the moment it arrives, never held back;
- a chunk whose every choice has a non-null `finish_reason` is the last choice-bearing chunk:
  only that one is held until the stream ends, so it can carry `x_aiproxy` when the client did
  not ask for usage;
- a usage-only chunk (`choices == []`) is forwarded only when the client asked
  `stream_options.include_usage`;
- `x_aiproxy` goes on the last chunk before `data: [DONE]`: the usage chunk when the client
  asked for usage, else the held finish chunk, else a final chunk with `choices: []`;
- a failure after the first byte writes `data: {"error": {...}}` and ends WITHOUT `[DONE]`.

This module owns only the wire framing and the relay; it does not route, retry or record
metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from aiohttp import hdrs, web

from meshnode.api.answer import serialized_head, server_headers
from meshnode.api.errors import stream_error_event
from meshnode.api.fastdoor import FastDoor, FastRequest
from meshnode.api.state import RequestContext
from meshnode.errors import MeshError
from meshnode.routing.outcome import RoutedStream, Served
from meshnode.types import StreamChunk

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
_PREFIX = b"data: "
_SUFFIX = b"\n\n"
# What a write to a client that went away raises (aiohttp's ClientConnectionResetError is a
# ConnectionResetError).
_CLIENT_GONE = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


def encode(data: dict[str, Any]) -> bytes:
    """An unnamed event: `data: {...}` (OpenAI's chunks)."""
    return _PREFIX + orjson.dumps(data) + _SUFFIX


def named_event(name: str, data: dict[str, Any]) -> bytes:
    """A named event: `event: NAME` then `data: {...}` (Responses' and Anthropic's events)."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + _SUFFIX


class EventStreamResponse(web.StreamResponse):
    """An event-stream response whose head waits for the first body write and goes out in the
    same write (aiohttp's `web.Response` does this for its body; a `StreamResponse` otherwise
    sends its head alone at `prepare()`). A client that left before it is seen at that write,
    which the relay answers as `client_closed`."""

    _send_headers_immediately = False


class DirectEventStream(EventStreamResponse):
    """An `EventStreamResponse` on a fast door connection (`meshnode.api.fastdoor`), written
    straight to its transport, without aiohttp's `StreamWriter` and the general preparation of
    `StreamResponse` (which cost ~15 % of a stream's instructions), in the same bytes:

    - `prepare` sets what aiohttp's sets on a chunked answer (`Transfer-Encoding`, `Date`,
      `Server`, `Connection: close` when the connection will not be kept), runs the app's
      prepare hooks, and serialises the head (`answer.serialized_head`: aiohttp's serialiser);
    - the head goes out with the first events in one `transport.write`; each later write is one
      chunk (`%x\r\n` data `\r\n`); `write_eof` sends the last events and the terminating
      `0` chunk in one write;
    - after a write, it waits for the transport to drain while the transport is over its
      high-water mark (the protocol's `pause_writing`, as aiohttp's writer does);
    - a write to a client that left raises `ConnectionResetError` (what `relay` answers as
      `client_closed`).

    The same two methods as aiohttp's (`write`, `write_eof`), so `relay` writes either.
    Built for a stream's answer only (no cookies, compression or length: `event_stream`)."""

    _head: bytes | None = None  # serialised by `prepare`, sent with the first write
    _protocol: FastDoor | None = None  # set by `prepare`

    @property
    def prepared(self) -> bool:
        return self._eof_sent or self._protocol is not None

    async def prepare(self, request: Any) -> None:  # a `FastRequest`
        if self._eof_sent or self._protocol is not None:
            return
        headers = self._headers
        headers[hdrs.TRANSFER_ENCODING] = "chunked"
        server_headers(self, request)
        self._req = request
        self._protocol = request.protocol
        hooks = request.app.on_response_prepare
        if hooks:
            await hooks.send(request, self)  # CORS, rate-limit headers: after ours, as aiohttp
        self._head = serialized_head(self._status, self._reason, headers)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        head = self._head
        if head is not None:
            self._send(b"".join((head, b"%x\r\n" % len(data), data, b"\r\n")) if data
                       else head)
            self._head = None
        elif data:
            self._send(b"".join((b"%x\r\n" % len(data), data, b"\r\n")))
        protocol = self._protocol
        if protocol is not None and protocol._paused:
            await protocol._drain_helper()

    async def write_eof(self, data: bytes | bytearray | memoryview = b"") -> None:
        if self._eof_sent:
            return
        head = self._head or b""
        self._send(b"".join((head, b"%x\r\n" % len(data), data, b"\r\n0\r\n\r\n")) if data
                   else head + b"0\r\n\r\n")
        self._head = None
        self._eof_sent = True
        self._req = None
        protocol = self._protocol
        if protocol is not None and protocol._paused:
            await protocol._drain_helper()

    def _send(self, data: bytes) -> None:
        protocol = self._protocol
        transport = protocol.transport if protocol is not None else None
        if transport is None or transport.is_closing():
            # As aiohttp's writer: the client left (ClientConnectionResetError is one).
            raise ConnectionResetError("Cannot write to closing transport")
        transport.write(data)


def event_stream(request: web.Request, headers: dict[str, str]) -> EventStreamResponse:
    """The response of an event stream: written straight to a fast door connection, else
    through aiohttp's writer."""
    if type(request) is FastRequest:
        return DirectEventStream(status=200, headers=headers)
    return EventStreamResponse(status=200, headers=headers)


class EventEncoder(Protocol):
    """Turns a stream's chunks into one wire format. Each method returns the bytes to send
    (b"" for none) and must not block: the relay calls them between reads."""

    def start(self) -> bytes:
        """The events before the first chunk."""

    def feed(self, chunk: StreamChunk) -> bytes:
        """The events of one chunk (it may hold some back, e.g. to put `x_aiproxy` on them)."""

    def finish(self) -> bytes:
        """The closing events of a stream that ran to its end (`x_aiproxy`, usage)."""

    def fail(self, exc: BaseException) -> bytes:
        """The event that ends a stream broken after its first byte (what was held first)."""


@dataclass(slots=True)
class StreamReport:
    """How a relayed stream ended."""

    error: BaseException | None = None  # the error that ended it after the first byte
    client_gone: bool = False  # the client disconnected before the end

    @property
    def completed(self) -> bool:
        return self.error is None and not self.client_gone


class _ClientGone(Exception):
    """A write to the client failed: it went away (raised from the relay's own writes only, so
    an untranslated connection error of the source is not mistaken for it)."""


async def relay(
    response: web.StreamResponse, routed: RoutedStream, encoder: EventEncoder,
    ctx: RequestContext,
) -> StreamReport:
    """Write `encoder`'s events for every chunk of `routed` to the prepared `response`, end
    the response, and return how it ended (also set on `ctx`: `ttft_s`, `error_code`)."""
    report = StreamReport()
    # A RoutedStream as such: its source driven here, each chunk accounted with `take` (no
    # generator step per chunk); anything else (the cache's recording stream) iterated.
    direct = type(routed) is RoutedStream
    iterator: AsyncIterator[StreamChunk] = routed.rest if direct else routed.__aiter__()
    take = routed.take if direct else None
    out = bytearray(encoder.start())
    head_sent = False
    try:
        try:
            if direct:
                data = encoder.feed(routed.begin())
                if data:
                    if ctx.ttft_s is None:
                        ctx.ttft_s = time.perf_counter() - ctx.started
                    out += data
            next_step = iterator.__anext__
            while True:
                # The next chunk, driven by hand for one step: when the source hands it over
                # without waiting (the rest of an upstream read), it joins the buffer; when the
                # source is about to wait for the upstream, the buffer goes out first.
                step = next_step().__await__()
                try:
                    try:
                        waiting = step.send(None)
                    except StopIteration as got:
                        chunk: StreamChunk = got.value
                    else:
                        # (The head goes out then too, even with no event yet: the client
                        # knows the stream is on before a long wait.)
                        if out or not head_sent:
                            try:
                                await _write(response, out)
                            except BaseException:
                                await _abandon(step, waiting)
                                raise
                            out = bytearray()
                            head_sent = True
                        chunk = await _Resume(step, waiting)
                except StopAsyncIteration:
                    if take is not None:
                        routed.end(None)
                    break
                except _ClientGone:
                    raise
                except BaseException as exc:
                    if take is not None:
                        routed.end(exc)  # what the iteration records for a failed source
                    raise
                if take is not None and not take(chunk):
                    continue
                data = encoder.feed(chunk)
                if data:
                    if ctx.ttft_s is None:
                        ctx.ttft_s = time.perf_counter() - ctx.started
                    out += data
        except _ClientGone:
            raise
        except MeshError as exc:
            report.error = exc
            ctx.error_code = exc.code or exc.error_type
        except Exception as exc:  # noqa: BLE001 - a bug mid-stream still ends as an error event
            log.error("unhandled error in stream %s: %s", ctx.request_id, type(exc).__name__,
                      exc_info=exc, extra={"request_id": ctx.request_id})
            report.error = exc
            ctx.error_code = "internal_error"
        if report.error is None:
            tail = encoder.finish()
            if tail and ctx.ttft_s is None:
                ctx.ttft_s = time.perf_counter() - ctx.started
            out += tail
        else:
            out += encoder.fail(report.error)
        # The end of the body with the last events: one write.
        try:
            await response.write_eof(bytes(out))
        except _CLIENT_GONE as exc:
            raise _ClientGone from exc
        return report
    except _ClientGone:
        report.client_gone = True
        ctx.error_code = "client_closed"
        return report
    finally:
        # Closes the upstream call if the stream did not run to its end (client gone,
        # cancellation); a no-op after a complete stream.
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
        await routed.aclose()


async def _write(response: web.StreamResponse, data: bytearray) -> None:
    try:
        await response.write(data)
    except _CLIENT_GONE as exc:
        raise _ClientGone from exc


class _Resume:
    """Awaits the rest of a coroutine step already started by hand and suspended on `waiting`
    (what it yielded for the task to wait on): `yield from`, minus the first send."""

    __slots__ = ("_step", "_waiting")

    def __init__(self, step: Generator[Any, Any, Any], waiting: Any) -> None:
        self._step = step
        self._waiting = waiting

    def __await__(self) -> Generator[Any, Any, Any]:
        step = self._step
        waiting = self._waiting
        while True:
            try:
                sent = yield waiting
            except GeneratorExit:
                step.close()
                raise
            except BaseException as exc:  # noqa: BLE001 - thrown in (a cancellation): passed on
                try:
                    waiting = step.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    waiting = step.send(sent)
                except StopIteration as stop:
                    return stop.value


async def _abandon(step: Generator[Any, Any, Any], waiting: Any) -> None:
    """Cancel a step of the source suspended mid-read, as a task cancellation would, and let
    its cleanup run (the write that failed is what the caller reports)."""
    if isinstance(waiting, asyncio.Future):
        waiting.cancel()  # as `Task.cancel` does with the future its task waits on
    try:
        await _Resume(step, step.throw(asyncio.CancelledError()))
    except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the cancel, or its cleanup's error
        pass


# --------------------------------------------------------------------------- OpenAI chunks
def _frame(chunk: StreamChunk) -> bytes:
    """A chunk's event: its JSON as it came when the adapter kept it, else serialized."""
    raw = chunk.raw
    return _PREFIX + (orjson.dumps(chunk.data) if raw is None else raw) + _SUFFIX


def _with_aiproxy(data: dict[str, Any], x_aiproxy: dict[str, Any]) -> dict[str, Any]:
    # A shallow copy: chunk dicts belong to the provider and are never mutated.
    return {**data, "x_aiproxy": x_aiproxy}


def _closing_chunk(last_seen: dict[str, Any] | None, x_aiproxy: dict[str, Any]) -> dict[str, Any]:
    """A `choices: []` chunk shaped like the stream's own chunks, to carry `x_aiproxy`."""
    out: dict[str, Any] = {"choices": []}
    if last_seen is not None:
        for key in ("id", "object", "created", "model"):
            if key in last_seen:
                out[key] = last_seen[key]
    out.setdefault("object", "chat.completion.chunk")
    out["x_aiproxy"] = x_aiproxy
    return out


class ChatEvents:
    """The `EventEncoder` of OpenAI's chunks (chat and completions): the contract above."""

    __slots__ = ("_held_finish", "_held_usage", "_include_usage", "_last_seen", "_request_id",
                 "_served")

    def __init__(self, served: Served, *, include_usage: bool, request_id: str) -> None:
        self._served = served
        self._include_usage = include_usage
        self._request_id = request_id
        self._held_finish: StreamChunk | None = None
        self._held_usage: StreamChunk | None = None
        self._last_seen: dict[str, Any] | None = None

    def start(self) -> bytes:
        return b""

    def feed(self, chunk: StreamChunk) -> bytes:
        data = chunk.data
        self._last_seen = data
        choices = data.get("choices")
        if not choices:
            if choices == [] or (choices is None and chunk.usage is not None):
                # Usage-only chunk: it ends the stream; keep it for x_aiproxy if asked.
                if not self._include_usage:
                    return b""
                held, self._held_usage = self._held_usage, chunk
                return _frame(held) if held is not None else b""
            finished = False
        else:
            # a finish chunk: every choice has a finish_reason
            finished = True
            for choice in choices:
                if not isinstance(choice, dict) or choice.get("finish_reason") is None:
                    finished = False
                    break
        out = b""
        if self._held_finish is not None:
            # More choice chunks after a finish (n > 1 providers may do this): the held one
            # was not the last after all; release it in order.
            out = _frame(self._held_finish)
            self._held_finish = None
        if finished:
            self._held_finish = chunk
            return out
        return out + _frame(chunk)

    def finish(self) -> bytes:
        x_aiproxy = self._served.to_json()
        held_finish, held_usage = self._held_finish, self._held_usage
        if self._include_usage and held_usage is not None:
            head = _frame(held_finish) if held_finish is not None else b""
            return head + encode(_with_aiproxy(held_usage.data, x_aiproxy)) + DONE
        if held_finish is not None:
            return encode(_with_aiproxy(held_finish.data, x_aiproxy)) + DONE
        return encode(_closing_chunk(self._last_seen, x_aiproxy)) + DONE

    def fail(self, exc: BaseException) -> bytes:
        # Text already produced is delivered; the error comes after it, no [DONE].
        held = _frame(self._held_finish) if self._held_finish is not None else b""
        return held + stream_error_event(exc, self._request_id)
