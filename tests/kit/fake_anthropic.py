"""A fake Anthropic Messages API server on loopback, for tests and benchmarks.

It speaks Anthropic's public wire: `POST /v1/messages` with `x-api-key` and `anthropic-version`
headers; JSON answers `{"id": "msg_...", "type": "message", ...}`; SSE streams with `event:` and
`data:` lines (`message_start`, `content_block_start`, `ping`, `content_block_delta`,
`content_block_stop`, `message_delta`, `message_stop`); error envelopes
`{"type": "error", "error": {"type", "message"}}` with the documented statuses (400, 401, 429
with `retry-after`, 529 `overloaded_error`) and `request-id` headers.

It checks what it receives the way the real API does (path, headers, body shape: required
`max_tokens`, alternating roles, no `system` role inside `messages`, valid content blocks, tool
results answering a tool use). A violation is answered with a 400 `invalid_request_error` and
also recorded in `violations`, so a test can assert the adapter sent a valid request.

Scripting: `script(Reply(...), Fail(529), ...)` queues one behaviour per request; when the queue
is empty every request gets `default` (an echo of the last user text). A reply with `tool=` asks
for a tool call; `break_after=` cuts the connection after that many content deltas.

In-process: `async with FakeAnthropic() as fake: fake.url ...`.
Subprocess: `python -m tests.kit.fake_anthropic [--port N] [--api-key K]` prints
`FAKE_ANTHROPIC_URL=http://127.0.0.1:<port>` (the provider's base_url); `POST /_fake/script` (a
JSON list of `behaviour_to_json(...)`) and `GET /_fake/requests` drive it
(`tests.kit.fake_process.FakeServerProcess` does both).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from aiohttp import web

API_KEY = "sk-ant-test"


@dataclass(frozen=True)
class Reply:
    """A successful answer. `text` None means: echo the last user text."""

    text: str | None = None
    tool: str | None = None  # ask for a call of this tool (its input is `tool_input`)
    tool_input: dict[str, Any] = field(default_factory=lambda: {"city": "Paris"})
    stop_reason: str | None = None  # default: end_turn, or tool_use with a tool
    stop_sequence: str | None = None  # answer as if this stop sequence fired
    thinking: str | None = None  # lead with a thinking block (signed "sig-<n>")
    break_after: int | None = None  # streams: cut the connection after N content deltas
    error_event_after: int | None = None  # streams: send an `error` event after N deltas


@dataclass(frozen=True)
class Fail:
    """An HTTP error with Anthropic's envelope."""

    status: int
    error_type: str | None = None
    message: str = "scripted failure"
    retry_after: float | None = None


_ERROR_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
_BLOCK_TYPES_BY_ROLE = {
    "user": {"text", "image", "tool_result", "document"},
    "assistant": {"text", "tool_use", "thinking", "redacted_thinking"},
}


class RequestInvalid(Exception):
    pass


def check_messages_request(body: Any) -> None:
    """Raise RequestInvalid where the real Messages API would answer 400."""
    if not isinstance(body, dict):
        raise RequestInvalid("body: must be a JSON object")
    for key in ("model", "max_tokens", "messages"):
        if key not in body:
            raise RequestInvalid(f"{key}: Field required")
    if not isinstance(body["model"], str) or not body["model"]:
        raise RequestInvalid("model: must be a non-empty string")
    if not isinstance(body["max_tokens"], int) or body["max_tokens"] < 1:
        raise RequestInvalid("max_tokens: must be an integer >= 1")
    allowed = {
        "model", "max_tokens", "messages", "system", "stop_sequences", "temperature", "top_p",
        "top_k", "stream", "tools", "tool_choice", "metadata", "thinking", "service_tier",
        "output_config",
    }
    extra = set(body) - allowed
    if extra:
        raise RequestInvalid(f"{sorted(extra)[0]}: Extra inputs are not permitted")
    output_config = body.get("output_config")
    if output_config is not None:
        fmt = output_config.get("format") if isinstance(output_config, dict) else None
        if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "json_schema"
                                or not isinstance(fmt.get("schema"), dict)):
            raise RequestInvalid("output_config.format: invalid")
    temperature = body.get("temperature")
    if temperature is not None and not 0 <= temperature <= 1:
        raise RequestInvalid("temperature: must be between 0 and 1")
    system = body.get("system")
    if system is not None and not isinstance(system, (str, list)):
        raise RequestInvalid("system: must be a string or a list of text blocks")
    stops = body.get("stop_sequences")
    if stops is not None and not (
        isinstance(stops, list) and all(isinstance(s, str) for s in stops)
    ):
        raise RequestInvalid("stop_sequences: must be a list of strings")
    tool_names = set()
    for i, tool in enumerate(body.get("tools") or ()):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise RequestInvalid(f"tools.{i}.name: Field required")
        if not isinstance(tool.get("input_schema"), dict):
            raise RequestInvalid(f"tools.{i}.input_schema: Field required")
        tool_names.add(tool["name"])
    choice = body.get("tool_choice")
    if choice is not None and (
        not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none")
    ):
        raise RequestInvalid("tool_choice: invalid")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise RequestInvalid("messages: at least one message is required")
    previous_role = None
    pending_tool_uses: set[str] = set()
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise RequestInvalid(
                f"messages.{i}.role: Input should be 'user' or 'assistant'"
            )
        if role == previous_role:
            raise RequestInvalid(
                f"messages.{i}: roles must alternate between 'user' and 'assistant'"
            )
        previous_role = role
        content = message.get("content")
        if isinstance(content, str):
            blocks: list[Any] = [{"type": "text", "text": content}]
        elif isinstance(content, list) and content:
            blocks = content
        else:
            raise RequestInvalid(f"messages.{i}.content: must be a string or non-empty list")
        seen_other = False
        answered = set()
        for j, block in enumerate(blocks):
            btype = block.get("type") if isinstance(block, dict) else None
            if btype not in _BLOCK_TYPES_BY_ROLE[role]:
                raise RequestInvalid(f"messages.{i}.content.{j}.type: invalid for {role}")
            if btype == "text" and not isinstance(block.get("text"), str):
                raise RequestInvalid(f"messages.{i}.content.{j}.text: Field required")
            if btype == "image":
                source = block.get("source") or {}
                if source.get("type") == "base64":
                    if not (source.get("media_type") and source.get("data")):
                        raise RequestInvalid(f"messages.{i}.content.{j}.source: incomplete")
                elif source.get("type") != "url" or not source.get("url"):
                    raise RequestInvalid(f"messages.{i}.content.{j}.source: invalid")
            if btype == "tool_use":
                if not (block.get("id") and block.get("name")) or not isinstance(
                    block.get("input"), dict
                ):
                    raise RequestInvalid(f"messages.{i}.content.{j}: tool_use incomplete")
                pending_tool_uses.add(block["id"])
            if btype == "tool_result":
                if seen_other:
                    raise RequestInvalid(
                        f"messages.{i}.content.{j}: tool_result blocks must come first"
                    )
                if block.get("tool_use_id") not in pending_tool_uses:
                    raise RequestInvalid(
                        f"messages.{i}.content.{j}: unexpected tool_use_id "
                        f"{block.get('tool_use_id')!r}"
                    )
                answered.add(block["tool_use_id"])
            elif role == "user":
                seen_other = True
        if role == "user":
            pending_tool_uses -= answered


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or ()):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        texts = []
        for block in content:
            if block.get("type") == "text":
                texts.append(block["text"])
            elif block.get("type") == "tool_result":
                result = block.get("content")
                texts.append(result if isinstance(result, str) else orjson.dumps(result).decode())
        return " ".join(texts)
    return ""


def _pieces(text: str) -> list[str]:
    """Split text into stream deltas at word boundaries, spaces kept (so joined == text)."""
    pieces: list[str] = []
    current = ""
    for ch in text:
        current += ch
        if ch == " ":
            pieces.append(current)
            current = ""
    if current:
        pieces.append(current)
    return pieces


class FakeAnthropic:
    """The fake server. `requests` holds every body received on /v1/messages (parsed),
    `headers` the matching headers, `violations` every request it refused as invalid."""

    def __init__(self, api_key: str = API_KEY, host: str = "127.0.0.1", port: int = 0) -> None:
        self.api_key = api_key
        self.host = host
        self.port = port
        self.default: Reply | Fail = Reply()
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.violations: list[str] = []
        self._queue: list[Reply | Fail] = []
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None

    # ----------------------------------------------------------------- control
    def script(self, *behaviours: Reply | Fail) -> None:
        self._queue.extend(behaviours)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/_fake/script", self._control_script)
        app.router.add_get("/_fake/requests", self._control_requests)
        return app

    async def start(self) -> FakeAnthropic:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # noqa: S101 - started above
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeAnthropic:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _control_script(self, request: web.Request) -> web.Response:
        for item in orjson.loads(await request.read()):
            kind = item.pop("kind", "reply")
            self._queue.append(Fail(**item) if kind == "fail" else Reply(**item))
        return web.json_response({"queued": len(self._queue)})

    async def _control_requests(self, request: web.Request) -> web.Response:
        return web.Response(
            body=orjson.dumps({"requests": self.requests, "violations": self.violations,
                               "headers": self.headers}),
            content_type="application/json",
        )

    # ----------------------------------------------------------------- the API
    def _error(
        self, status: int, error_type: str, message: str, retry_after: float | None = None
    ) -> web.Response:
        headers = {"request-id": f"req_{next(self._ids):06d}"}
        if retry_after is not None:
            headers["retry-after"] = str(retry_after)
        body = {"type": "error", "error": {"type": error_type, "message": message}}
        return web.Response(
            status=status, body=orjson.dumps(body), content_type="application/json",
            headers=headers,
        )

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("x-api-key") != self.api_key:
            self.violations.append("x-api-key: missing or wrong")
            return self._error(401, "authentication_error", "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            self.violations.append("anthropic-version: header required")
            return self._error(400, "invalid_request_error", "anthropic-version: header required")
        if not request.content_type == "application/json":
            self.violations.append(f"content-type: {request.content_type}")
            return self._error(400, "invalid_request_error", "content-type must be JSON")
        try:
            body = orjson.loads(await request.read())
            check_messages_request(body)
        except (orjson.JSONDecodeError, RequestInvalid) as exc:
            self.violations.append(str(exc))
            return self._error(400, "invalid_request_error", str(exc))
        self.requests.append(body)
        self.headers.append({str(k): v for k, v in request.headers.items()})
        behaviour = self._queue.pop(0) if self._queue else self.default
        if isinstance(behaviour, Fail):
            error_type = behaviour.error_type or _ERROR_TYPE_BY_STATUS.get(
                behaviour.status, "api_error"
            )
            return self._error(
                behaviour.status, error_type, behaviour.message, behaviour.retry_after
            )
        if body.get("stream"):
            return await self._stream(request, body, behaviour)
        return web.Response(
            body=orjson.dumps(self._answer(body, behaviour)), content_type="application/json",
            headers={"request-id": f"req_{next(self._ids):06d}"},
        )

    def _text(self, body: dict[str, Any], reply: Reply) -> str:
        if reply.text is not None:
            return reply.text
        return f"echo: {_last_user_text(body)}"

    def _answer(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        text = self._text(body, reply)
        content: list[dict[str, Any]] = []
        if reply.thinking is not None:
            content.append({"type": "thinking", "thinking": reply.thinking,
                            "signature": f"sig-{next(self._ids)}"})
        if text:
            content.append({"type": "text", "text": text})
        if reply.tool:
            content.append(
                {"type": "tool_use", "id": f"toolu_{next(self._ids):04d}", "name": reply.tool,
                 "input": reply.tool_input}
            )
        return {
            "id": f"msg_{next(self._ids):06d}",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": content,
            "stop_reason": reply.stop_reason or (
                "stop_sequence" if reply.stop_sequence else
                "tool_use" if reply.tool else "end_turn"),
            "stop_sequence": reply.stop_sequence,
            "usage": {
                "input_tokens": len(orjson.dumps(body["messages"])) // 4,
                "output_tokens": len(_pieces(text)) + (5 if reply.tool else 0),
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }

    async def _stream(
        self, request: web.Request, body: dict[str, Any], reply: Reply
    ) -> web.StreamResponse:
        answer = self._answer(body, reply)
        response = web.StreamResponse(
            headers={
                "content-type": "text/event-stream; charset=utf-8",
                "cache-control": "no-cache",
                "request-id": f"req_{next(self._ids):06d}",
            }
        )
        await response.prepare(request)

        async def send(event: str, data: dict[str, Any]) -> None:
            await response.write(
                b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
            )

        message = {**answer, "content": [], "stop_reason": None,
                   "usage": {**answer["usage"], "output_tokens": 1}}
        await send("message_start", {"type": "message_start", "message": message})
        deltas = 0

        async def maybe_cut() -> bool:
            if reply.break_after is not None and deltas >= reply.break_after:
                # Abort the connection without the chunked terminator: a real broken stream.
                assert request.transport is not None  # noqa: S101
                request.transport.abort()
                return True
            if reply.error_event_after is not None and deltas >= reply.error_event_after:
                await send("error", {"type": "error", "error": {
                    "type": "overloaded_error", "message": "Overloaded"}})
                await response.write_eof()
                return True
            return False

        if await maybe_cut():
            return response
        for index, block in enumerate(answer["content"]):
            if block["type"] == "thinking":
                await send("content_block_start", {
                    "type": "content_block_start", "index": index,
                    "content_block": {"type": "thinking", "thinking": "", "signature": ""}})
                for piece in _pieces(block["thinking"]):
                    await send("content_block_delta", {
                        "type": "content_block_delta", "index": index,
                        "delta": {"type": "thinking_delta", "thinking": piece}})
                await send("content_block_delta", {
                    "type": "content_block_delta", "index": index,
                    "delta": {"type": "signature_delta", "signature": block["signature"]}})
            elif block["type"] == "text":
                await send("content_block_start", {"type": "content_block_start", "index": index,
                                                   "content_block": {"type": "text", "text": ""}})
                if index == 0:
                    await send("ping", {"type": "ping"})
                for piece in _pieces(block["text"]):
                    await send("content_block_delta", {
                        "type": "content_block_delta", "index": index,
                        "delta": {"type": "text_delta", "text": piece}})
                    deltas += 1
                    if await maybe_cut():
                        return response
            else:
                await send("content_block_start", {
                    "type": "content_block_start", "index": index,
                    "content_block": {"type": "tool_use", "id": block["id"],
                                      "name": block["name"], "input": {}}})
                raw = orjson.dumps(block["input"]).decode()
                half = len(raw) // 2
                for piece in (raw[:half], raw[half:]):
                    await send("content_block_delta", {
                        "type": "content_block_delta", "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": piece}})
                    deltas += 1
                    if await maybe_cut():
                        return response
            await send("content_block_stop", {"type": "content_block_stop", "index": index})
        await send("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": answer["stop_reason"],
                      "stop_sequence": answer["stop_sequence"]},
            "usage": {"output_tokens": answer["usage"]["output_tokens"]}})
        await send("message_stop", {"type": "message_stop"})
        await response.write_eof()
        return response


def behaviour_to_json(behaviour: Reply | Fail) -> dict[str, Any]:
    """The control-endpoint form of a behaviour (for subprocess mode)."""
    return {"kind": "fail" if isinstance(behaviour, Fail) else "reply", **asdict(behaviour)}


async def _serve(port: int, api_key: str) -> None:
    fake = await FakeAnthropic(api_key=api_key, port=port).start()
    print(f"FAKE_ANTHROPIC_URL={fake.url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await fake.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default=API_KEY)
    args = parser.parse_args()
    try:
        asyncio.run(_serve(args.port, args.api_key))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
