"""A minimal blocking HTTP/1.1 keep-alive client for latency and time-to-first-token probes.

It owns one socket and nothing else. It is deliberately not aiohttp or httpx: one client measures
every target, and its own cost (a few µs of Python per request) must be small and identical so
that "via proxy minus direct" is the proxy's cost, not the client's. It understands exactly what
the benchmark targets send back: `Content-Length` bodies and `Transfer-Encoding: chunked` (SSE).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson


class HttpClientError(RuntimeError):
    """The target closed the connection or spoke something this client does not read."""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes


@dataclass(frozen=True)
class StreamTiming:
    status: int
    ttft_s: float  # request sent -> first SSE event with non-empty delta content received
    total_s: float  # request sent -> end of the chunked body
    events: int  # SSE `data:` events, [DONE] included
    content: str


class KeepAliveClient:
    """One persistent connection to `base_url` (http://host:port, loopback in the benchmarks)."""

    def __init__(self, base_url: str, timeout_s: float = 30.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"need http://host:port, got {base_url!r}")
        self._addr = (parts.hostname, parts.port)
        self._host_header = f"{parts.hostname}:{parts.port}".encode()
        self._timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._buf = bytearray()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buf.clear()

    def __enter__(self) -> KeepAliveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def build_post(
        self, path: str, body: bytes, extra_headers: dict[str, str] | None = None
    ) -> bytes:
        """Render a POST once; the probes then send the same bytes again and again."""
        lines = [
            f"POST {path} HTTP/1.1".encode(),
            b"Host: " + self._host_header,
            b"Content-Type: application/json",
            b"Content-Length: %d" % len(body),
        ]
        lines += [f"{k}: {v}".encode() for k, v in (extra_headers or {}).items()]
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.create_connection(self._addr, timeout=self._timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
            self._buf.clear()
        return self._sock

    def _fill(self, sock: socket.socket) -> None:
        data = sock.recv(65536)
        if not data:
            self.close()
            raise HttpClientError("connection closed by the target")
        self._buf += data

    def _read_until(self, sock: socket.socket, marker: bytes) -> bytes:
        while True:
            at = self._buf.find(marker)
            if at >= 0:
                out = bytes(self._buf[:at])
                del self._buf[: at + len(marker)]
                return out
            self._fill(sock)

    def _read_exact(self, sock: socket.socket, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill(sock)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _read_head(self, sock: socket.socket) -> tuple[int, bytes]:
        head = self._read_until(sock, b"\r\n\r\n")
        status_line, _, headers = head.partition(b"\r\n")
        try:
            status = int(status_line.split(b" ", 2)[1])
        except (IndexError, ValueError) as exc:
            raise HttpClientError(f"bad status line {status_line[:80]!r}") from exc
        return status, b"\r\n" + headers.lower()

    @staticmethod
    def _header(headers: bytes, name: bytes) -> bytes | None:
        at = headers.find(b"\r\n" + name + b":")
        if at < 0:
            return None
        start = at + len(name) + 3
        stop = headers.find(b"\r\n", start)
        return headers[start : stop if stop >= 0 else len(headers)].strip()

    def _finish(self, headers: bytes) -> None:
        if self._header(headers, b"connection") == b"close":
            self.close()

    def request(self, raw: bytes) -> Response:
        """Send a pre-rendered request; read the whole answer (length-delimited or chunked)."""
        sock = self._connect()
        sock.sendall(raw)
        status, headers = self._read_head(sock)
        length = self._header(headers, b"content-length")
        if length is not None:
            body = self._read_exact(sock, int(length))
        elif self._header(headers, b"transfer-encoding") == b"chunked":
            parts = []
            while True:
                size = int(self._read_until(sock, b"\r\n").split(b";")[0], 16)
                if size == 0:
                    self._read_until(sock, b"\r\n")
                    break
                parts.append(self._read_exact(sock, size))
                self._read_exact(sock, 2)
            body = b"".join(parts)
        else:
            raise HttpClientError("answer has neither Content-Length nor chunked encoding")
        self._finish(headers)
        return Response(status, body)

    def stream(self, raw: bytes) -> StreamTiming:
        """Send a streaming chat request; time the first content-bearing SSE event and the end."""
        sock = self._connect()
        t0 = time.perf_counter()
        sock.sendall(raw)
        status, headers = self._read_head(sock)
        if self._header(headers, b"transfer-encoding") != b"chunked":
            # An error answer (JSON with Content-Length) or a server that does not chunk SSE.
            length = self._header(headers, b"content-length")
            if length is None:
                raise HttpClientError("stream answer is neither chunked nor length-delimited")
            body = self._read_exact(sock, int(length))
            self._finish(headers)
            t = time.perf_counter() - t0
            return StreamTiming(status, t, t, body.count(b"data:"), "")
        ttft = -1.0
        events = 0
        pending = b""
        content: list[str] = []
        while True:
            size = int(self._read_until(sock, b"\r\n").split(b";")[0], 16)
            if size == 0:
                self._read_until(sock, b"\r\n")
                break
            pending += self._read_exact(sock, size)
            self._read_exact(sock, 2)
            # SSE events may be split across or packed into HTTP chunks: split on blank lines.
            *complete, pending = pending.split(b"\n\n")
            for event in complete:
                data = event.strip()
                if not data.startswith(b"data:"):
                    continue
                events += 1
                payload = data[5:].strip()
                if payload == b"[DONE]":
                    continue
                try:
                    chunk = orjson.loads(payload)
                except orjson.JSONDecodeError as exc:
                    raise HttpClientError(f"bad SSE payload {payload[:80]!r}") from exc
                for choice in chunk.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        if ttft < 0:
                            ttft = time.perf_counter() - t0
                        content.append(text)
        total = time.perf_counter() - t0
        self._finish(headers)
        return StreamTiming(status, ttft if ttft >= 0 else total, total, events, "".join(content))
