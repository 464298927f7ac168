"""The wire between the node and a worker process: length-prefixed msgpack frames.

Each frame is a 4-byte big-endian length and a msgpack map whose `t` names the message. The
transport is a Unix socketpair handed to the worker as an inherited file descriptor, so the
worker's stdout and stderr stay free for its logs.

node -> worker
    {"t": "gen",    "id", "model", "messages" | "prompt" | "prompt_ids",
                    "params": SamplingParams.to_wire(),
                    "tools": [ToolSpec.to_wire()]?,   tools to render into the chat prompt
                    "rpfx": bytes?, "rlen": int?}     routing names (8 bytes each) and the
                                                      rendering's length (routing/prefix.py)
    {"t": "emb",    "id", "model", "input": [str] | [[token id]]}
    {"t": "cancel", "id"}
    {"t": "stop"}                                      finish and exit
worker -> node
    {"t": "hello",  "pid", "device", "cuda_count"}     process is up, loading models
    {"t": "ready",  "models": {name: {"kind", "context", "vocab", "fingerprint",
                                      "dimensions" (embedding models)}}}   loaded, warmed up
    {"t": "fatal",  "message"}                         cannot load; the worker exits
    {"t": "step",   "ev": [[id, choice, text, finish|None, logprobs?, stop?], ...], "done": [[id, prompt, completion], ...]}
                    logprobs, only when asked: [[token bytes, logprob|None, [[bytes, logprob], ...]], ...]
                    stop, only on the event a stop string ended: that string (logprobs None if not asked)
    {"t": "emb",    "id", "dim", "vectors": bytes (float32, row-major), "tokens"}
    {"t": "err",    "id", "message", "param"}          the request is invalid for this model (400)
    {"t": "hb",     "tps", "mem", "active", "queued", "pfx", "rpfx", "pps", "dps"}  heartbeat,
                    at least every HEARTBEAT_S; rpfx: the routing names whose KV the engines
                    still hold; pps, dps: measured prefill tokens/s and decode tokens/s per
                    stream (meshnode.worker.rates; 0.0 until measured; absent from an older
                    worker)
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from typing import Any

import msgpack

HEADER = struct.Struct(">I")
HEARTBEAT_S = 0.5
MAX_FRAME = 256 * 1024 * 1024


class FrameError(Exception):
    """The peer sent something that is not a frame (a bug or a dying process)."""


def encode(message: dict[str, Any]) -> bytes:
    payload: bytes = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(payload)) + payload


def decode(payload: bytes) -> dict[str, Any]:
    message = msgpack.unpackb(payload, raw=False)
    if not isinstance(message, dict) or "t" not in message:
        raise FrameError("frame is not a message")
    return message


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None at a clean end of stream."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise FrameError("stream ended inside a frame header") from None
        return None
    (size,) = HEADER.unpack(header)
    if size > MAX_FRAME:
        raise FrameError(f"frame of {size} bytes is over the limit")
    try:
        payload = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise FrameError("stream ended inside a frame") from None
    return decode(payload)


class BlockingChannel:
    """The worker's end: blocking reads on one thread, locked writes from any thread."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._file = sock.makefile("rb")
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        data = encode(message)
        with self._lock:
            self._sock.sendall(data)

    def close(self) -> None:
        # The reading file holds its own reference to the socket: close both.
        self._file.close()
        self._sock.close()

    def recv(self) -> dict[str, Any] | None:
        header = self._file.read(HEADER.size)
        if len(header) < HEADER.size:
            return None
        (size,) = HEADER.unpack(header)
        payload = self._file.read(size)
        if len(payload) < size:
            return None
        return decode(payload)
