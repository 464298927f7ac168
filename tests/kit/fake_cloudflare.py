"""A fake Cloudflare Workers AI REST API on loopback, for tests and benchmarks.

It speaks the public wire of `POST /client/v4/accounts/{account_id}/ai/run/{model}` with
`Authorization: Bearer <token>`:
- text models (`@cf/meta/...`): `{"messages": [...]}` or `{"prompt": "..."}`; the answer is the
  envelope `{"result": {"response": "..."}, "success": true, "errors": [], "messages": []}`
  (with `result.usage` only when `include_usage` is on: many models send none); with
  `"stream": true` an SSE stream of `data: {"response": "...", "p": "..."}` events, then
  `data: [DONE]`; a `Reply(tool=...)` answers with a tool call, in `result.tool_calls` or, in a
  stream, in `tool_calls` entries of the events (see `Reply.tool_style` for the two shapes);
- embedding models (`@cf/baai/bge-*`): `{"text": str | [str]}` -> `result: {"shape", "data",
  "pooling"}`;
- image models (`@cf/stabilityai/...`, `@cf/bytedance/...`, `@cf/lykon/...`): `{"prompt", ...}`
  -> raw PNG bytes with `content-type: image/png`;
- errors: the envelope with `success: false` and `errors: [{"code", "message"}]`, with the
  documented statuses (400 bad input code 5006, 401 code 10000, 429 code 3040 with
  `retry-after`, 500 code 3043).

It checks the path, the account id, the bearer token and the body shape for the model's kind;
a violation gets Cloudflare's 400 envelope and is recorded in `violations`.

Scripting, in-process and subprocess modes work like `tests/kit/fake_anthropic.py`; the
subprocess prints `FAKE_CLOUDFLARE_URL=http://127.0.0.1:<port>/client/v4` (the base_url).
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from aiohttp import web

ACCOUNT_ID = "acct-test"
API_TOKEN = "cf-token-test"


@dataclass(frozen=True)
class Reply:
    text: str | None = None  # None: echo the last user text (no text when `tool` is set)
    break_after: int | None = None  # streams: cut the connection after N events
    tool: str | None = None  # answer with a call of this tool, its input `tool_input`
    tool_input: dict[str, Any] = field(default_factory=lambda: {"city": "Paris"})
    # "openai": newer models (llama-3.3/4, qwen, gpt-oss): `{"id", "type", "function":
    # {"name", "arguments": "<json>"}}`, streamed as a start, argument pieces, then a null
    # finalization entry; "flat": older ones (hermes-2-pro, llama-3.1): `{"name", "arguments":
    # {...}}`, whole in one event.
    tool_style: str = "openai"
    # answer in OpenAI's chat shape (`choices[0].message`, streamed `choices[0].delta`), as
    # some Workers AI models (gpt-oss, kimi) do even on /ai/run
    openai_shape: bool = False


@dataclass(frozen=True)
class Fail:
    status: int
    code: int | None = None
    message: str = "scripted failure"
    retry_after: float | None = None


_CODE_BY_STATUS = {400: 5006, 401: 10000, 403: 10000, 404: 7003, 429: 3040, 500: 3043}


def tiny_png(width: int = 2, height: int = 2) -> bytes:
    """A valid PNG (red pixels), built by hand so the fake needs no imaging library."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(
            ">I", zlib.crc32(tag + data) & 0xFFFFFFFF
        )

    raw = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def model_kind(model: str) -> str:
    if model.startswith("@cf/baai/bge"):
        return "embedding"
    if model.startswith(("@cf/stabilityai/", "@cf/bytedance/", "@cf/lykon/", "@cf/runwayml/")):
        return "image"
    return "text"


class RequestInvalid(Exception):
    pass


def check_run_request(kind: str, body: Any) -> None:
    if not isinstance(body, dict):
        raise RequestInvalid("Type mismatch of '/', 'object' not in 'string'")
    if kind == "embedding":
        text = body.get("text")
        if not (isinstance(text, str) or (
            isinstance(text, list) and text and all(isinstance(t, str) for t in text)
        )):
            raise RequestInvalid("required properties at '/' are 'text'")
        return
    if kind == "image":
        if not isinstance(body.get("prompt"), str) or not body["prompt"]:
            raise RequestInvalid("required properties at '/' are 'prompt'")
        return
    if "messages" in body:
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise RequestInvalid("Type mismatch of '/messages'")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise RequestInvalid(f"required properties at '/messages/{i}' are 'role'")
            if not isinstance(message.get("content"), str):
                # Workers AI text models take string content only.
                raise RequestInvalid(
                    f"Type mismatch of '/messages/{i}/content', 'array' not in 'string'"
                )
    elif not isinstance(body.get("prompt"), str):
        raise RequestInvalid("required properties at '/' are 'prompt' or 'messages'")
    for i, tool in enumerate(body.get("tools") or ()):
        function = tool.get("function") if isinstance(tool, dict) else None
        named = isinstance(tool, dict) and isinstance(tool.get("name"), str) or (
            isinstance(function, dict) and isinstance(function.get("name"), str))
        if not named:
            raise RequestInvalid(f"required properties at '/tools/{i}' are 'name'")
    allowed = {
        "messages", "prompt", "stream", "max_tokens", "temperature", "top_p", "top_k", "seed",
        "repetition_penalty", "frequency_penalty", "presence_penalty", "raw", "lora", "tools",
        "response_format",
    }
    extra = set(body) - allowed
    if extra:
        raise RequestInvalid(f"additional property {sorted(extra)[0]!r} not allowed")


def _pieces(text: str) -> list[str]:
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


class FakeCloudflare:
    """The fake server. `requests` holds (model, body) for each accepted call."""

    def __init__(
        self,
        account_id: str = ACCOUNT_ID,
        api_token: str = API_TOKEN,
        host: str = "127.0.0.1",
        port: int = 0,
        include_usage: bool = False,
    ) -> None:
        self.account_id = account_id
        self.api_token = api_token
        self.host = host
        self.port = port
        self.include_usage = include_usage
        self.default: Reply | Fail = Reply()
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.violations: list[str] = []
        self._queue: list[Reply | Fail] = []
        self._runner: web.AppRunner | None = None

    def script(self, *behaviours: Reply | Fail) -> None:
        self._queue.extend(behaviours)

    @property
    def url(self) -> str:
        """The server root; the provider's base_url is `url + "/client/v4"`."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/client/v4"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/client/v4/accounts/{account}/ai/run/{model:.+}", self._run)
        app.router.add_post("/_fake/script", self._control_script)
        app.router.add_get("/_fake/requests", self._control_requests)
        return app

    async def start(self) -> FakeCloudflare:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # noqa: S101
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeCloudflare:
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
            body=orjson.dumps({
                "requests": [{"model": m, "body": b} for m, b in self.requests],
                "violations": self.violations,
            }),
            content_type="application/json",
        )

    # ----------------------------------------------------------------- the API
    @staticmethod
    def _envelope_error(
        status: int, code: int, message: str, retry_after: float | None = None
    ) -> web.Response:
        headers = {"retry-after": str(retry_after)} if retry_after is not None else None
        body = {"result": None, "success": False,
                "errors": [{"code": code, "message": message}], "messages": []}
        return web.Response(status=status, body=orjson.dumps(body),
                            content_type="application/json", headers=headers)

    @staticmethod
    def _ok(result: Any) -> web.Response:
        body = {"result": result, "success": True, "errors": [], "messages": []}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def _run(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("authorization") != f"Bearer {self.api_token}":
            self.violations.append("authorization: missing or wrong bearer token")
            return self._envelope_error(401, 10000, "Authentication error")
        if request.match_info["account"] != self.account_id:
            self.violations.append(f"account: {request.match_info['account']}")
            return self._envelope_error(403, 10000, "Authentication error")
        model = request.match_info["model"]
        if not model.startswith("@"):
            self.violations.append(f"model: {model}")
            return self._envelope_error(400, 5007, f"No such model {model} or task")
        kind = model_kind(model)
        try:
            body = orjson.loads(await request.read())
            check_run_request(kind, body)
        except (orjson.JSONDecodeError, RequestInvalid) as exc:
            self.violations.append(str(exc))
            return self._envelope_error(400, 5006, f"AiError: Bad input: {exc}")
        self.requests.append((model, body))
        behaviour = self._queue.pop(0) if self._queue else self.default
        if isinstance(behaviour, Fail):
            code = behaviour.code or _CODE_BY_STATUS.get(behaviour.status, 3043)
            return self._envelope_error(
                behaviour.status, code, behaviour.message, behaviour.retry_after
            )
        if kind == "embedding":
            texts = [body["text"]] if isinstance(body["text"], str) else body["text"]
            data = [[float(len(t) % 7), 0.5, -0.25, float(i)] for i, t in enumerate(texts)]
            return self._ok({"shape": [len(texts), 4], "data": data, "pooling": "mean"})
        if kind == "image":
            return web.Response(body=tiny_png(), content_type="image/png")
        text = behaviour.text
        if text is None and behaviour.tool is not None:
            text = ""
        if text is None:
            if "messages" in body:
                users = [m["content"] for m in body["messages"] if m["role"] == "user"]
                text = f"echo: {users[-1] if users else ''}"
            else:
                text = f"echo: {body['prompt']}"
        usage = {"prompt_tokens": len(orjson.dumps(body)) // 4,
                 "completion_tokens": len(_pieces(text))}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if body.get("stream"):
            return await self._stream(request, text, usage, behaviour)
        result: dict[str, Any] = {"response": (text or None) if behaviour.tool else text}
        if behaviour.tool is not None:
            result["tool_calls"] = [_tool_call(behaviour)]
        if behaviour.openai_shape:
            message = {"role": "assistant", "content": result.pop("response"),
                       **({"tool_calls": result.pop("tool_calls")} if behaviour.tool else {})}
            result = {"id": "chatcmpl-cf", "object": "chat.completion", "model": model,
                      "choices": [{"index": 0, "message": message,
                                   "finish_reason": "tool_calls" if behaviour.tool else "stop"}]}
        if self.include_usage:
            result["usage"] = usage
        return self._ok(result)

    async def _stream(
        self, request: web.Request, text: str, usage: dict[str, int], reply: Reply
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for n, piece in enumerate(_pieces(text)):
            if reply.break_after is not None and n >= reply.break_after:
                assert request.transport is not None  # noqa: S101
                request.transport.abort()
                return response
            event: dict[str, Any] = {"response": piece, "p": "abcdefgh"[: n % 8]}
            await response.write(b"data: " + orjson.dumps(_shaped(event, reply)) + b"\n\n")
        for event in _tool_events(reply):
            await response.write(b"data: " + orjson.dumps(_shaped(event, reply)) + b"\n\n")
        if self.include_usage:
            await response.write(
                b"data: " + orjson.dumps({"response": "", "usage": usage}) + b"\n\n"
            )
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _shaped(event: dict[str, Any], reply: Reply) -> dict[str, Any]:
    """A native stream event, or its OpenAI-shaped twin for `Reply(openai_shape=True)`."""
    if not reply.openai_shape:
        return event
    delta: dict[str, Any] = {"content": event["response"]} if event.get("response") else {}
    if "tool_calls" in event:
        delta["tool_calls"] = event["tool_calls"]
    return {"id": "chatcmpl-cf", "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}


def _tool_call(reply: Reply) -> dict[str, Any]:
    """The whole call, as a non-streamed `result.tool_calls` entry."""
    if reply.tool_style == "flat":
        return {"name": reply.tool, "arguments": reply.tool_input}
    return {"id": "chatcmpl-tool-0001", "type": "function",
            "function": {"name": reply.tool, "arguments": orjson.dumps(reply.tool_input).decode()}}


def _tool_events(reply: Reply) -> list[dict[str, Any]]:
    """The stream events that carry the call (after any text)."""
    if reply.tool is None:
        return []
    if reply.tool_style == "flat":
        return [{"response": "", "tool_calls": [_tool_call(reply)]}]
    raw = orjson.dumps(reply.tool_input).decode()
    half = len(raw) // 2
    return [
        {"response": "", "tool_calls": [{"id": "chatcmpl-tool-0001", "type": "function",
                                         "index": 0, "function": {"name": reply.tool}}]},
        {"response": "", "tool_calls": [{"index": 0, "function": {"arguments": raw[:half]}}]},
        {"response": "", "tool_calls": [{"index": 0, "function": {"arguments": raw[half:]}}]},
        {"response": "", "tool_calls": [{"id": None, "type": None, "index": 0,
                                         "function": {"name": None, "arguments": None}}]},
    ]


def behaviour_to_json(behaviour: Reply | Fail) -> dict[str, Any]:
    return {"kind": "fail" if isinstance(behaviour, Fail) else "reply", **asdict(behaviour)}


async def _serve(port: int, account_id: str, api_token: str, include_usage: bool) -> None:
    fake = await FakeCloudflare(account_id, api_token, port=port,
                                include_usage=include_usage).start()
    print(f"FAKE_CLOUDFLARE_URL={fake.base_url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await fake.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--account-id", default=ACCOUNT_ID)
    parser.add_argument("--api-token", default=API_TOKEN)
    parser.add_argument("--include-usage", action="store_true")
    args = parser.parse_args()
    try:
        asyncio.run(_serve(args.port, args.account_id, args.api_token, args.include_usage))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
