"""Shared HTTP plumbing for the cloud adapters (OpenAI-compatible, Anthropic, Cloudflare).

Owns, for every HTTP upstream:
- `HttpUpstream`: ONE keep-alive connection pool per provider (opened in `start()`, closed in
  `close()`), sized by `max_concurrency`, DNS cache; the adapter gives it the auth headers.
  Its POSTs (every adapter call) go through the lean HTTP/1.1 client `providers/h1.py`, which
  this module drives (it encodes the request, translates the errors); any other method through
  one `aiohttp.ClientSession`. Every call is bounded by `TimeoutsConfig` (connect, first byte)
  and by the request's deadline (`time.monotonic()`), never waiting past it.
- the one translation of foreign failures into `MeshError` (SPEC/errors.py): HTTP statuses and
  upstream error bodies (`error_for_status`), h1/aiohttp/OS exceptions (`error_for_exception`).
  Every error carries `provider=`; messages are sanitised (our credentials redacted, length
  capped, control characters dropped).
- `parse_retry_after`: the `Retry-After` header, both forms.
- `SseParser` / `iter_sse`: server-sent events read as bytes arrive, never buffering the body.

It knows nothing of any vendor's JSON beyond the common error shapes
(`{"error": {"message"}}`, `{"error": "..."}`, `{"message"}`, `{"detail"}`, `{"errors": [...]}`):
request and answer shapes belong to each adapter.

How an adapter uses it (see `openai_compat.py` for the full pattern):

    self._http = HttpUpstream(provider=name, base_url=url,
                              headers={"Authorization": f"Bearer {key}"}, secrets=[key],
                              max_concurrency=cfg.max_concurrency)
    await self._http.start()
    data = await self._http.post_json("/chat/completions", orjson.dumps(body),
                                      deadline=request.deadline, timeouts=timeouts)
    async with self._http.stream("/chat/completions", payload, deadline=..., timeouts=...) as resp:
        async for event in iter_sse(resp):      # SseEvent(event, data)
            ...                                  # wrap h1's OSErrors: error_for_exception

Errors raised by `post_json`/`request`/`stream` (before the body is read) are already
`MeshError`s. Errors while iterating a stream body are h1's (OSErrors and TimeoutErrors, which
the adapters' `except (aiohttp.ClientError, OSError, TimeoutError)` catch): the adapter
translates them with `HttpUpstream.error_for_exception` and, once it has yielded a chunk, re-raises them as
`StreamBroken` (see `as_stream_broken`).
"""

from __future__ import annotations

import base64
import logging
import math
import re
import ssl
import time
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple, TypeVar
from urllib.parse import quote, unquote, urlsplit

import aiohttp
import orjson

from meshnode.config import TimeoutsConfig
from meshnode.errors import (
    DeadlineExceeded,
    MeshError,
    StreamBroken,
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from meshnode.observability import tracing
from meshnode.observability.redact import MAX_CLIENT_CHARS, for_client
from meshnode.providers import h1
from meshnode.providers.h1 import ACCEPT_ENCODING, H1Pool, H1Response

log = logging.getLogger(__name__)

T = TypeVar("T")

USER_AGENT = "meshnode/0.1"
# An upstream error message longer than this is cut: it ends up in a client-visible error.
MAX_MESSAGE_CHARS = MAX_CLIENT_CHARS
# Error bodies are read up to this size: enough for any JSON error, bounded against a flood.
MAX_ERROR_BODY_BYTES = 64 * 1024
# parse_retry_after never returns more (about 31 years): keeps arithmetic finite.
MAX_RETRY_AFTER_S = 1e9
# A TimeoutError this close to the request's deadline is the deadline's (the loop's clock and
# time.monotonic() may differ by a tick).
_DEADLINE_SLACK_S = 0.02


# --------------------------------------------------------------------------- Retry-After
_SECONDS = re.compile(r"^[+-]?\d+(\.\d*)?$")


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header value.

    Accepts delta-seconds (`"3"`, `"1.5"`) and HTTP-dates (`"Wed, 21 Oct 2015 07:28:00 GMT"`).
    A negative value or a date in the past gives 0. Garbage or an absent header gives None.
    Absurdly large values are returned as they are (bounded to `MAX_RETRY_AFTER_S` to stay
    finite): capping them is the router's policy, not the parser's.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if _SECONDS.match(text):
        seconds = float(text)
        if math.isnan(seconds):
            return None
        return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:  # some Python versions return None instead of raising
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        when = when.replace(tzinfo=UTC)
    current = now or datetime.now(UTC)
    return min(max((when - current).total_seconds(), 0.0), MAX_RETRY_AFTER_S)


def retry_after_from_headers(headers: Mapping[str, str]) -> float | None:
    """`retry-after-ms` (OpenAI's precise form) when present and valid, else `Retry-After`."""
    precise = headers.get("retry-after-ms")
    if precise is not None:
        ms = parse_retry_after(precise)
        if ms is not None:
            return ms / 1000.0
    return parse_retry_after(headers.get("retry-after"))


# --------------------------------------------------------------------------- error translation
def upstream_message(body: bytes) -> tuple[str | None, str | None]:
    """(message, param) from an upstream error body in any common shape, or (None, None).

    Shapes: OpenAI/Anthropic `{"error": {"message", "param"}}`, `{"error": "text"}`,
    `{"message": ...}`, FastAPI/vLLM `{"detail": ...}`, Cloudflare `{"errors": [{"message"}]}`;
    a short non-JSON body is taken as plain text.
    """
    if not body:
        return None, None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body[:MAX_MESSAGE_CHARS].decode("utf-8", "replace").strip()
        # an HTML error page says nothing useful and may be long
        if not text or text.startswith("<"):
            return None, None
        return text, None
    if not isinstance(data, dict):
        return None, None
    err = data.get("error")
    if isinstance(err, dict):
        message = err.get("message")
        param = err.get("param")
        return (
            str(message) if message is not None else None,
            str(param) if isinstance(param, str) else None,
        )
    if isinstance(err, str):
        return err, None
    for key in ("message", "detail"):
        value = data.get(key)
        if isinstance(value, str):
            return value, None
        if value is not None:  # FastAPI validation details are a list
            return orjson.dumps(value).decode(), None
    errors = data.get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        message = errors[0].get("message")
        if message is not None:
            return str(message), None
    return None, None


def request_id_headers(request_id: str) -> dict[str, str]:
    """Our request id (the client's, when it sent a sane one) for the upstream's logs:
    `x-request-id` (vLLM, LiteLLM, gateways) and `X-Client-Request-Id` (OpenAI's name)."""
    return {"x-request-id": request_id, "X-Client-Request-Id": request_id}


STREAM_ACCEPT = {"Accept": "text/event-stream"}


def openai_error_wire(body: bytes) -> tuple[str, str | None] | None:
    """`(type, code)` of an OpenAI-shaped error body (`{"error": {"message", "type", "code"}}`,
    with `code` present, possibly null), else None. Anthropic's envelope (a top-level
    `"type": "error"`) and other shapes are not OpenAI's."""
    try:
        data = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or "type" in data:
        return None
    err = data.get("error")
    if not isinstance(err, dict) or "code" not in err or not isinstance(err.get("type"), str):
        return None
    code = err.get("code")
    return err["type"][:100], (str(code)[:100] if code is not None else None)


def error_for_status(
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    *,
    provider: str,
    secrets: Sequence[str] = (),
) -> UpstreamError:
    """The MeshError for a non-2xx answer (why each is retryable or not: see errors.py).

    429 → UpstreamRateLimited (retry_after from the headers); 400/404/413/422 and other 4xx →
    UpstreamBadRequest with the upstream's sanitised message and param; 401/403 →
    UpstreamAuthError (the upstream's text is not shown: it may quote our key); 408 →
    UpstreamTimeout; 5xx and anything else → UpstreamUnavailable.
    """
    message, param = upstream_message(body)
    shown = for_client(message, secrets) if message else ""
    # `param` is the upstream's text too: it has quoted keys back (the upstream echoing a bad
    # field of ours), so it is redacted like the message.
    param = for_client(param, secrets) if param else None
    suffix = f": {shown}" if shown else ""
    if status == 429:
        limited = UpstreamRateLimited(
            f"{provider} is rate limiting (HTTP 429){suffix}",
            retry_after=retry_after_from_headers(headers),
            provider=provider,
        )
        limited.upstream_wire = openai_error_wire(body)  # e.g. insufficient_quota
        return limited
    if status in (401, 403):
        return UpstreamAuthError(
            f"{provider} rejected this node's credentials (HTTP {status}); "
            "check the provider's credentials in the node's config",
            provider=provider,
        )
    if status == 408:
        return UpstreamTimeout(f"{provider} timed out (HTTP 408){suffix}", provider=provider)
    if 400 <= status < 500:
        error = UpstreamBadRequest(
            f"{provider} rejected the request (HTTP {status}){suffix}",
            param=param,
            provider=provider,
        )
        error.upstream_wire = openai_error_wire(body)
        return error
    return UpstreamUnavailable(f"{provider} failed (HTTP {status}){suffix}", provider=provider)


def error_for_exception(
    exc: BaseException,
    *,
    provider: str,
    deadline: float | None = None,
    secrets: Sequence[str] = (),
) -> MeshError:
    """The MeshError for an exception raised while talking to an upstream.

    A MeshError passes through unchanged. Timeouts: `DeadlineExceeded` when the request's
    deadline has passed (no time is left for any retry), else `UpstreamTimeout` (another
    candidate may be faster). Connection refused/reset, ServerDisconnected, a truncated or
    malformed body (ClientPayloadError) and any other aiohttp/OS error → `UpstreamUnavailable`.
    The lean client's errors (`providers/h1.py`) map to the same MeshErrors as aiohttp's.
    """
    if isinstance(exc, MeshError):
        return exc
    detail = for_client(str(exc), secrets) or type(exc).__name__
    if isinstance(exc, TimeoutError):  # aiohttp's timeout errors are TimeoutErrors too
        if deadline is not None and time.monotonic() >= deadline - _DEADLINE_SLACK_S:
            return DeadlineExceeded(
                f"the request's deadline passed while waiting for {provider}", provider=provider
            )
        if isinstance(exc, (aiohttp.ConnectionTimeoutError, h1.ConnectTimeout)):
            what = "connecting"
        else:
            what = "waiting for data"
        return UpstreamTimeout(f"{provider} timed out {what}", provider=provider)
    if isinstance(exc, (aiohttp.ClientPayloadError, h1.PayloadError)):
        return UpstreamUnavailable(
            f"{provider} sent a broken response body ({detail})", provider=provider
        )
    if isinstance(exc, (aiohttp.ServerDisconnectedError, h1.ServerDisconnected)):
        return UpstreamUnavailable(f"{provider} closed the connection", provider=provider)
    if isinstance(exc, (aiohttp.ClientConnectorError, h1.ConnectError)):
        return UpstreamUnavailable(f"cannot connect to {provider} ({detail})", provider=provider)
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return UpstreamUnavailable(
            f"connection to {provider} failed ({detail})", provider=provider
        )
    return UpstreamUnavailable(f"{provider} failed ({detail})", provider=provider)


def as_stream_broken(error: MeshError) -> MeshError:
    """The error to raise once a stream has yielded a chunk: never retryable.

    A deadline stays a DeadlineExceeded (not retryable either); everything else becomes
    StreamBroken with the original message, since text already went to the client.
    """
    if isinstance(error, (StreamBroken, DeadlineExceeded)):
        return error
    return StreamBroken(
        f"stream broke after it started: {error.message}", provider=error.provider
    )


# --------------------------------------------------------------------------- server-sent events
class SseEvent(NamedTuple):
    """One server-sent event: its `event:` type ("message" when absent) and its data lines
    joined by "\\n"."""

    event: str
    data: str


class SseParser:
    """Incremental server-sent-events parser (WHATWG rules): feed it bytes as they arrive.

    Handles `event:`, `data:` (several lines joined by "\\n"), `id:`/`retry:` (kept/ignored),
    comments (`:` lines, e.g. keep-alive pings), LF and CRLF line ends, lines split across
    feeds. A lone CR as a line end is not supported (no upstream we speak uses it). Unlike the
    spec, an event not closed by a blank line before EOF is still delivered by `close()`:
    servers that end on `data: [DONE]` without the blank line are common.

    `feed_data` / `close_data` give each event's data alone, as the bytes that came (lines
    joined by b"\\n", not decoded; the types ignored), for a caller that parses them as JSON
    itself; `feed` / `close` give whole events, decoded (invalid UTF-8 replaced). A read is
    split at its blank lines in one pass; an event that is one `data: ` line (every OpenAI
    chunk) is taken whole, without a pass per line. `one_line` says whether every event the
    last call gave was such a line: no CR or LF in its data (which can then be relayed as one
    SSE line as it is, without the caller scanning it again).
    """

    __slots__ = ("_buffer", "_data", "_event", "last_event_id", "one_line")

    def __init__(self) -> None:
        self._buffer = b""  # what follows the last blank line seen, not yet parsed
        self._data: list[bytes] = []  # the data lines of an event begun, parsed by line
        self._event = ""
        self.last_event_id = ""
        # every event of the last feed/close came whole from one `data: ` line without CR
        # or LF (False as soon as one came through `_line`, which may join lines)
        self.one_line = True

    def feed(self, chunk: bytes) -> list[SseEvent]:
        names: list[str] = []
        datas = self._feed(chunk, names)
        return [SseEvent(name, data.decode("utf-8", "replace"))
                for name, data in zip(names, datas, strict=True)]

    def close(self) -> list[SseEvent]:
        """End of input: the pending event, if any (see the class note)."""
        names: list[str] = []
        datas = self._close(names)
        return [SseEvent(name, data.decode("utf-8", "replace"))
                for name, data in zip(names, datas, strict=True)]

    def feed_data(self, chunk: bytes) -> list[bytes]:
        """The data of the events completed by `chunk`, their types ignored."""
        return self._feed(chunk, None)

    def close_data(self) -> list[bytes]:
        """`close`: the pending event's data, its type ignored."""
        return self._close(None)

    def _feed(self, chunk: bytes, names: list[str] | None) -> list[bytes]:
        buf = self._buffer + chunk if self._buffer else chunk
        events: list[bytes] = []
        self.one_line = True
        if _CR in buf or self._data or self._event:
            # CRLF line ends, or an event begun by line (its blank line may start `buf`)
            self._buffer = self._lines(buf, events, names)
            return events
        parts = buf.split(b"\n\n")
        rest = parts.pop()
        append = events.append
        for part in parts:
            data = part.removeprefix(b"data: ")  # `part` itself when it is not a data line
            if data is not part and _LF not in data:
                append(data)
                if names is not None:
                    names.append("message")
                continue
            for line in part.split(b"\n"):
                self._line(line, events, names)
            self._line(b"", events, names)
        if len(rest) > _SSE_UNSPLIT_MAX:
            # A long event still open: parse its whole lines now rather than rescan them at
            # every read.
            rest = self._lines(rest, events, names)
        self._buffer = rest
        return events

    def _close(self, names: list[str] | None) -> list[bytes]:
        events: list[bytes] = []
        self.one_line = True
        buf, self._buffer = self._buffer, b""
        if buf:
            if not buf.endswith(b"\n"):
                buf += b"\n"
            self._lines(buf, events, names)
        self._line(b"", events, names)
        return events

    def _lines(self, buf: bytes, events: list[bytes], names: list[str] | None) -> bytes:
        """Parse every whole line of `buf`; the unfinished last one is returned."""
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                return buf[start:]
            line = buf[start:end]
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            self._line(line, events, names)

    def _line(self, line: bytes, events: list[bytes], names: list[str] | None) -> None:
        if not line:
            if not self._data:
                self._event = ""
                return
            events.append(b"\n".join(self._data))
            self.one_line = False
            if names is not None:
                names.append(self._event or "message")
            self._data = []
            self._event = ""
            return
        if line[0] == 0x3A:  # ":" comment / ping
            return
        name, sep, value = line.partition(b":")
        if sep and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id":
            self.last_event_id = value.decode("utf-8", "replace")
        # "retry" and unknown fields are ignored, as the spec says


# Byte values, for `in` on bytes: a one-byte bytes operand costs CPython a TypeError raised and
# cleared inside (it tries it as an int first), ten times the search itself.
_LF = 0x0A
_CR = 0x0D
# Past this many bytes after the last blank line, `SseParser` parses the lines it holds.
_SSE_UNSPLIT_MAX = 1 << 16


async def iter_sse(response: H1Response | aiohttp.ClientResponse
                   ) -> AsyncGenerator[SseEvent, None]:
    """The events of a response body, each yielded as soon as its bytes arrive.

    Raises the transport's errors as they are (the caller translates, knowing whether a chunk
    has already gone out).
    """
    parser = SseParser()
    async for data in response.content.iter_any():
        for event in parser.feed(data):
            yield event
    for event in parser.close():
        yield event


# --------------------------------------------------------------------------- the session
@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    """A whole 2xx answer: its status, raw body and content type."""

    status: int
    body: bytes
    content_type: str


class HttpUpstream:
    """One provider's HTTP client: keep-alive pool, bounded waits.

    The calls (POSTs: `post_json`, `request("POST", ...)`, `stream`) go through the lean
    HTTP/1.1 client (`providers/h1.py`, one pool per provider); other methods (`GET /models`)
    through one long-lived `aiohttp.ClientSession`, opened when first needed. Both ignore the
    environment's proxies and netrc: the operator's base_url is where traffic goes.

    Concurrency: safe to call from many tasks on one event loop. `max_concurrency` bounds open
    connections; a call waiting for a free connection is still bounded by its deadline.
    Timeouts: `connect_ms` bounds the TCP/TLS connect, `first_byte_ms` bounds every wait for
    data (the headers, and each read of the body: a stream that stalls that long mid-way is
    broken), the request's `deadline` bounds the whole call including reading a stream.
    """

    def __init__(
        self,
        *,
        provider: str,
        base_url: str,
        headers: Mapping[str, str] | None = None,
        max_concurrency: int = 256,
        secrets: Sequence[str] = (),
        keepalive_s: float = 30.0,
        dns_cache_s: int = 300,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.provider = provider
        self.base_url = base_url.rstrip("/")
        self._headers = {
            "User-Agent": USER_AGENT,
            "Content-Type": "application/json",
            "Accept": "application/json",
            **(headers or {}),
        }
        self._secrets = tuple(s for s in secrets if s)
        self._max_concurrency = max_concurrency
        self._keepalive_s = keepalive_s
        self._dns_cache_s = dns_cache_s
        self._ssl_context = ssl_context
        self._session: aiohttp.ClientSession | None = None
        self._pool: H1Pool | None = None
        self._origin = _Origin.of(self.base_url, self._headers)
        self._targets: dict[str, bytes] = {}
        # The last timeouts a call gave and their connect and read bounds in seconds (a config
        # model's attributes are slow to read: ~500 instructions each)
        self._seconds: tuple[TimeoutsConfig | None, float, float] = (None, 0.0, 0.0)

    # ---- lifecycle
    async def start(self) -> None:
        if self._origin.error is None:  # else each call reports it, as aiohttp did
            self._ensure_pool()

    async def close(self) -> None:
        session, self._session = self._session, None
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
        if session is not None:
            await session.close()

    def _ensure_pool(self) -> H1Pool:
        pool = self._pool
        if pool is None or pool.closed:
            origin = self._origin
            if origin.error is not None:
                raise UpstreamUnavailable(
                    f"connection to {self.provider} failed ({origin.error})",
                    provider=self.provider,
                )
            pool = H1Pool(
                host=origin.host, port=origin.port, tls=origin.tls,
                limit=self._max_concurrency, keepalive_s=self._keepalive_s,
                dns_cache_s=self._dns_cache_s, ssl_context=self._ssl_context,
            )
            self._pool = pool
        return pool

    def _ensure_session(self) -> aiohttp.ClientSession:
        session = self._session
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_concurrency,
                limit_per_host=0,
                use_dns_cache=True,
                ttl_dns_cache=self._dns_cache_s,
                keepalive_timeout=self._keepalive_s,
                ssl=self._ssl_context if self._ssl_context is not None else True,
            )
            session = aiohttp.ClientSession(
                connector=connector,
                headers=self._headers,
                # no HTTP(S)_PROXY or netrc from the environment: the operator's base_url is
                # where traffic goes, nothing else
                trust_env=False,
                auto_decompress=True,
                timeout=aiohttp.ClientTimeout(total=None),
                # traceparent on every upstream call while tracing is on (a no-op otherwise)
                trace_configs=tracing.aiohttp_trace_configs(),
            )
            self._session = session
        return session

    # ---- errors (bound to this provider and its secrets)
    def error_for_status(
        self, status: int, body: bytes, headers: Mapping[str, str]
    ) -> UpstreamError:
        return error_for_status(
            status, body, headers, provider=self.provider, secrets=self._secrets
        )

    def error_for_exception(self, exc: BaseException, deadline: float | None = None) -> MeshError:
        return error_for_exception(
            exc, provider=self.provider, deadline=deadline, secrets=self._secrets
        )

    def redact(self, text: str) -> str:
        """`text` (an upstream's) safe to show a client (`meshnode.observability.redact`)."""
        return for_client(text, self._secrets)

    # ---- calls
    def _check_deadline(self, deadline: float) -> None:
        if deadline <= time.monotonic():
            raise DeadlineExceeded(
                f"the request's deadline passed before calling {self.provider}",
                provider=self.provider,
            )

    def timeout_for(self, deadline: float, timeouts: TimeoutsConfig) -> aiohttp.ClientTimeout:
        """aiohttp's timeout for one call; raises DeadlineExceeded when no time is left."""
        self._check_deadline(deadline)
        return aiohttp.ClientTimeout(
            total=deadline - time.monotonic(),
            sock_connect=timeouts.connect_ms / 1000.0,
            sock_read=timeouts.first_byte_ms / 1000.0,
            # aiohttp rounds timeouts over the threshold up to a whole second; the deadline
            # must not be overshot by up to a second
            ceil_threshold=math.inf,
        )

    def _wire(
        self, method: str, path: str, payload: bytes | None, headers: Mapping[str, str] | None
    ) -> bytes:
        """The whole request on the wire: request line, headers (ours, then the call's: a
        call's header replaces ours of the same name), body. A ValueError (a header with a line
        break; credentials in the URL and an Authorization header) is raised as it is, as
        aiohttp did: the config is wrong."""
        target = self._targets.get(path)
        if target is None:
            target = self._origin.target(path)
            if len(self._targets) < _MAX_TARGETS:  # paths come from the config: few
                self._targets[path] = target
        origin = self._origin
        if origin.header_error is not None:
            raise ValueError(origin.header_error)
        if tracing.enabled():
            carrier: dict[str, str] = {}
            tracing.inject_headers(carrier)
            headers = {**(headers or {}), **carrier}
        if origin.url_auth and (headers and any(k.lower() == "authorization" for k in headers)
                                or origin.url_auth_conflict):
            raise ValueError("Cannot combine AUTHORIZATION header with AUTH argument or "
                             "credentials encoded in URL")
        block = origin.block if not headers else origin.with_headers(headers)
        if payload is None:
            if method in _BODY_METHODS:
                block += b"Content-Length: 0\r\n"
            return b"%s %s HTTP/1.1\r\n%s\r\n" % (method.encode(), target, block)
        return b"%s %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s" % (
            method.encode(), target, block, len(payload), payload)

    def _send(
        self,
        method: str,
        path: str,
        payload: bytes | None,
        deadline: float,
        timeouts: TimeoutsConfig,
        headers: Mapping[str, str] | None,
    ) -> Coroutine[Any, Any, H1Response]:
        """The lean client's call for the response head of one request (a stream's): the
        pool's coroutine itself (no frame of its own on the request's resumptions), awaited by
        the caller, which translates h1's OSErrors and TimeoutErrors (`error_for_exception`)."""
        pool = self._ready_pool(deadline)
        data = self._wire(method, path, payload, headers)
        seconds = self._bounds(timeouts)
        return pool.request(
            data, deadline=deadline, connect_timeout=seconds[1], read_timeout=seconds[2])

    def _call(
        self,
        path: str,
        payload: bytes | None,
        deadline: float,
        timeouts: TimeoutsConfig,
        headers: Mapping[str, str] | None,
    ) -> Coroutine[Any, Any, h1.Whole]:
        """`_send` for a whole POST: the pool's whole call (`H1Pool.fetch`), an error's body
        read up to `MAX_ERROR_BODY_BYTES`."""
        pool = self._ready_pool(deadline)
        data = self._wire("POST", path, payload, headers)
        seconds = self._bounds(timeouts)
        return pool.fetch(data, deadline=deadline, connect_timeout=seconds[1],
                          read_timeout=seconds[2], error_limit=MAX_ERROR_BODY_BYTES)

    def _ready_pool(self, deadline: float) -> H1Pool:
        """The pool a call goes through (DeadlineExceeded when no time is left)."""
        if deadline <= time.monotonic():
            self._check_deadline(deadline)
        pool = self._pool
        if pool is None or pool.closed:
            pool = self._ensure_pool()
        return pool

    def _bounds(self, timeouts: TimeoutsConfig) -> tuple[TimeoutsConfig | None, float, float]:
        """`timeouts` with its connect and read bounds in seconds, kept from the last call."""
        seconds = self._seconds
        if seconds[0] is not timeouts:  # (the router's config: the same object every call)
            seconds = self._seconds = (
                timeouts, timeouts.connect_ms / 1000.0, timeouts.first_byte_ms / 1000.0)
        return seconds

    def request(
        self,
        method: str,
        path: str,
        payload: bytes | None,
        *,
        deadline: float,
        timeouts: TimeoutsConfig,
        headers: Mapping[str, str] | None = None,
    ) -> Awaitable[UpstreamResponse]:
        """One whole call: a 2xx answer's raw body, or a MeshError (already translated)."""
        if method != "POST":
            return self._request_aiohttp(method, path, payload, deadline=deadline,
                                         timeouts=timeouts, headers=headers)
        return self._post(path, payload, deadline, timeouts, headers, _raw_answer)

    async def _post(
        self, path: str, payload: bytes | None, deadline: float, timeouts: TimeoutsConfig,
        headers: Mapping[str, str] | None,
        answer: Callable[[HttpUpstream, int, bytes, str], T],
    ) -> T:
        """A whole POST over the lean client: `answer` of a 2xx answer's status, raw body and
        raw content type (`_raw_answer`, `_json_answer`), or a MeshError (already translated).
        The one coroutine of `request`'s POSTs and `post_json`, which return it (no frame of
        their own), over the pool's whole call (`H1Pool.fetch`)."""
        try:
            status, body, raw_type, raw_headers = await self._call(
                path, payload, deadline, timeouts, headers)
        except (OSError, TimeoutError) as exc:
            raise self.error_for_exception(exc, deadline) from exc
        if status >= 300:
            raise self.error_for_status(status, body, h1.header_dict(raw_headers))
        return answer(self, status, body, raw_type)

    async def _request_aiohttp(
        self,
        method: str,
        path: str,
        payload: bytes | None,
        *,
        deadline: float,
        timeouts: TimeoutsConfig,
        headers: Mapping[str, str] | None = None,
    ) -> UpstreamResponse:
        timeout = self.timeout_for(deadline, timeouts)
        session = self._ensure_session()
        try:
            async with session.request(
                method, self.base_url + path, data=payload, headers=headers, timeout=timeout
            ) as resp:
                if resp.status >= 300:
                    body = await resp.content.read(MAX_ERROR_BODY_BYTES)
                    raise self.error_for_status(resp.status, body, resp.headers)
                body = await resp.read()
                return UpstreamResponse(resp.status, body, resp.content_type)
        except MeshError:
            raise
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise self.error_for_exception(exc, deadline) from exc

    def post_json(
        self,
        path: str,
        payload: bytes,
        *,
        deadline: float,
        timeouts: TimeoutsConfig,
        headers: Mapping[str, str] | None = None,
    ) -> Awaitable[dict[str, Any]]:
        """POST a serialized JSON body; the parsed JSON object of a 2xx answer. A 2xx whose body
        is not a JSON object is UpstreamUnavailable (a broken proxy or gateway page)."""
        return self._post(path, payload, deadline, timeouts, headers, _json_answer)

    def parse_json_object(self, body: bytes) -> dict[str, Any]:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise UpstreamUnavailable(
                f"{self.provider} answered with a body that is not JSON", provider=self.provider
            ) from None
        if not isinstance(data, dict):
            raise UpstreamUnavailable(
                f"{self.provider} answered with JSON that is not an object",
                provider=self.provider,
            )
        return data

    def stream(
        self,
        path: str,
        payload: bytes,
        *,
        deadline: float,
        timeouts: TimeoutsConfig,
        headers: Mapping[str, str] | None = None,
        method: str = "POST",
    ) -> StreamCall:
        """Open a streamed call (`async with`): gives the 2xx response with its body unread.

        Before the body: failures are MeshErrors (already translated), and a 2xx that is not an
        event stream (a JSON error, a gateway page) is UpstreamUnavailable. On leaving the
        block, the connection goes back to the pool when the body was read to its end, and is
        closed otherwise (cancelled, abandoned, broken), which stops the upstream's work.
        Errors while the body is read are `h1`'s (OSErrors, TimeoutErrors): the adapter
        translates them with `error_for_exception`.
        """
        return StreamCall(self, method, path, payload, deadline, timeouts, headers)

    async def _open_stream(
        self, method: str, path: str, payload: bytes, deadline: float,
        timeouts: TimeoutsConfig, headers: Mapping[str, str] | None,
    ) -> H1Response:
        try:
            resp = await self._send(method, path, payload, deadline, timeouts,
                                    headers or STREAM_ACCEPT)
        except (OSError, TimeoutError) as exc:
            raise self.error_for_exception(exc, deadline) from exc
        try:
            if resp.status >= 300:
                body = await resp.content.read(MAX_ERROR_BODY_BYTES)
                raise self.error_for_status(resp.status, body, resp.headers)
            if "event-stream" not in resp.content_type:
                body = await resp.content.read(MAX_ERROR_BODY_BYTES)
                message, _ = upstream_message(body)
                shown = f": {self.redact(message)}" if message else ""
                raise UpstreamUnavailable(
                    f"{self.provider} answered a stream request with "
                    f"{resp.content_type or 'no content type'}{shown}",
                    provider=self.provider,
                )
        except (OSError, TimeoutError) as exc:
            resp.close()
            raise self.error_for_exception(exc, deadline) from exc
        except BaseException:
            resp.close()
            raise
        return resp


# What `_post` makes of a 2xx answer (module functions: a bound method read as a value per call
# is not specialised by the interpreter) from its status, body and raw Content-Type
def _raw_answer(http: HttpUpstream, status: int, body: bytes, raw_type: str
                ) -> UpstreamResponse:
    return UpstreamResponse(status, body, h1.media_type(raw_type))


def _json_answer(http: HttpUpstream, status: int, body: bytes, raw_type: str
                 ) -> dict[str, Any]:
    return http.parse_json_object(body)


class StreamCall:
    """`HttpUpstream.stream`'s context (a class, not a generator-based context manager: one
    less generator per stream)."""

    __slots__ = ("_args", "_http", "_resp")

    def __init__(self, http: HttpUpstream, method: str, path: str, payload: bytes,
                 deadline: float, timeouts: TimeoutsConfig,
                 headers: Mapping[str, str] | None) -> None:
        self._http = http
        self._args = (method, path, payload, deadline, timeouts, headers)
        self._resp: H1Response | None = None

    async def __aenter__(self) -> H1Response:
        self._resp = await self._http._open_stream(*self._args)
        return self._resp

    async def __aexit__(self, *exc_info: object) -> None:
        resp = self._resp
        if resp is None:
            return
        if resp.content.at_eof():
            resp.release()
        else:
            # not read to the end: drop the connection so the upstream stops generating
            resp.close()


_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_MAX_TARGETS = 256
# What may stay unescaped in a request target (RFC 3986 pchar, "/", "?" and escapes).
_TARGET_SAFE = "/?:@!$&'()*+,;=-._~%"


@dataclass(frozen=True, slots=True)
class _Origin:
    """Where a provider's calls go, and the header lines every call carries (encoded once):
    the session's (User-Agent, Content-Type, Accept, the adapter's auth), Host, aiohttp's
    default Accept-Encoding, Basic auth from credentials in the URL. `error`: why the base
    URL cannot be called (UpstreamUnavailable per call, as aiohttp's InvalidURL was)."""

    host: str
    port: int
    tls: bool
    base_path: str
    names: frozenset[str]  # lower-case names in `block`
    lines: tuple[tuple[str, str], ...]
    block: bytes
    error: str | None = None
    header_error: str | None = None  # a header of ours holds a line break: ValueError per call
    url_auth: bool = False  # credentials in the URL (sent as Basic auth)
    url_auth_conflict: bool = False  # ... and an Authorization header of ours: never sent
    # `block` with some of its headers replaced by a call's, by the replacing (name, value)s
    replaced: dict[tuple[tuple[str, str], ...], bytes] = field(
        default_factory=dict, compare=False, hash=False, repr=False)
    # A call's header lines as a %-template of their values, by the call's header names when
    # none of them is one of ours ("": some is, see `with_headers`)
    templates: dict[tuple[str, ...], str] = field(
        default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def of(cls, base_url: str, headers: Mapping[str, str]) -> _Origin:
        split = urlsplit(base_url)
        tls = split.scheme == "https"
        try:
            port = split.port or (443 if tls else 80)
        except ValueError as exc:
            return cls("", 0, tls, "", frozenset(), (), b"", error=f"invalid URL: {exc}")
        host = split.hostname or ""
        error = None
        if split.scheme not in ("http", "https") or not host:
            error = f"invalid URL {split.scheme}://{host}"
        shown_host = f"[{host}]" if ":" in host else host
        if port != (443 if tls else 80):
            shown_host = f"{shown_host}:{port}"
        lines: dict[str, tuple[str, str]] = {"host": ("Host", shown_host)}
        for name, value in headers.items():
            lines[name.lower()] = (name, value)
        lines.setdefault("accept-encoding", ("Accept-Encoding", ACCEPT_ENCODING))
        url_auth = split.username is not None
        conflict = url_auth and "authorization" in lines
        if url_auth and not conflict:
            user = unquote(split.username or "")
            password = unquote(split.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            lines["authorization"] = ("Authorization", f"Basic {token}")
        base_path = split.path.rstrip("/")
        if split.query:
            base_path += "?" + split.query
        items = tuple(lines.values())
        header_error: str | None = None
        try:
            block = _encode_lines(items)
        except ValueError as exc:
            block, header_error = b"", str(exc)
        return cls(host, port, tls, base_path, frozenset(lines), items, block, error,
                   header_error, url_auth, conflict)

    def target(self, path: str) -> bytes:
        return quote(self.base_path + path, safe=_TARGET_SAFE).encode("ascii")

    def with_headers(self, headers: Mapping[str, str]) -> bytes:
        """`block` with a call's headers: one naming one of ours (whatever its case) replaces
        it in place, the others follow in their order."""
        # The common call (a request id, none of ours replaced): its lines are a template of
        # its names, made once, filled with its values and checked as `_encode_lines` does.
        call_names = tuple(headers)
        template = self.templates.get(call_names)
        if template is None:
            template = self._template(call_names)
        if template:
            text = template % tuple(headers.values())
            n = len(call_names)
            if text.count("\n") != n or text.count("\r") != n or "\x00" in text:
                raise ValueError("a header name or value holds a line break")
            return self.block + text.encode("utf-8")
        names = self.names
        replacing: list[tuple[str, str]] | None = None
        for name, value in headers.items():
            if name.lower() in names:
                if replacing is None:
                    replacing = []
                replacing.append((name, value))
        if replacing is None:  # (a name with a line break: no template)
            return self.block + _encode_lines(headers.items())
        # Ours with some replaced (a stream's Accept): the same few every call, encoded once.
        key = tuple(replacing)
        block = self.replaced.get(key)
        if block is None:
            merged = {name.lower(): (name, value) for name, value in self.lines}
            for name, value in replacing:
                merged[name.lower()] = (name, value)
            block = _encode_lines(merged.values())
            if len(self.replaced) < _MAX_TARGETS:
                self.replaced[key] = block
        if len(replacing) == len(headers):
            return block
        return block + _encode_lines(
            [(name, value) for name, value in headers.items() if name.lower() not in names])


    def _template(self, call_names: tuple[str, ...]) -> str:
        """The %-template of a call's header lines ("" when one of them names one of ours, or
        holds a line break: `with_headers` takes its general way)."""
        ours = any(name.lower() in self.names for name in call_names)
        broken = any("\r" in name or "\n" in name or "\x00" in name for name in call_names)
        template = "" if ours or broken else "".join(
            [f"{name.replace('%', '%%')}: %s\r\n" for name in call_names])
        if len(self.templates) < _MAX_TARGETS:  # the calls' header names come from the code
            self.templates[call_names] = template
        return template


def _encode_lines(lines: Iterable[tuple[str, str]]) -> bytes:
    """Header lines, each "Name: value\\r\\n"; a line break or NUL in a name or value is
    refused (ValueError, as aiohttp does), so no header can smuggle another one in."""
    pairs = list(lines)
    text = "".join([f"{name}: {value}\r\n" for name, value in pairs])
    if text.count("\n") != len(pairs) or text.count("\r") != len(pairs) or "\x00" in text:
        raise ValueError("a header name or value holds a line break")
    return text.encode("utf-8")


__all__ = [
    "HttpUpstream",
    "SseEvent",
    "SseParser",
    "UpstreamResponse",
    "as_stream_broken",
    "error_for_exception",
    "error_for_status",
    "iter_sse",
    "parse_retry_after",
    "request_id_headers",
    "retry_after_from_headers",
    "upstream_message",
]
