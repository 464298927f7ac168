"""`JsonAnswer` on a real socket: its one-write answer carries what aiohttp's plain
`web.Response` carries (status line, headers, body, keep-alive or close), prepare hooks run, and
the cases it leaves to aiohttp (gzip, HTTP/1.0, HEAD) still take aiohttp's path."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Callable

import orjson
import pytest
from aiohttp import web

from meshnode.api.answer import JsonAnswer

BODY = orjson.dumps({"id": "chatcmpl-1", "choices": [{"message": {"content": "hé"}}]})
BIG = orjson.dumps({"data": ["x" * 64] * 400})
HEADERS = {"x-aiproxy-provider": "p", "x-aiproxy-cost": "0.00000100"}


async def _hook(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["x-hooked"] = "yes"


@pytest.fixture
async def server() -> AsyncIterator[int]:
    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        body = BIG if request.query.get("big") else BODY
        status = int(request.query.get("status", "200"))
        if request.match_info["kind"] == "plain":
            response: web.Response = web.Response(body=body, status=status,
                                                  content_type="application/json",
                                                  headers=HEADERS)
        else:
            response = JsonAnswer(body, status=status, headers=HEADERS)
        if request.query.get("gzip"):
            response.enable_compression(web.ContentCoding.gzip)
        return response

    app = web.Application()
    app.router.add_route("*", "/{kind}", answer)
    app.on_response_prepare.append(_hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield runner.addresses[0][1]
    await runner.cleanup()


async def _exchange(port: int, head: bytes, body: bytes = b"") -> tuple[bytes, dict[str, str],
                                                                         bytes, bool]:
    """(status line, headers without Date, body, whether the server closed after it: looked
    at only when the answer says it will close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        status = (await reader.readline()).rstrip(b"\r\n")
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().rstrip("\r\n").partition(": ")
            headers[name.lower()] = value
        length = int(headers.get("content-length", "0"))
        payload = await reader.readexactly(length) if not head.startswith(b"HEAD") else b""
        closed = False
        if headers.get("connection") == "close" or status.startswith(b"HTTP/1.0"):
            closed = await asyncio.wait_for(reader.read(1), 5) == b""
        assert headers.pop("date")
        return status, headers, payload, closed
    finally:
        writer.close()


def _post(path: str, *extra: bytes, version: bytes = b"1.1", method: bytes = b"POST") -> bytes:
    lines = [method + b" " + path.encode() + b" HTTP/" + version, b"Host: t",
             b"Content-Length: 2", *extra]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def _assert_same(
    port: int, make: Callable[[str], tuple[bytes, bytes]]
) -> tuple[bytes, dict[str, str], bytes, bool]:
    plain = await _exchange(port, *make("/plain"))
    fast = await _exchange(port, *make("/answer"))
    assert fast == plain
    return fast


async def test_a_kept_alive_answer_is_the_same_bytes(server: int) -> None:
    status, headers, body, closed = await _assert_same(
        server, lambda p: (_post(p), b"{}"))
    assert status == b"HTTP/1.1 200 OK" and body == BODY
    assert headers["content-type"] == "application/json"
    assert headers["x-aiproxy-provider"] == "p" and headers["x-hooked"] == "yes"
    assert "connection" not in headers and not closed


async def test_keep_alive_is_kept_for_the_next_request(server: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    try:
        for _ in range(2):
            writer.write(_post("/answer") + b"{}")
            assert await reader.readline() == b"HTTP/1.1 200 OK\r\n"
            while (line := await reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length"):
                    length = int(line.split(b":")[1])
            assert await reader.readexactly(length) == BODY
    finally:
        writer.close()


async def test_connection_close_is_honoured(server: int) -> None:
    status, headers, body, closed = await _assert_same(
        server, lambda p: (_post(p, b"Connection: close"), b"{}"))
    assert headers["connection"] == "close" and closed and body == BODY


async def test_an_error_status_is_the_same_bytes(server: int) -> None:
    status, _headers, body, _closed = await _assert_same(
        server, lambda p: (_post(p + "?status=429"), b"{}"))
    assert status == b"HTTP/1.1 429 Too Many Requests" and body == BODY


async def test_http_1_0_and_gzip_take_aiohttps_path(server: int) -> None:
    status, headers, _body, closed = await _assert_same(
        server, lambda p: (_post(p, version=b"1.0"), b"{}"))
    assert status.startswith(b"HTTP/1.0 200") and closed
    status, headers, body, _closed = await _assert_same(
        server, lambda p: (_post(p + "?gzip=1&big=1", b"Accept-Encoding: gzip"), b"{}"))
    assert headers["content-encoding"] == "gzip" and gzip.decompress(body) == BIG


async def test_head_has_the_headers_and_no_body(server: int) -> None:
    status, headers, _body, _closed = await _assert_same(
        server, lambda p: (_post(p, method=b"HEAD"), b"{}"))
    assert status == b"HTTP/1.1 200 OK" and headers["content-length"] == str(len(BODY))


async def test_a_big_body_is_whole(server: int) -> None:
    _status, headers, body, _closed = await _assert_same(
        server, lambda p: (_post(p + "?big=1"), b"{}"))
    assert body == BIG and int(headers["content-length"]) == len(BIG)


async def test_pipelined_requests_are_answered_in_order(server: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    try:
        writer.write(_post("/answer?status=201") + b"{}" + _post("/answer?big=1") + b"{}")
        for status, body in ((b"HTTP/1.1 201 Created\r\n", BODY), (b"HTTP/1.1 200 OK\r\n", BIG)):
            assert await reader.readline() == status
            length = 0
            while (line := await reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length"):
                    length = int(line.split(b":")[1])
            assert await reader.readexactly(length) == body
    finally:
        writer.close()
