"""An instant fake OpenAI-compatible backend for the benchmarks: as cheap per request as Python gets.

It owns one thing: answering `POST /v1/chat/completions` (and `/chat/completions`) over
HTTP/1.1 keep-alive with a fixed, small, well-formed OpenAI body, so that whatever sits in front
of it (meshnode, LiteLLM, nothing) is what a benchmark measures. It is a raw asyncio `Protocol`
on uvloop, not an aiohttp app, because an aiohttp handler costs ~10x more CPU per request and
the backend must never be the bottleneck.

Answers:
- non-stream: one `chat.completion` object with `usage`;
- `stream: true`: SSE (`text/event-stream`, chunked transfer): a role chunk, three content
  chunks, a finish chunk, a usage chunk (`choices: []`), then `data: [DONE]`;
- a model whose name ends in `-slow` streams with `--chunk-delay-ms` between chunks (default
  10 ms) so a benchmark can see whether a proxy relays chunks as they arrive or buffers them;
- `GET /v1/models` and `GET /health`: small JSON; anything else: 404.

Run it alone: `python -m bench.backend --port 0` prints `BACKEND_HTTP=http://127.0.0.1:PORT`.
It must not import meshnode: the baseline has to be independent of the thing measured.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import cast

import orjson

MODEL = "bench"
CONTENT_PARTS = ("Hello", " from the", " bench backend.")
USAGE = {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15}
SLOW_SUFFIX = "-slow"
MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024


def _completion_body(model: str) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": model,
            "system_fingerprint": "fp_bench",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(CONTENT_PARTS)},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": USAGE,
        }
    )


def _chunk(model: str, delta: dict[str, str], finish: str | None) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": model,
            "system_fingerprint": "fp_bench",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
    )


def _sse_events(model: str) -> list[bytes]:
    """Each SSE event already framed as one HTTP/1.1 chunk (hex length, CRLF, data, CRLF)."""
    payloads = [_chunk(model, {"role": "assistant", "content": ""}, None)]
    payloads += [_chunk(model, {"content": part}, None) for part in CONTENT_PARTS]
    payloads.append(_chunk(model, {}, "stop"))
    payloads.append(
        orjson.dumps(
            {
                "id": "chatcmpl-bench",
                "object": "chat.completion.chunk",
                "created": 1_700_000_000,
                "model": model,
                "system_fingerprint": "fp_bench",
                "choices": [],
                "usage": USAGE,
            }
        )
    )
    events = [b"data: " + p + b"\n\n" for p in payloads] + [b"data: [DONE]\n\n"]
    return [b"%x\r\n%s\r\n" % (len(e), e) for e in events]


def _json_response(status: bytes, body: bytes, keep_alive: bool) -> bytes:
    conn = b"keep-alive" if keep_alive else b"close"
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: %s\r\n\r\n%s" % (len(body), conn, body)
    )


_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
)
_STREAM_END = b"0\r\n\r\n"
_MODELS_BODY = orjson.dumps(
    {
        "object": "list",
        "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "bench"}],
    }
)
_NOT_FOUND = orjson.dumps(
    {
        "error": {
            "message": "not found",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
)
_BAD_REQUEST = orjson.dumps(
    {
        "error": {
            "message": "bad JSON body",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
)


class _Answers:
    """Pre-rendered answers per model name: rendering happens once, not per request."""

    def __init__(self) -> None:
        self._bodies: dict[str, bytes] = {}
        self._streams: dict[str, list[bytes]] = {}

    def completion(self, model: str, keep_alive: bool) -> bytes:
        body = self._bodies.get(model)
        if body is None:
            body = self._bodies.setdefault(model, _completion_body(model))
        return _json_response(b"200 OK", body, keep_alive)

    def stream(self, model: str) -> list[bytes]:
        events = self._streams.get(model)
        if events is None:
            events = self._streams.setdefault(model, _sse_events(model))
        return events


class BackendProtocol(asyncio.Protocol):
    """One keep-alive connection. Requests are answered strictly in order (pipelining-safe)."""

    def __init__(self, answers: _Answers, chunk_delay_s: float) -> None:
        self._answers = answers
        self._chunk_delay_s = chunk_delay_s
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._slow_task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its interface.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._slow_task is not None:
            self._slow_task.cancel()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._slow_task is None:
            self._drain()

    def _drain(self) -> None:
        buf = self._buf
        transport = self._transport
        while transport is not None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    transport.close()
                return
            head = bytes(buf[:end]).lower()
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                length = int(head[at + 17 : stop if stop >= 0 else len(head)])
                if length > MAX_BODY:
                    transport.close()
                    return
            total = end + 4 + length
            if len(buf) < total:
                return
            body = bytes(buf[end + 4 : total])
            del buf[:total]
            keep_alive = b"\r\nconnection: close" not in head
            self._answer(transport, head, body, keep_alive)
            if self._slow_task is not None or not keep_alive:
                return

    def _answer(
        self, transport: asyncio.Transport, head: bytes, body: bytes, keep_alive: bool
    ) -> None:
        line_end = head.find(b"\r\n")
        method, _, rest = head[: line_end if line_end >= 0 else len(head)].partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        if method == b"post" and path.endswith(b"/chat/completions"):
            try:
                request = orjson.loads(body)
                model = str(request.get("model") or MODEL)
                stream = bool(request.get("stream"))
            except (orjson.JSONDecodeError, AttributeError):
                transport.write(_json_response(b"400 Bad Request", _BAD_REQUEST, keep_alive))
                return
            if not stream:
                transport.write(self._answers.completion(model, keep_alive))
            elif model.endswith(SLOW_SUFFIX) and self._chunk_delay_s > 0:
                self._slow_task = asyncio.get_running_loop().create_task(
                    self._slow_stream(transport, model, keep_alive)
                )
            else:
                transport.write(_STREAM_HEAD + b"".join(self._answers.stream(model)) + _STREAM_END)
        elif method == b"get" and path.endswith(b"/models"):
            transport.write(_json_response(b"200 OK", _MODELS_BODY, keep_alive))
        elif method == b"get" and path.startswith(b"/health"):
            transport.write(_json_response(b"200 OK", b'{"status":"ok"}', keep_alive))
        else:
            transport.write(_json_response(b"404 Not Found", _NOT_FOUND, keep_alive))
        if not keep_alive:
            transport.close()

    async def _slow_stream(
        self, transport: asyncio.Transport, model: str, keep_alive: bool
    ) -> None:
        try:
            transport.write(_STREAM_HEAD)
            for event in self._answers.stream(model):
                transport.write(event)
                await asyncio.sleep(self._chunk_delay_s)
            transport.write(_STREAM_END)
        finally:
            self._slow_task = None
        if not keep_alive:
            transport.close()
        elif self._transport is not None:
            self._drain()


async def start_backend(
    host: str = "127.0.0.1", port: int = 0, chunk_delay_ms: float = 10.0
) -> asyncio.Server:
    """Start serving on the running loop; the bound port is `server.sockets[0].getsockname()[1]`."""
    answers = _Answers()
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: BackendProtocol(answers, chunk_delay_ms / 1000.0),
        host,
        port,
        reuse_address=True,
        backlog=1024,
    )


async def _serve(host: str, port: int, chunk_delay_ms: float) -> None:
    server = await start_backend(host, port, chunk_delay_ms)
    bound = server.sockets[0].getsockname()
    print(f"BACKEND_HTTP=http://{bound[0]}:{bound[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # uvloop is optional on exotic platforms; the numbers just get worse
        return asyncio.new_event_loop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.backend", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--chunk-delay-ms", type=float, default=10.0)
    args = parser.parse_args(argv)
    if not args.host.startswith("127."):
        print("bench backend: loopback only", file=sys.stderr)
        return 2
    loop = _new_loop()
    try:
        loop.run_until_complete(_serve(args.host, args.port, args.chunk_delay_ms))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
