"""`JsonAnswer`: a whole JSON answer sent in one prepared write.

aiohttp sends a `web.Response` through its payload writer: headers prepared, a prepare hook
per app, the header block buffered, then the body, written and drained through a `StreamWriter`
(~28k instructions per answer, about 13 µs, of a proxied request's CPU). `JsonAnswer` is a
`web.Response` (everything that builds, inspects or edits one works the same: the front door
adds its headers, CORS and rate-limit hooks add theirs) whose `prepare` writes the status line,
the headers and the body to the transport at once, with the headers aiohttp would send
(`Content-Length`, `Date`, `Server`, `Connection: close` when the connection will not be kept).

The plain aiohttp path is kept for everything the one-write path does not cover: a compressed
answer (gzip, `meshnode.api.app`), a request that is not HTTP/1.1 (aiohttp's own parser
refusals among them), `HEAD`, a status without a body, cookies, a request outside an app. The header block is serialised by aiohttp's own serialiser, which refuses a
CR or LF in a header exactly as the plain path does. This module reads two of aiohttp's
internals (`http_writer._serialize_headers`, `Response._body`); the aiohttp version is pinned
in requirements/lock.txt and tests/unit/api/test_answer.py compares the bytes on the wire with
the plain path's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from aiohttp.http_writer import _serialize_headers
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import MAX_SYNC_CHUNK_SIZE, REASON_PHRASES
from multidict import CIMultiDict

from meshnode.api.fastdoor import FastRequest

JSON = "application/json"
# The status lines of the statuses our answers use, by (status, reason) as aiohttp writes them.
_STATUS_LINES = {(status, REASON_PHRASES[status]): f"HTTP/1.1 {status} {REASON_PHRASES[status]}"
                 for status in (200, 400, 401, 403, 404, 408, 409, 413, 422, 429, 500, 502,
                                503, 504)}
# Bodies at least this big go out as two buffers (no copy to join them), as aiohttp does.
_JOIN_BELOW_BYTES = 16 * 1024


def serialized_head(status: int, reason: str, headers: CIMultiDict[str]) -> bytes:
    """An HTTP/1.1 status line and headers, by aiohttp's serialiser (C: refuses a CR or LF in a
    header as aiohttp's own path does): the head of a `JsonAnswer` and of a stream written
    straight to a fast door connection (`meshnode.api.sse.DirectEventStream`)."""
    line = _STATUS_LINES.get((status, reason))
    if line is None:
        line = f"HTTP/1.1 {status} {reason}"
    return _serialize_headers(line, headers)


def server_headers(response: web.StreamResponse, request: BaseRequest | FastRequest) -> bool:
    """What aiohttp's `prepare` adds after an answer's framing header (`Content-Length` or
    `Transfer-Encoding`): `Date` and `Server` unless set, `Connection: close` when the
    connection will not be kept; returns whether it is kept (the response's choice, else the
    request's). For the answers written without aiohttp's writer: `JsonAnswer` and
    `meshnode.api.sse.DirectEventStream`."""
    keep_alive = response._keep_alive
    if keep_alive is None:
        keep_alive = response._keep_alive = request.keep_alive
    headers = response._headers
    if hdrs.DATE not in headers:
        headers[hdrs.DATE] = rfc822_formatted_time()
    if hdrs.SERVER not in headers:
        headers[hdrs.SERVER] = SERVER_SOFTWARE
    if not keep_alive and hdrs.CONNECTION not in headers:
        headers[hdrs.CONNECTION] = "close"
    return keep_alive


class JsonAnswer(web.Response):
    """A whole `application/json` answer of `body` (bytes, already serialised)."""

    def __init__(
        self, body: bytes, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> None:
        # What `web.Response.__init__` sets for a bytes body and a content type, without its
        # general path (text, charset, payload lookup), which cost more than the rest of the
        # answer's building (the aiohttp version is pinned; test_answer compares the wire bytes).
        self._state = {}
        real_headers: CIMultiDict[str] = CIMultiDict() if headers is None else CIMultiDict(headers)
        real_headers[hdrs.CONTENT_TYPE] = JSON
        self._headers = real_headers
        self._status = status
        self._reason = REASON_PHRASES.get(status, "")
        self._body = body
        self._compressed_body = None
        self._zlib_executor_size = MAX_SYNC_CHUNK_SIZE
        self._zlib_executor = None

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        if self._eof_sent:
            return None
        if self._payload_writer is not None:
            return self._payload_writer
        body = self._one_write_body()
        if (body is None or not isinstance(request, (FastRequest, web.Request))
                or request.version != HttpVersion11 or request.method == hdrs.METH_HEAD):
            return await super().prepare(request)
        self._whole_head(request, body)
        self._req = request
        hooks = request.app.on_response_prepare
        if hooks:
            await hooks.send(request, self)  # CORS, rate-limit headers
        protocol = request.protocol
        self._send(protocol.transport, self._serialized_head(), body)
        self._req = None
        if protocol.writing_paused:
            await request.writer.drain()
        return None

    def write_whole(self, request: FastRequest) -> bool | None:
        """The fast door's answer (`meshnode.api.fastdoor`, an app without prepare hooks): the
        head and the body in ONE `transport.write`, no `prepare`, no `StreamWriter`, the same
        bytes `prepare` sends. True/False: written, keep the connection or not; None: this answer
        needs `prepare` (compressed, cookies, no body status, written already)."""
        body = None if self._eof_sent or self._payload_writer is not None \
            else self._one_write_body()
        if body is None:
            return None
        keep_alive = self._whole_head(request, body)
        self._send(request.protocol.transport, self._serialized_head(), body)
        return keep_alive

    def _one_write_body(self) -> bytes | None:
        """The body, when the answer can go out in one write: plain bytes, not compressed,
        no cookies, not chunked, a status with a body."""
        body, status = self._body, self._status
        if (self._compression or self._cookies or self._chunked or not isinstance(body, bytes)
                or status < 200 or status in (204, 304)):
            return None
        return body

    def _whole_head(self, request: BaseRequest | FastRequest, body: bytes) -> bool:
        """The headers aiohttp's `prepare` would set on a whole answer; whether the
        connection is kept."""
        self._headers[hdrs.CONTENT_LENGTH] = str(len(body))
        return server_headers(self, request)

    def _serialized_head(self) -> bytes:
        return serialized_head(self._status, self._reason, self._headers)

    def _send(self, transport: asyncio.Transport | None, block: bytes, body: bytes) -> None:
        """The head and the body in one write (two buffers for a big body, not copied)."""
        if transport is None or transport.is_closing():
            # As aiohttp's writer: the client left; the server drops the answer quietly.
            raise ConnectionResetError("Cannot write to closing transport")
        if len(body) < _JOIN_BELOW_BYTES:
            transport.write(block + body)
        else:
            transport.writelines((block, body))
        self._eof_sent = True
        self._body_length = len(body)
