"""providers/http.py: Retry-After, error translation, SSE parsing, the shared session.

Network cases run over real loopback HTTP (the fake OpenAI server, or a raw aiohttp server
where the test needs byte-level control of the framing)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import aiohttp
import pytest
from aiohttp import web

from meshnode.config import TimeoutsConfig
from meshnode.errors import (
    DeadlineExceeded,
    MeshError,
    StreamBroken,
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from meshnode.observability.redact import for_client
from meshnode.providers.http import (
    MAX_RETRY_AFTER_S,
    HttpUpstream,
    SseEvent,
    SseParser,
    _Origin,
    as_stream_broken,
    error_for_exception,
    error_for_status,
    iter_sse,
    parse_retry_after,
    retry_after_from_headers,
    upstream_message,
)
from tests.kit.fake_openai import Behaviour, FakeOpenAI

SECRET = "sk-test-0123456789abcdef"
TIMEOUTS = TimeoutsConfig(connect_ms=5000, first_byte_ms=20000, total_ms=60000)


# --------------------------------------------------------------------------- Retry-After
NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3", 3.0),
        (" 1.5 ", 1.5),
        ("0", 0.0),
        ("-5", 0.0),
        ("+7", 7.0),
        ("31536000", 31536000.0),  # absurd (a year): returned, the router caps it
        ("99999999999", MAX_RETRY_AFTER_S),
        ("9" * 400, MAX_RETRY_AFTER_S),  # overflows a float: still finite
        (format_datetime(NOW + timedelta(seconds=42), usegmt=True), 42.0),
        ("Thu, 01 Jan 2026 12:00:10 GMT", 10.0),
        (format_datetime(NOW - timedelta(hours=1), usegmt=True), 0.0),  # in the past
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("garbage", None),
        ("soon!", None),
        ("3 seconds", None),
        ("1e3", None),
        ("nan", None),
        ("inf", None),
        ("", None),
        ("   ", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected


def test_parse_retry_after_http_date_against_the_clock() -> None:
    future = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    seconds = parse_retry_after(future)
    assert seconds is not None and 100 < seconds <= 120


def test_retry_after_ms_is_preferred_and_garbage_falls_back() -> None:
    assert retry_after_from_headers({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_from_headers({"retry-after-ms": "x", "retry-after": "9"}) == 9.0
    assert retry_after_from_headers({}) is None


# --------------------------------------------------------------------------- error translation
def test_redact_hides_our_secrets_and_key_shaped_text() -> None:
    text = f"bad key {SECRET} and Bearer abcdefghijklmnop and sk-other1234567890\x00"
    out = for_client(text, [SECRET])
    assert SECRET not in out
    assert "abcdefghijklmnop" not in out
    assert "sk-other1234567890" not in out
    assert "\x00" not in out
    assert out.startswith("bad key ***")


def test_redact_caps_length() -> None:
    assert len(for_client("x" * 10_000)) <= 500


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        (b'{"error": {"message": "bad thing", "param": "messages"}}', "bad thing", "messages"),
        (b'{"error": "plain"}', "plain", None),
        (b'{"message": "top"}', "top", None),
        (b'{"detail": "fastapi"}', "fastapi", None),
        (b'{"detail": [{"loc": ["body"], "msg": "x"}]}', '[{"loc":["body"],"msg":"x"}]', None),
        (b'{"errors": [{"message": "cf says no"}], "success": false}', "cf says no", None),
        (b"upstream text", "upstream text", None),
        (b"<html>gateway</html>", None, None),
        (b"", None, None),
        (b"[1, 2]", None, None),
    ],
)
def test_upstream_message_shapes(body: bytes, message: str | None, param: str | None) -> None:
    assert upstream_message(body) == (message, param)


@pytest.mark.parametrize(
    ("status", "cls", "retryable"),
    [
        (500, UpstreamUnavailable, True),
        (502, UpstreamUnavailable, True),
        (503, UpstreamUnavailable, True),
        (504, UpstreamUnavailable, True),
        (429, UpstreamRateLimited, True),
        (400, UpstreamBadRequest, False),
        (404, UpstreamBadRequest, False),
        (422, UpstreamBadRequest, False),
        (401, UpstreamAuthError, False),
        (403, UpstreamAuthError, False),
        (408, UpstreamTimeout, True),
    ],
)
def test_error_for_status(status: int, cls: type[MeshError], retryable: bool) -> None:
    body = b'{"error": {"message": "upstream says", "param": "temperature"}}'
    err = error_for_status(status, body, {"retry-after": "2"}, provider="p1")
    assert type(err) is cls
    assert err.retryable is retryable
    assert err.provider == "p1"
    if cls is UpstreamBadRequest:
        assert "upstream says" in err.message and err.param == "temperature"
    if cls is UpstreamRateLimited:
        assert err.retry_after == 2.0


def test_auth_error_never_shows_the_upstream_text() -> None:
    body = f'{{"error": {{"message": "Incorrect API key provided: {SECRET}"}}}}'.encode()
    err = error_for_status(401, body, {}, provider="p1", secrets=[SECRET])
    assert SECRET not in err.message and "Incorrect API key" not in err.message


def test_bad_request_message_is_sanitised() -> None:
    body = f'{{"error": {{"message": "you sent key {SECRET}"}}}}'.encode()
    err = error_for_status(400, body, {}, provider="p1", secrets=[SECRET])
    assert SECRET not in err.message and "you sent key" in err.message


def test_error_for_exception_kinds() -> None:
    later = time.monotonic() + 60
    def tr(e: BaseException) -> MeshError:
        return error_for_exception(e, provider="p", deadline=later)

    assert type(tr(aiohttp.ServerDisconnectedError())) is UpstreamUnavailable
    assert type(tr(aiohttp.ClientPayloadError("truncated"))) is UpstreamUnavailable
    assert type(tr(ConnectionResetError(104, "reset"))) is UpstreamUnavailable
    assert type(tr(aiohttp.SocketTimeoutError("read"))) is UpstreamTimeout
    assert type(tr(aiohttp.ConnectionTimeoutError("connect"))) is UpstreamTimeout
    assert type(tr(TimeoutError())) is UpstreamTimeout
    passed = error_for_exception(TimeoutError(), provider="p", deadline=time.monotonic() - 1)
    assert type(passed) is DeadlineExceeded and passed.retryable is False
    original = UpstreamBadRequest("x", provider="p")
    assert tr(original) is original
    assert all(tr(e).provider == "p" for e in (OSError("x"), aiohttp.ClientError("y")))


def test_as_stream_broken() -> None:
    broken = as_stream_broken(UpstreamUnavailable("reset", provider="p"))
    assert type(broken) is StreamBroken and not broken.retryable and broken.provider == "p"
    deadline = DeadlineExceeded("late")
    assert as_stream_broken(deadline) is deadline


# --------------------------------------------------------------------------- SSE parsing
STREAM = (
    b": ping\n\n"
    b"data: {\"a\": 1}\n\n"
    b"event: message_start\ndata: {\"b\": 2}\n\n"
    b"data: line one\r\ndata: line two\r\n\r\n"
    b"id: 7\nretry: 100\nunknown: x\ndata\n\n"
    b"data:no-space\n\n"
    b"event: lonely\n\n"  # an event without data is not dispatched
    b"data: [DONE]\n\n"
)
EXPECTED = [
    SseEvent("message", '{"a": 1}'),
    SseEvent("message_start", '{"b": 2}'),
    SseEvent("message", "line one\nline two"),
    SseEvent("message", ""),
    SseEvent("message", "no-space"),
    SseEvent("message", "[DONE]"),
]


def test_sse_parser_whole() -> None:
    parser = SseParser()
    assert parser.feed(STREAM) + parser.close() == EXPECTED
    assert parser.last_event_id == "7"


def test_sse_parser_byte_by_byte() -> None:
    parser = SseParser()
    events: list[SseEvent] = []
    for i in range(len(STREAM)):
        events.extend(parser.feed(STREAM[i : i + 1]))
    assert events + parser.close() == EXPECTED


@pytest.mark.parametrize("stream", [
    STREAM,
    STREAM.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"),  # CRLF throughout
    STREAM.replace(b"two\r\n\r\n", b"two\r\n\n"),  # line ends mixed in one event
])
def test_sse_parser_delivers_each_event_with_the_read_that_ends_it(stream: bytes) -> None:
    # The reference: fed byte by byte, an event comes out with the byte that ends it.
    ends: list[int] = []
    reference = SseParser()
    for i in range(len(stream)):
        ends += [i + 1] * len(reference.feed(stream[i : i + 1]))
    for cut in range(len(stream) + 1):
        parser = SseParser()
        first = parser.feed(stream[:cut])
        assert first == EXPECTED[: sum(end <= cut for end in ends)], cut
        assert first + parser.feed(stream[cut:]) + parser.close() == EXPECTED, cut


def test_sse_parser_data_gives_the_data_undecoded() -> None:
    parser = SseParser()
    assert parser.feed_data(b'data: {"a": "\xc3\xa9"}\n\nevent: e\ndata: x\ndata: y\n\n') == [
        b'{"a": "\xc3\xa9"}', b"x\ny"]
    assert parser.feed_data(b"data: \xff") == []
    assert parser.close_data() == [b"\xff"]


def test_sse_parser_says_when_every_event_was_one_clean_line() -> None:
    parser = SseParser()
    assert parser.feed_data(b"data: a\n\ndata: b\n\n") == [b"a", b"b"]
    assert parser.one_line
    assert parser.feed_data(b"data: c\ndata: d\n\ndata: e\n\n") == [b"c\nd", b"e"]
    assert not parser.one_line  # one of them came through the line parser (joined lines)
    assert parser.feed_data(b"data: f\r\n\r\n") == [b"f"]
    assert not parser.one_line  # CRLF line ends: each line parsed (a lone CR may remain)
    assert parser.feed_data(b"data: g\n\n") == [b"g"]
    assert parser.one_line
    assert parser.feed_data(b"data: [DONE]") == []
    assert parser.close_data() == [b"[DONE]"]
    assert not parser.one_line


def test_sse_parser_delivers_an_unterminated_last_event_at_eof() -> None:
    parser = SseParser()
    assert parser.feed(b"data: x\n\ndata: [DONE]") == [SseEvent("message", "x")]
    assert parser.close() == [SseEvent("message", "[DONE]")]


def test_sse_parser_utf8_split_across_feeds() -> None:
    raw = "data: héllo ✓\n\n".encode()
    parser = SseParser()
    events = [e for i in range(len(raw)) for e in parser.feed(raw[i : i + 1])]
    assert events == [SseEvent("message", "héllo ✓")]


# --------------------------------------------------------------------------- over the wire
RawHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _raw_server(handler: RawHandler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


@pytest.fixture
async def upstream(fake: FakeOpenAI) -> AsyncIterator[HttpUpstream]:
    http = HttpUpstream(
        provider="fakeai",
        base_url=fake.base_url,
        headers={"Authorization": f"Bearer {SECRET}"},
        secrets=[SECRET],
        max_concurrency=4,
    )
    await http.start()
    yield http
    await http.close()


def _chat_payload(stream: bool = False) -> bytes:
    s = b"true" if stream else b"false"
    return b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": ' + s + b"}"


def _soon(seconds: float = 30.0) -> float:
    return time.monotonic() + seconds


async def test_iter_sse_yields_events_before_the_body_ends() -> None:
    gate = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"event: first\r\ndata: one\r\n\r\ndata: tw")  # an event and a half
        await gate.wait()
        await resp.write(b"o\n\n")
        await resp.write_eof()
        return resp

    runner, url = await _raw_server(handler)
    try:
        http = HttpUpstream(provider="raw", base_url=url)
        async with http.stream("/x", b"{}", deadline=_soon(), timeouts=TIMEOUTS) as resp:
            events = iter_sse(resp)
            assert await anext(events) == SseEvent("first", "one")  # while the server waits
            gate.set()
            assert [e async for e in events] == [SseEvent("message", "two")]
        await http.close()
    finally:
        gate.set()
        await runner.cleanup()


async def test_stream_rejects_a_200_that_is_not_an_event_stream() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "streaming is off"}})

    runner, url = await _raw_server(handler)
    http = HttpUpstream(provider="raw", base_url=url)
    try:
        with pytest.raises(UpstreamUnavailable, match="streaming is off") as info:
            async with http.stream("/x", b"{}", deadline=_soon(), timeouts=TIMEOUTS):
                pass
        assert info.value.retryable and info.value.provider == "raw"
    finally:
        await http.close()
        await runner.cleanup()


async def test_post_json_sends_headers_and_reuses_the_connection(
    fake: FakeOpenAI, upstream: HttpUpstream
) -> None:
    for _ in range(3):
        data = await upstream.post_json(
            "/chat/completions", _chat_payload(), deadline=_soon(), timeouts=TIMEOUTS
        )
        assert data["object"] == "chat.completion"
    assert [r.headers["authorization"] for r in fake.requests] == [f"Bearer {SECRET}"] * 3
    assert fake.requests[0].headers["content-type"] == "application/json"
    assert len({r.peer for r in fake.requests}) == 1  # one kept-alive connection


async def test_connection_refused_is_upstream_unavailable() -> None:
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    http = HttpUpstream(provider="gone", base_url=f"http://127.0.0.1:{port}/v1")
    try:
        with pytest.raises(UpstreamUnavailable) as info:
            await http.post_json("/x", b"{}", deadline=_soon(), timeouts=TIMEOUTS)
        assert info.value.retryable and info.value.provider == "gone"
        with pytest.raises(UpstreamUnavailable):
            async with http.stream("/x", b"{}", deadline=_soon(), timeouts=TIMEOUTS):
                pass
    finally:
        await http.close()


async def test_a_passed_deadline_makes_no_call(fake: FakeOpenAI, upstream: HttpUpstream) -> None:
    with pytest.raises(DeadlineExceeded):
        await upstream.post_json("/chat/completions", b"{}", deadline=time.monotonic() - 0.1,
                                 timeouts=TIMEOUTS)
    assert fake.request_count == 0


async def test_hang_until_first_byte_timeout(fake: FakeOpenAI, upstream: HttpUpstream) -> None:
    fake.script(Behaviour.hang())
    short = TimeoutsConfig(connect_ms=5000, first_byte_ms=200)
    with pytest.raises(UpstreamTimeout) as info:
        await upstream.post_json("/chat/completions", _chat_payload(), deadline=_soon(),
                                 timeouts=short)
    assert info.value.retryable and info.value.provider == "fakeai"
    await fake.wait_until(lambda f: f.disconnects == 1)  # we hung up on it


async def test_hang_until_the_deadline(fake: FakeOpenAI, upstream: HttpUpstream) -> None:
    fake.script(Behaviour.hang())
    with pytest.raises(DeadlineExceeded) as info:
        await upstream.post_json("/chat/completions", _chat_payload(),
                                 deadline=time.monotonic() + 0.2, timeouts=TIMEOUTS)
    assert info.value.provider == "fakeai"
    await fake.wait_until(lambda f: f.disconnects == 1)


async def test_reset_and_not_json(fake: FakeOpenAI, upstream: HttpUpstream) -> None:
    fake.script(Behaviour.reset_before(), Behaviour.not_json())
    with pytest.raises(UpstreamUnavailable):
        await upstream.post_json("/chat/completions", _chat_payload(), deadline=_soon(),
                                 timeouts=TIMEOUTS)
    with pytest.raises(UpstreamUnavailable, match="not JSON"):
        await upstream.post_json("/chat/completions", _chat_payload(), deadline=_soon(),
                                 timeouts=TIMEOUTS)


async def test_stream_error_status_is_translated_before_the_body(
    fake: FakeOpenAI, upstream: HttpUpstream
) -> None:
    fake.script(Behaviour.rate_limited("7"))
    with pytest.raises(UpstreamRateLimited) as info:
        async with upstream.stream("/chat/completions", _chat_payload(True), deadline=_soon(),
                                   timeouts=TIMEOUTS):
            pass
    assert info.value.retry_after == 7.0


async def test_request_returns_raw_body(fake: FakeOpenAI, upstream: HttpUpstream) -> None:
    resp = await upstream.request("GET", "/models", None, deadline=_soon(), timeouts=TIMEOUTS)
    assert resp.status == 200 and resp.content_type == "application/json"
    assert b"fake-model" in resp.body


async def test_close_then_start_again(fake: FakeOpenAI, upstream: HttpUpstream) -> None:
    await upstream.close()
    await upstream.close()  # idempotent
    await upstream.start()
    data = await upstream.post_json("/chat/completions", _chat_payload(), deadline=_soon(),
                                    timeouts=TIMEOUTS)
    assert data["choices"]


@pytest.mark.parametrize(("body", "wire"), [
    (b'{"error": {"message": "too long", "type": "invalid_request_error", "param": "messages",'
     b' "code": "context_length_exceeded"}}', ("invalid_request_error", "context_length_exceeded")),
    (b'{"error": {"message": "m", "type": "invalid_request_error", "param": null, "code": null}}',
     ("invalid_request_error", None)),
    (b'{"type": "error", "error": {"type": "invalid_request_error", "message": "m"}}', None),
    (b'{"detail": "nope"}', None),
    (b"not json", None),
])
def test_openai_shaped_upstream_errors_keep_type_and_code(
    body: bytes, wire: tuple[str, str | None] | None
) -> None:
    from meshnode.api.errors import error_body
    from meshnode.providers.http import error_for_status

    error = error_for_status(400, body, {}, provider="up")
    assert error.upstream_wire == wire
    out = error_body(error)
    if wire is None:
        assert out["error"]["code"] == "upstream_bad_request" and "x_aiproxy" not in out
    else:
        assert (out["error"]["type"], out["error"]["code"]) == wire
        assert out["x_aiproxy"] == {"error_type": "invalid_request_error",
                                    "error_code": "upstream_bad_request", "provider": "up"}
    assert error_for_status(401, body, {}, provider="up").upstream_wire is None


def test_a_calls_header_lines_follow_ours_as_given() -> None:
    origin = _Origin.of("http://up:81/v1", {"User-Agent": "u", "Accept": "a"})
    ours = b"Host: up:81\r\nUser-Agent: u\r\nAccept: a\r\nAccept-Encoding: gzip, deflate\r\n"
    assert origin.block == ours
    for _ in range(2):  # its lines' template made, then reused
        assert origin.with_headers({"x-request-id": "r%s1", "X-Odd%": "{0} %d"}) == (
            ours + b"x-request-id: r%s1\r\nX-Odd%: {0} %d\r\n")
    # one of ours replaced in place (whatever its case), the call's others after ours
    assert origin.with_headers({"accept": "x/y", "x-request-id": "r"}) == (
        b"Host: up:81\r\nUser-Agent: u\r\naccept: x/y\r\nAccept-Encoding: gzip, deflate\r\n"
        b"x-request-id: r\r\n")
    for bad in ({"x-request-id": "a\r\nX-Evil: 1"}, {"x-request-id": "a\nb"},
                {"x-request-id": "a\x00"}, {"X-Evil\r\nX-More": "1"}):
        with pytest.raises(ValueError, match="line break"):
            origin.with_headers(bad)
