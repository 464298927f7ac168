"""The SSE writer: relays a `RoutedStream` to the client as OpenAI's `data: {...}` events.

The streaming contract (router ↔ API):
- every content chunk is written the moment it arrives, never buffered;
- a chunk whose every choice has a non-null `finish_reason` is the last choice-bearing chunk:
  only that one is held until the stream ends, so it can carry `x_aiproxy` when the client did
  not ask for usage;
- a usage-only chunk (`choices == []`) is forwarded only when the client asked
  `stream_options.include_usage`;
- `x_aiproxy` goes on the last chunk before `data: [DONE]`: the usage chunk when the client
  asked for usage, else the held finish chunk, else a final chunk with `choices: []`;
- a failure after the first byte writes `data: {"error": {...}}` and ends WITHOUT `[DONE]`.

This module owns only the wire framing; it does not route, retry or record metrics. It reports
what happened in a `StreamReport` for the handler to log.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from meshnode.api.errors import stream_error_event
from meshnode.errors import MeshError
from meshnode.routing.outcome import RoutedStream
from meshnode.types import StreamChunk

DONE = b"data: [DONE]\n\n"
_PREFIX = b"data: "
_SUFFIX = b"\n\n"


@dataclass(slots=True)
class StreamReport:
    """How a relayed stream ended."""

    chunks: int = 0
    first_write_at: float | None = None  # time.perf_counter() of the first byte written
    error: BaseException | None = None  # the error that ended it after the first byte
    client_gone: bool = False  # the client disconnected before the end


def encode(data: dict[str, Any]) -> bytes:
    return _PREFIX + orjson.dumps(data) + _SUFFIX


def is_finish_chunk(data: dict[str, Any]) -> bool:
    """True when the chunk has choices and every one of them has finished."""
    choices = data.get("choices")
    if not choices:
        return False
    for choice in choices:
        if not isinstance(choice, dict) or choice.get("finish_reason") is None:
            return False
    return True


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


async def relay(
    response: web.StreamResponse,
    routed: RoutedStream,
    *,
    include_usage: bool,
    request_id: str,
) -> StreamReport:
    """Write every chunk of `routed` to the prepared `response`, then the closing events.

    On a client disconnect (write fails, or the handler is cancelled) the upstream call is
    cancelled through `routed.aclose()`; a CancelledError is re-raised after that.
    """
    report = StreamReport()
    held_finish: StreamChunk | None = None
    held_usage: StreamChunk | None = None
    last_seen: dict[str, Any] | None = None
    iterator: AsyncIterator[StreamChunk] = routed.__aiter__()
    write = response.write
    try:
        try:
            async for chunk in iterator:
                data = chunk.data
                last_seen = data
                choices = data.get("choices")
                if choices == [] or (choices is None and chunk.usage is not None):
                    # Usage-only chunk: it ends the stream; keep it for x_aiproxy if asked.
                    if include_usage:
                        if held_usage is not None:
                            await write(encode(held_usage.data))
                        held_usage = chunk
                    continue
                if held_finish is not None:
                    # More choice chunks after a finish (n > 1 providers may do this): the held
                    # one was not the last after all; release it in order.
                    await write(encode(held_finish.data))
                    held_finish = None
                if is_finish_chunk(data):
                    held_finish = chunk
                    continue
                await write(encode(data))
                report.chunks += 1
                if report.first_write_at is None:
                    report.first_write_at = time.perf_counter()
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
            report.client_gone = True
            return report
        except MeshError as exc:
            report.error = exc
        except Exception as exc:  # noqa: BLE001 - a bug mid-stream still ends as an error event
            report.error = exc

        if report.error is not None:
            if held_finish is not None:
                # Text already produced is delivered; the error comes after it, no [DONE].
                await write(encode(held_finish.data))
            await write(stream_error_event(report.error, request_id))
            return report

        x_aiproxy = routed.served.to_json()
        tail: list[bytes] = []
        if include_usage and held_usage is not None:
            if held_finish is not None:
                tail.append(encode(held_finish.data))
            tail.append(encode(_with_aiproxy(held_usage.data, x_aiproxy)))
        elif held_finish is not None:
            tail.append(encode(_with_aiproxy(held_finish.data, x_aiproxy)))
        else:
            tail.append(encode(_closing_chunk(last_seen, x_aiproxy)))
        tail.append(DONE)
        report.chunks += 1
        if report.first_write_at is None:
            report.first_write_at = time.perf_counter()
        # One write for the tail: it is the end of the stream, nothing waits behind it.
        await write(b"".join(tail))
        return report
    except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
        report.client_gone = True
        return report
    finally:
        # Closes the upstream call if the stream did not run to its end (client gone,
        # cancellation); a no-op after a complete stream.
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
        await routed.aclose()
