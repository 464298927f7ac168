"""A scriptable fake OpenAI server on loopback, speaking OpenAI's exact wire.

Use it wherever a test (or the bench) needs a real OpenAI-compatible upstream: it is a real
aiohttp HTTP server on 127.0.0.1, port 0 (the OS picks a free port), so clients go through real
sockets, real HTTP framing and real SSE.

In-process, from async tests::

    async with FakeOpenAI() as fake:                 # fake.base_url == "http://127.0.0.1:PORT/v1"
        fake.script(Behaviour.error(500), Behaviour.ok(text="hi there"))
        ...                                          # 1st API request gets a 500, 2nd "hi there",
                                                     # later ones the default (ok)
        assert fake.requests[0].json["model"] == "gpt-4o"
        await fake.wait_until(lambda f: f.disconnects == 1)

As a subprocess, for tests that start real node processes::

    with FakeOpenAIProcess() as fake:                # runs `python -m tests.kit.fake_openai --port 0`
        fake.script(Behaviour.rate_limited("2"))     # over HTTP: POST /_fake/script
        ... point the node's config at fake.base_url ...
        fake.requests()                              # GET /_fake/requests

or by hand: `python -m tests.kit.fake_openai --port 0` prints
`FAKE_OPENAI_URL=http://127.0.0.1:PORT/v1` on stdout (flushed) and serves until SIGTERM/SIGINT.

The wire (what OpenAI sends; the official `openai` client parses it):
- `POST /v1/chat/completions`, `/v1/completions`: a JSON answer, or with `stream: true` an SSE
  stream of `data: {...}\\n\\n` events ending with `data: [DONE]\\n\\n`. Chat streams start with a
  role chunk (`delta: {"role": "assistant", "content": ""}`), then one chunk per piece of text,
  then a chunk with `delta: {}` and `finish_reason`; with `stream_options.include_usage` every
  chunk has `"usage": null` and a last chunk `{"choices": [], "usage": {...}}` precedes [DONE].
- `POST /v1/responses` (the Responses API, for native pass-through): a reasoning item (with
  `encrypted_content` when `include` asks) and a message with the behaviour's text; with
  `stream: true` OpenAI's event sequence (`event:` and `data:` lines, no `[DONE]`).
- `POST /v1/embeddings`: deterministic unit vectors (8 dims, or `dimensions`), derived from the
  input's hash; `encoding_format: "base64"` (the openai client's default) is honoured.
- `GET /v1/models`: the models given to the constructor.
- Answers echo the requested `model` and `n` choices. Text is deterministic: the behaviour's
  `text` (default `DEFAULT_TEXT`), split into `chunks` pieces (default: one per word).
  Usage: prompt_tokens = words in the prompt (at least 1), completion_tokens = pieces of text.
  With `require_key`, a request without `Authorization: Bearer <key>` gets OpenAI's 401.

Scripting. Each API request takes the first queued `Behaviour` that matches it (a behaviour with
`model` set only matches requests for that model); `times` says for how many requests it stays
(-1: forever). An empty queue answers `ok`. Kinds:
- `ok`: a normal answer; `text`, `chunks`, `chunk_delay_s` (between stream chunks), `delay_s`
  (before the headers), `usage=False` (omit usage, to test estimates), `tool_calls`,
  `pause_after=N` (stream: after N events, wait until `release()`; proves incremental relay),
  `interleave_tools=True` (stream: the tool calls' arguments in turns, `text` in between);
- `status`: HTTP `status` with `body` (default: OpenAI's error JSON for that status) and
  `headers`; `Behaviour.rate_limited(retry_after)` is a 429 with that `Retry-After` value, given
  verbatim (seconds, HTTP-date, absurd or garbage);
- `hang`: never answers (until the client goes away or the server stops);
- `reset_before`: TCP reset (RST) before any byte of the answer;
- `reset_after_first`: stream: the first event, then a TCP reset;
- `hang_after_first`: stream: the first event, then silence;
- `not_json`: 200, `content-type: text/html`, an HTML body.

Control endpoints (for subprocess use; JSON): `POST /_fake/script` (`{"behaviours": [...]}` or
a list, appended to the queue), `GET /_fake/requests` (a list of `{"method", "path", "headers",
"json", "peer"}`: `peer` is the client's host:port, equal across requests on a kept-alive
connection), `POST /_fake/reset` (queue, records and counters cleared), `POST /_fake/release`,
`GET /_fake/stats` (`{"requests", "disconnects", "queued"}`). `disconnects` counts answers the
client abandoned before they finished (a closed stream, a timed-out hang).

Sibling fakes (Anthropic, Cloudflare) should keep this shape: a frozen `Behaviour` with
constructors, a queue with `script()`, `RecordedRequest`s, the same control endpoints, port 0,
the `NAME_URL=` line for subprocess use, and `_tcp_reset` for resets.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import math
import signal
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import orjson
from aiohttp import web

from tests.kit.fake_process import FakeServerProcess
from tests.kit.wait import wait_for

DEFAULT_TEXT = "Hello from the fake OpenAI server."
DEFAULT_MODELS = ("fake-model",)
EMBEDDING_DIMS = 8
CREATED = 1_700_000_000  # a fixed `created`: answers are deterministic
KINDS = (
    "ok",
    "status",
    "hang",
    "reset_before",
    "reset_after_first",
    "hang_after_first",
    "not_json",
)
_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    422: ("invalid_request_error", None),
    429: ("requests", "rate_limit_exceeded"),
}


@dataclass(frozen=True)
class Behaviour:
    """How the fake answers one request (see the module docstring for the kinds)."""

    kind: str = "ok"
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    text: str | None = None
    chunks: int | None = None
    delay_s: float = 0.0
    chunk_delay_s: float = 0.0
    pause_after: int | None = None
    usage: bool = True
    finish_reason: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    interleave_tools: bool = False
    model: str | None = None
    times: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown behaviour kind {self.kind!r} (one of {', '.join(KINDS)})")

    # ---- constructors
    @classmethod
    def ok(cls, text: str | None = None, **kw: Any) -> Behaviour:
        return cls(kind="ok", text=text, **kw)

    @classmethod
    def error(cls, status: int, body: Any = None, **kw: Any) -> Behaviour:
        return cls(kind="status", status=status, body=body, **kw)

    @classmethod
    def rate_limited(cls, retry_after: str | None = "1", **kw: Any) -> Behaviour:
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        return cls(kind="status", status=429, headers=headers, **kw)

    @classmethod
    def hang(cls, **kw: Any) -> Behaviour:
        return cls(kind="hang", **kw)

    @classmethod
    def reset_before(cls, **kw: Any) -> Behaviour:
        return cls(kind="reset_before", **kw)

    @classmethod
    def reset_after_first(cls, **kw: Any) -> Behaviour:
        return cls(kind="reset_after_first", **kw)

    @classmethod
    def hang_after_first(cls, **kw: Any) -> Behaviour:
        return cls(kind="hang_after_first", **kw)

    @classmethod
    def not_json(cls, **kw: Any) -> Behaviour:
        return cls(kind="not_json", **kw)

    # ---- wire form (for /_fake/script)
    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Behaviour:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown behaviour fields: {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class RecordedRequest:
    """One API request the fake received."""

    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    json: Any  # the parsed body, None when absent or not JSON
    peer: str  # the client's host:port

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Reset(Exception):
    """The handler reset its own connection (scripted): stop without writing."""


@dataclass
class _Queued:
    behaviour: Behaviour
    left: int


class FakeOpenAI:
    """The fake server, in-process. `async with FakeOpenAI() as fake:` starts and stops it."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        require_key: str | None = None,
        models: Iterable[str] = DEFAULT_MODELS,
    ) -> None:
        self.host = host
        self.port = port
        self.require_key = require_key
        self.models = tuple(models)
        self.requests: list[RecordedRequest] = []
        self.request_count = 0
        self.disconnects = 0
        self._queue: list[_Queued] = []
        self._release = asyncio.Event()
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None

    # ---- lifecycle
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/_fake/script", self._ctl_script)
        app.router.add_get("/_fake/requests", self._ctl_requests)
        app.router.add_post("/_fake/reset", self._ctl_reset)
        app.router.add_post("/_fake/release", self._ctl_release)
        app.router.add_get("/_fake/stats", self._ctl_stats)
        # handler_cancellation: a client that goes away cancels its handler, which is how
        # `disconnects` sees abandoned streams and hangs
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        self._closing.set()
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeOpenAI:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- scripting
    def script(self, *behaviours: Behaviour) -> None:
        """Queue behaviours for the next requests (see the module docstring)."""
        for behaviour in behaviours:
            self._queue.append(_Queued(behaviour, behaviour.times))

    def reset(self) -> None:
        self.release()
        self._queue.clear()
        self.requests.clear()
        self.request_count = 0
        self.disconnects = 0

    def release(self) -> None:
        """Let the streams paused now (`pause_after`) go on; later pauses wait for the next
        release."""
        self._release.set()
        self._release = asyncio.Event()

    async def wait_until(
        self, predicate: Callable[[FakeOpenAI], bool], what: str = "the fake's state",
        timeout: float = 10.0,
    ) -> None:
        """Wait until `predicate(self)` holds (tests.kit.wait); AssertionError after `timeout`
        naming `what` and the fake's counters."""
        await wait_for(lambda: predicate(self),
                       lambda: f"{what} (requests {self.request_count}, "
                               f"disconnects {self.disconnects})", timeout)

    def _next(self, model: str | None) -> Behaviour:
        for i, queued in enumerate(self._queue):
            if queued.behaviour.model is None or queued.behaviour.model == model:
                if queued.left > 0:
                    queued.left -= 1
                    if queued.left == 0:
                        del self._queue[i]
                return queued.behaviour
        return Behaviour()

    # ---- API handlers
    async def _begin(self, request: web.Request) -> tuple[dict[str, Any], Behaviour]:
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        peername = request.transport.get_extra_info("peername") if request.transport else None
        self.request_count += 1
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                headers={k.lower(): v for k, v in request.headers.items()},
                json=body,
                peer=f"{peername[0]}:{peername[1]}" if peername else "",
            )
        )
        if self.require_key is not None and (
            request.headers.get("Authorization") != f"Bearer {self.require_key}"
        ):
            return {}, Behaviour.error(401)
        data = body if isinstance(body, dict) else {}
        model = data.get("model")
        return data, self._next(model if isinstance(model, str) else None)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "completion")

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "embedding")

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "responses")

    async def _models(self, request: web.Request) -> web.StreamResponse:
        data = [
            {"id": m, "object": "model", "created": CREATED, "owned_by": "fake"}
            for m in self.models
        ]
        return _json({"object": "list", "data": data})

    async def _serve(self, request: web.Request, kind: str) -> web.StreamResponse:
        body, behaviour = await self._begin(request)
        finished = False
        try:
            if behaviour.delay_s:
                await asyncio.sleep(behaviour.delay_s)
            response = await self._answer(request, kind, body, behaviour)
            finished = True
            return response
        except _Reset:
            # we reset the connection ourselves: nothing can be written any more
            return web.Response(status=499)
        except asyncio.CancelledError:
            self.disconnects += 1
            raise
        except ConnectionResetError:  # a write found the client gone
            if not finished:
                self.disconnects += 1
            return web.Response(status=499)

    async def _answer(
        self, request: web.Request, kind: str, body: dict[str, Any], behaviour: Behaviour
    ) -> web.StreamResponse:
        if behaviour.kind == "status":
            return _error_response(behaviour)
        if behaviour.kind == "hang":
            await self._closing.wait()
            _tcp_reset(request)
            raise _Reset
        if behaviour.kind == "reset_before":
            _tcp_reset(request)
            raise _Reset
        if behaviour.kind == "not_json":
            return web.Response(
                status=200,
                body=b"<html><body><h1>502 Bad Gateway</h1></body></html>",
                content_type="text/html",
            )
        model = body.get("model") or "fake-model"
        if kind == "embedding":
            return _json(_embeddings(body, model, behaviour))
        streaming = bool(body.get("stream"))
        if kind == "responses":
            pieces = _pieces(behaviour)
            answer = _responses_answer(body, model, pieces, self.request_count)
            if not streaming:
                return _json(answer)
            return await self._stream(request, _responses_events(answer, pieces), behaviour,
                                      done=False)
        if kind == "chat":
            pieces = _pieces(behaviour)
            usage = _usage(_prompt_words(body.get("messages")), len(pieces))
            if not streaming:
                return _json(_chat_answer(body, model, pieces, usage, behaviour, self.request_count))
            events = _chat_events(body, model, pieces, usage, behaviour, self.request_count)
        else:
            pieces = _pieces(behaviour)
            usage = _usage(_prompt_words(body.get("prompt")), len(pieces))
            if not streaming:
                return _json(_completion_answer(body, model, pieces, usage, behaviour, self.request_count))
            events = _completion_events(body, model, pieces, usage, behaviour, self.request_count)
        return await self._stream(request, events, behaviour)

    async def _stream(
        self, request: web.Request, events: list[bytes], behaviour: Behaviour,
        done: bool = True,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=200,
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
        )
        await response.prepare(request)
        for i, event in enumerate(events):
            if i and behaviour.chunk_delay_s:
                await asyncio.sleep(behaviour.chunk_delay_s)
            await response.write(event)
            sent = i + 1
            if sent == 1 and behaviour.kind == "reset_after_first":
                await asyncio.sleep(0.05)  # let the first event leave before the reset
                _tcp_reset(request)
                raise _Reset
            if sent == 1 and behaviour.kind == "hang_after_first":
                await self._closing.wait()
                _tcp_reset(request)
                raise _Reset
            if behaviour.pause_after is not None and sent == behaviour.pause_after:
                if not self._closing.is_set():
                    await self._release.wait()
        if done:  # chat and completions end with [DONE]; Responses streams do not
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    # ---- control endpoints
    async def _ctl_script(self, request: web.Request) -> web.StreamResponse:
        data = orjson.loads(await request.read())
        items = data["behaviours"] if isinstance(data, dict) else data
        try:
            self.script(*(Behaviour.from_json(item) for item in items))
        except (TypeError, ValueError) as exc:
            return _json({"error": str(exc)}, status=400)
        return _json({"queued": len(self._queue)})

    async def _ctl_requests(self, request: web.Request) -> web.StreamResponse:
        return _json([r.to_json() for r in self.requests])

    async def _ctl_reset(self, request: web.Request) -> web.StreamResponse:
        self.reset()
        return _json({"ok": True})

    async def _ctl_release(self, request: web.Request) -> web.StreamResponse:
        self.release()
        return _json({"ok": True})

    async def _ctl_stats(self, request: web.Request) -> web.StreamResponse:
        return _json(
            {
                "requests": self.request_count,
                "disconnects": self.disconnects,
                "queued": len(self._queue),
            }
        )


# --------------------------------------------------------------------------- answers
def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def _error_response(behaviour: Behaviour) -> web.Response:
    status = behaviour.status
    body = behaviour.body
    if body is None:
        err_type, code = _ERROR_TYPES.get(status, ("server_error", None))
        message = {
            401: "Incorrect API key provided: sk-fake***. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            429: "Rate limit reached for requests. Please try again later.",
        }.get(status, f"The fake server was scripted to answer {status}.")
        body = {"error": {"message": message, "type": err_type, "param": None, "code": code}}
    raw = body.encode() if isinstance(body, str) else orjson.dumps(body)
    content_type = "text/plain" if isinstance(body, str) else "application/json"
    return web.Response(
        status=status, body=raw, content_type=content_type, headers=behaviour.headers
    )


def _pieces(behaviour: Behaviour) -> list[str]:
    text = DEFAULT_TEXT if behaviour.text is None else behaviour.text
    if behaviour.chunks is None:
        words = text.split(" ")
        return [w if i == len(words) - 1 else w + " " for i, w in enumerate(words)]
    n = max(1, behaviour.chunks)
    size = math.ceil(len(text) / n) if text else 0
    return [text[i * size : (i + 1) * size] for i in range(n)]


def _prompt_words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        total = 0
        for item in value:
            if isinstance(item, dict):
                total += _prompt_words(item.get("content"))
                if item.get("type") == "text":
                    total += _prompt_words(item.get("text"))
            elif isinstance(item, int):
                total += 1
            else:
                total += _prompt_words(item)
        return total
    return 0


def _usage(prompt_words: int, pieces: int) -> dict[str, int]:
    prompt = max(1, prompt_words)
    return {"prompt_tokens": prompt, "completion_tokens": pieces, "total_tokens": prompt + pieces}


def _choices(body: dict[str, Any]) -> int:
    n = body.get("n")
    return n if isinstance(n, int) and 1 <= n <= 128 else 1


def _finish(behaviour: Behaviour) -> str:
    if behaviour.finish_reason is not None:
        return behaviour.finish_reason
    return "tool_calls" if behaviour.tool_calls else "stop"


def _chat_answer(
    body: dict[str, Any],
    model: str,
    pieces: list[str],
    usage: dict[str, int],
    behaviour: Behaviour,
    n: int,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": "".join(pieces), "refusal": None}
    if behaviour.tool_calls:
        message["content"] = None
        message["tool_calls"] = behaviour.tool_calls
    answer: dict[str, Any] = {
        "id": f"chatcmpl-fake{n}",
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "system_fingerprint": "fp_fake",
        "choices": [
            {"index": i, "message": message, "logprobs": None, "finish_reason": _finish(behaviour)}
            for i in range(_choices(body))
        ],
    }
    if behaviour.usage:
        answer["usage"] = usage
    return answer


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def _chat_events(
    body: dict[str, Any],
    model: str,
    pieces: list[str],
    usage: dict[str, int],
    behaviour: Behaviour,
    n: int,
) -> list[bytes]:
    with_usage = _include_usage(body) and behaviour.usage
    head = {
        "id": f"chatcmpl-fake{n}",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "system_fingerprint": "fp_fake",
    }
    choices = range(_choices(body))

    def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
        data: dict[str, Any] = {
            **head,
            "choices": [
                {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
                for i in choices
            ],
        }
        if with_usage:
            data["usage"] = None
        return _sse(data)

    events = [chunk({"role": "assistant", "content": "", "refusal": None}, None)]
    if behaviour.tool_calls and behaviour.interleave_tools:
        # As some servers stream parallel calls: every call opened, then the arguments of
        # all of them in turns, with the text in between.
        calls = behaviour.tool_calls
        for i, call in enumerate(calls):
            head_call = {**call, "function": {**call["function"], "arguments": ""}}
            events.append(chunk({"tool_calls": [{"index": i, **head_call}]}, None))
        halves = [(c["function"]["arguments"][: len(c["function"]["arguments"]) // 2],
                   c["function"]["arguments"][len(c["function"]["arguments"]) // 2:])
                  for c in calls]
        for part in (0, 1):
            for i, pair in enumerate(halves):
                events.append(chunk({"tool_calls": [
                    {"index": i, "function": {"arguments": pair[part]}}]}, None))
            if part == 0 and behaviour.text:
                events.append(chunk({"content": behaviour.text}, None))
    elif behaviour.tool_calls:
        calls = [{"index": i, **call} for i, call in enumerate(behaviour.tool_calls)]
        events.append(chunk({"tool_calls": calls}, None))
    else:
        events.extend(chunk({"content": piece}, None) for piece in pieces)
    events.append(chunk({}, _finish(behaviour)))
    if with_usage:
        events.append(_sse({**head, "choices": [], "usage": usage}))
    return events


def _responses_answer(
    body: dict[str, Any], model: str, pieces: list[str], n: int
) -> dict[str, Any]:
    """A native Responses answer: a reasoning item (with encrypted content when the request
    includes it), then the message; usage counts input items and pieces."""
    include = body.get("include") or []
    reasoning: dict[str, Any] = {"id": f"rs_fake{n}", "type": "reasoning", "summary": []}
    if "reasoning.encrypted_content" in include:
        reasoning["encrypted_content"] = f"gAAAAfake{n}"
    text = "".join(pieces)
    items = body.get("input")
    prompt = len(items) if isinstance(items, list) else _prompt_words(items)
    return {
        "id": f"resp_fake{n}", "object": "response", "created_at": CREATED,
        "status": "completed", "completed_at": CREATED, "error": None,
        "incomplete_details": None, "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"), "model": model,
        "output": [reasoning, {
            "id": f"msg_fake{n}", "type": "message", "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [],
                         "logprobs": []}]}],
        "parallel_tool_calls": True, "previous_response_id": None, "reasoning": None,
        "store": bool(body.get("store", True)), "temperature": 1.0,
        "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
        "top_p": 1.0, "truncation": "disabled", "metadata": {},
        "usage": {"input_tokens": max(1, prompt),
                  "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                  "output_tokens": len(pieces),
                  "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": max(1, prompt) + len(pieces)},
    }


def _responses_events(answer: dict[str, Any], pieces: list[str]) -> list[bytes]:
    """The native event sequence OpenAI streams for `answer`."""
    seq = iter(range(1_000_000))
    shell = {**answer, "status": "in_progress", "output": [], "usage": None,
             "completed_at": None}
    shell.pop("usage")
    reasoning, message = answer["output"]

    def ev(kind: str, **data: Any) -> bytes:
        payload = {"type": kind, "sequence_number": next(seq), **data}
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"

    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    out = [ev("response.created", response=shell), ev("response.in_progress", response=shell),
           ev("response.output_item.added", output_index=0, item=reasoning),
           ev("response.output_item.done", output_index=0, item=reasoning),
           ev("response.output_item.added", output_index=1,
              item={**message, "status": "in_progress", "content": []}),
           ev("response.content_part.added", item_id=message["id"], output_index=1,
              content_index=0, part=part)]
    out += [ev("response.output_text.delta", item_id=message["id"], output_index=1,
               content_index=0, delta=piece, logprobs=[]) for piece in pieces]
    text = "".join(pieces)
    out += [ev("response.output_text.done", item_id=message["id"], output_index=1,
               content_index=0, text=text, logprobs=[]),
            ev("response.content_part.done", item_id=message["id"], output_index=1,
               content_index=0, part={**part, "text": text}),
            ev("response.output_item.done", output_index=1, item=message),
            ev("response.completed", response=answer)]
    return out


def _completion_answer(
    body: dict[str, Any],
    model: str,
    pieces: list[str],
    usage: dict[str, int],
    behaviour: Behaviour,
    n: int,
) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "id": f"cmpl-fake{n}",
        "object": "text_completion",
        "created": CREATED,
        "model": model,
        "system_fingerprint": "fp_fake",
        "choices": [
            {
                "text": "".join(pieces),
                "index": i,
                "logprobs": None,
                "finish_reason": _finish(behaviour),
            }
            for i in range(_choices(body))
        ],
    }
    if behaviour.usage:
        answer["usage"] = usage
    return answer


def _completion_events(
    body: dict[str, Any],
    model: str,
    pieces: list[str],
    usage: dict[str, int],
    behaviour: Behaviour,
    n: int,
) -> list[bytes]:
    with_usage = _include_usage(body) and behaviour.usage
    head = {
        "id": f"cmpl-fake{n}",
        "object": "text_completion",
        "created": CREATED,
        "model": model,
        "system_fingerprint": "fp_fake",
    }
    choices = range(_choices(body))

    def chunk(text: str, finish: str | None) -> bytes:
        data: dict[str, Any] = {
            **head,
            "choices": [
                {"text": text, "index": i, "logprobs": None, "finish_reason": finish}
                for i in choices
            ],
        }
        if with_usage:
            data["usage"] = None
        return _sse(data)

    events = [chunk(piece, None) for piece in pieces]
    events.append(chunk("", _finish(behaviour)))
    if with_usage:
        events.append(_sse({**head, "choices": [], "usage": usage}))
    return events


def embedding_vector(item: Any, dims: int = EMBEDDING_DIMS) -> list[float]:
    """The fake's deterministic unit vector for one input (a string or a token list)."""
    seed = hashlib.sha256(orjson.dumps(item)).digest()
    raw: list[float] = []
    counter = 0
    while len(raw) < dims:
        block = hashlib.sha256(seed + counter.to_bytes(4, "little")).digest()
        raw.extend((b - 127.5) / 127.5 for b in block)
        counter += 1
    vec = raw[:dims]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    # rounded through float32 so the base64 and float forms are the same numbers
    return list(struct.unpack(f"<{dims}f", struct.pack(f"<{dims}f", *(v / norm for v in vec))))


def _embeddings(body: dict[str, Any], model: str, behaviour: Behaviour) -> dict[str, Any]:
    value = body.get("input")
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        items: list[Any] = [value]  # one pre-tokenized input
    elif isinstance(value, list):
        items = value
    else:
        items = [value]
    dims = body.get("dimensions")
    dims = dims if isinstance(dims, int) and 0 < dims <= 4096 else EMBEDDING_DIMS
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for i, item in enumerate(items):
        vec = embedding_vector(item, dims)
        embedding: Any = (
            base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if as_base64 else vec
        )
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    prompt = max(1, _prompt_words(items))
    answer: dict[str, Any] = {"object": "list", "data": data, "model": model}
    if behaviour.usage:
        answer["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt}
    return answer


def _tcp_reset(request: web.Request) -> None:
    """Close the client's connection with a TCP RST (SO_LINGER 0), not a clean FIN."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


# --------------------------------------------------------------------------- subprocess use
class FakeOpenAIProcess(FakeServerProcess):
    """The fake in its own process (`python -m tests.kit.fake_openai --port 0`), driven over its
    control endpoints with plain blocking HTTP. `with FakeOpenAIProcess() as fake:`; start, stop
    and the control calls are `FakeServerProcess`'s."""

    def __init__(
        self,
        *,
        require_key: str | None = None,
        models: Iterable[str] = DEFAULT_MODELS,
        startup_timeout: float = 30.0,
    ) -> None:
        args = ["--models", ",".join(models)]
        if require_key is not None:
            args += ["--require-key", require_key]
        super().__init__("tests.kit.fake_openai", *args, startup_timeout=startup_timeout)

    @property
    def base_url(self) -> str:
        return self.url

    def script(self, *behaviours: Behaviour) -> None:  # type: ignore[override]
        self._call("POST", "/_fake/script", {"behaviours": [b.to_json() for b in behaviours]})

    def requests(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/_fake/requests")
        return result

    def reset(self) -> None:
        self._call("POST", "/_fake/reset", {})

    def release(self) -> None:
        self._call("POST", "/_fake/release", {})

    def stats(self) -> dict[str, int]:
        result: dict[str, int] = self._call("GET", "/_fake/stats")
        return result


async def _serve_forever(args: argparse.Namespace) -> None:
    fake = FakeOpenAI(args.host, args.port, require_key=args.require_key, models=args.models.split(","))
    await fake.start()
    print(f"FAKE_OPENAI_URL={fake.base_url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await fake.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A scriptable fake OpenAI server (loopback).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--require-key", default=None)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    args = parser.parse_args(argv)
    try:
        import uvloop  # the bench wants the fake as fast as it can be
    except ImportError:
        asyncio.run(_serve_forever(args))
    else:
        uvloop.run(_serve_forever(args))


if __name__ == "__main__":
    main()
