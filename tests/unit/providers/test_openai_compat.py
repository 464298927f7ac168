"""The OpenAI-compatible adapter against the fake OpenAI server, over real loopback HTTP.

Also checks that the fake itself speaks OpenAI's wire, by parsing it with the official client."""

from __future__ import annotations

import asyncio
import copy
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from meshnode.config import TimeoutsConfig, validate
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
from meshnode.providers.openai_compat import (
    FORBIDDEN_FIELDS,
    OpenAICompatProvider,
    parse_usage,
    upstream_body,
)
from meshnode.providers.registry import ProviderContext, build_provider
from meshnode.providers.tokens import estimate_prompt_tokens, estimate_tokens
from meshnode.types import InferenceRequest, ModelOffer, RequestKind, StreamChunk, Usage
from tests.kit.fake_openai import (
    DEFAULT_TEXT,
    Behaviour,
    FakeOpenAI,
    FakeOpenAIProcess,
    embedding_vector,
)

KEY = "sk-test-adapter-0123456789"
TIMEOUTS = TimeoutsConfig(connect_ms=5000, first_byte_ms=20000, total_ms=60000)
SHORT_FIRST_BYTE = TimeoutsConfig(connect_ms=5000, first_byte_ms=200, total_ms=60000)
MODELS = [
    {"name": "gpt-4o", "openai_model": "gpt-4o-2024-08-06",
     "cost_per_1k_input": 0.0025, "cost_per_1k_output": 0.01, "max_context_tokens": 128000},
    {"name": "davinci", "openai_model": "davinci-002", "kind": "completion",
     "cost_per_1k_tokens": 0.002},
    {"name": "embed", "openai_model": "text-embedding-3-small", "kind": "embedding"},
    {"name": "same-name"},
]


def make_provider(
    base_url: str, *, name: str = "openai", tmp: Path = Path("."), **overrides: Any
) -> OpenAICompatProvider:
    provider_cfg: dict[str, Any] = {
        "base_url": base_url,
        "credentials": {"api_key": KEY},
        "priority": 3,
        "models": MODELS,
        **overrides,
    }
    config = validate({"providers": {name: provider_cfg}})
    ctx = ProviderContext(node_id="node-a", data_dir=tmp, timeouts=TIMEOUTS)
    provider = build_provider(config.resolved_providers()[0], ctx)
    assert isinstance(provider, OpenAICompatProvider)
    return provider


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


@pytest.fixture
async def provider(fake: FakeOpenAI) -> AsyncIterator[OpenAICompatProvider]:
    p = make_provider(fake.base_url)
    await p.start()
    yield p
    await p.close()


def offer_for(provider: OpenAICompatProvider, model: str) -> ModelOffer:
    return next(o for o in provider.offers() if o.model == model)


def chat(body: dict[str, Any] | None = None, *, stream: bool = False,
         deadline_s: float = 30.0, kind: RequestKind = RequestKind.CHAT) -> InferenceRequest:
    if body is None:
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "say hello please"}]}
    if stream:
        body = {**body, "stream": True}
    return InferenceRequest(
        kind=kind, model=str(body.get("model")), body=body, request_id="req-1",
        deadline=time.monotonic() + deadline_s, stream=stream,
    )


async def collect(provider: OpenAICompatProvider, request: InferenceRequest,
                  offer: ModelOffer, timeouts: TimeoutsConfig = TIMEOUTS) -> list[StreamChunk]:
    return [chunk async for chunk in provider.stream(request, offer, timeouts)]


def text_of(chunks: list[StreamChunk]) -> str:
    out = ""
    for chunk in chunks:
        for choice in chunk.data["choices"]:
            out += choice.get("delta", {}).get("content") or choice.get("text") or ""
    return out


# --------------------------------------------------------------------------- offers & credentials
def test_offers_come_from_the_config(fake: FakeOpenAI) -> None:
    provider = make_provider(fake.base_url)
    by_name = {o.model: o for o in provider.offers()}
    assert set(by_name) == {"gpt-4o", "davinci", "embed", "same-name"}
    gpt = by_name["gpt-4o"]
    assert gpt.provider == "openai" and gpt.provider_kind == "openai"
    assert gpt.upstream_model == "gpt-4o-2024-08-06"
    assert gpt.kinds == {RequestKind.CHAT, RequestKind.COMPLETION}
    assert (gpt.cost_per_1k_input, gpt.cost_per_1k_output) == (0.0025, 0.01)
    assert gpt.priority == 3 and gpt.max_context_tokens == 128000
    assert by_name["davinci"].kinds == {RequestKind.COMPLETION}
    assert by_name["davinci"].cost_per_1k_output == 0.002
    assert by_name["embed"].kinds == {RequestKind.EMBEDDING}
    assert by_name["same-name"].upstream_model == "same-name"
    assert provider.ready() == (True, "")


def test_empty_key_offers_nothing_and_warns_once(
    fake: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="meshnode.providers.openai_compat"):
        provider = make_provider(fake.base_url, credentials={"api_key": ""})
        assert provider.offers() == ()
        assert provider.offers() == ()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "providers.openai.credentials.api_key is empty" in warnings[0].getMessage()
    ready, why = provider.ready()
    assert not ready and "api_key" in why


def test_openai_type_without_any_key_offers_nothing(fake: FakeOpenAI) -> None:
    assert make_provider(fake.base_url, credentials={}).offers() == ()


async def test_keyless_local_server_sends_no_authorization(fake: FakeOpenAI) -> None:
    provider = make_provider(fake.base_url, name="ollama", type="openai_compatible",
                             credentials={})
    assert provider.kind == "openai_compatible" and provider.offers()
    await provider.start()
    try:
        await provider.complete(chat(), offer_for(provider, "gpt-4o"), TIMEOUTS)
    finally:
        await provider.close()
    assert "authorization" not in fake.requests[0].headers


async def test_config_headers_and_organization_are_sent(fake: FakeOpenAI) -> None:
    provider = make_provider(
        fake.base_url, credentials={"api_key": KEY, "organization": "org-1"},
        headers={"X-Custom": "yes"},
    )
    await provider.start()
    try:
        await provider.complete(chat(), offer_for(provider, "gpt-4o"), TIMEOUTS)
    finally:
        await provider.close()
    headers = fake.requests[0].headers
    assert headers["authorization"] == f"Bearer {KEY}"
    assert headers["openai-organization"] == "org-1" and headers["x-custom"] == "yes"


# --------------------------------------------------------------------------- chat, non-stream
async def test_chat_passes_fields_through_and_drops_forbidden_ones(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body: dict[str, Any] = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": tools, "tool_choice": "auto",
        "response_format": {"type": "json_object"},
        "n": 2, "stop": ["\n"], "seed": 7, "user": "u-1", "temperature": 0.2, "top_p": 0.9,
        "max_tokens": 50, "logit_bias": {"50256": -100},
        "stream_options": {"include_usage": True},  # not allowed on a non-stream call
        **{field: "https://evil.example" for field in FORBIDDEN_FIELDS},
    }
    original = copy.deepcopy(body)
    completion = await provider.complete(chat(body), offer_for(provider, "gpt-4o"), TIMEOUTS)

    assert body == original  # the shared client body is never mutated
    sent = fake.requests[0]
    assert sent.path == "/v1/chat/completions" and sent.method == "POST"
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.json["model"] == "gpt-4o-2024-08-06"
    for field in ("tools", "tool_choice", "response_format", "n", "stop", "seed", "user",
                  "temperature", "top_p", "max_tokens", "logit_bias", "messages"):
        assert sent.json[field] == body[field], field
    assert not FORBIDDEN_FIELDS & set(sent.json)
    assert "stream_options" not in sent.json
    assert "evil.example" not in str(sent.headers)

    assert completion.body["model"] == "gpt-4o-2024-08-06"  # echoed by the upstream
    assert len(completion.body["choices"]) == 2
    assert completion.body["choices"][0]["message"]["content"] == DEFAULT_TEXT
    assert completion.usage == Usage(prompt_tokens=1, completion_tokens=6)


async def test_chat_tool_calls_come_back_as_they_are(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    fake.script(Behaviour.ok(tool_calls=[call]))
    completion = await provider.complete(chat(), offer_for(provider, "gpt-4o"), TIMEOUTS)
    choice = completion.body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"] == [call]


async def test_missing_usage_is_estimated(fake: FakeOpenAI, provider: OpenAICompatProvider) -> None:
    fake.script(Behaviour.ok(text="x" * 40, usage=False))
    completion = await provider.complete(chat(), offer_for(provider, "gpt-4o"), TIMEOUTS)
    assert completion.usage.estimated
    assert completion.usage.completion_tokens == 10  # 40 chars / 4
    assert completion.usage.prompt_tokens > 0


async def test_completions_and_embeddings(fake: FakeOpenAI, provider: OpenAICompatProvider) -> None:
    request = chat({"model": "davinci", "prompt": "once upon a time", "max_tokens": 5},
                   kind=RequestKind.COMPLETION)
    completion = await provider.complete(request, offer_for(provider, "davinci"), TIMEOUTS)
    assert fake.requests[-1].path == "/v1/completions"
    assert fake.requests[-1].json["model"] == "davinci-002"
    assert completion.body["choices"][0]["text"] == DEFAULT_TEXT
    assert completion.usage == Usage(prompt_tokens=4, completion_tokens=6)

    request = chat({"model": "embed", "input": ["a b", "c"]}, kind=RequestKind.EMBEDDING)
    embedded = await provider.complete(request, offer_for(provider, "embed"), TIMEOUTS)
    assert fake.requests[-1].path == "/v1/embeddings"
    assert fake.requests[-1].json == {"model": "text-embedding-3-small", "input": ["a b", "c"]}
    assert [d["embedding"] for d in embedded.body["data"]] == [
        embedding_vector("a b"), embedding_vector("c")
    ]
    assert embedded.usage == Usage(prompt_tokens=3, completion_tokens=0)


async def test_embedding_options_token_ids_and_max_tokens_zero_pass_through(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    body = {"model": "embed", "input": [[101, 2023], [7]], "encoding_format": "base64",
            "dimensions": 4}
    embedded = await provider.complete(chat(body, kind=RequestKind.EMBEDDING),
                                       offer_for(provider, "embed"), TIMEOUTS)
    assert fake.requests[-1].json == {**body, "model": "text-embedding-3-small"}
    assert all(isinstance(d["embedding"], str) for d in embedded.body["data"])  # as sent back
    body = {"model": "davinci", "prompt": [[1, 2], [3]], "max_tokens": 0, "echo": True}
    await provider.complete(chat(body, kind=RequestKind.COMPLETION),
                            offer_for(provider, "davinci"), TIMEOUTS)
    assert fake.requests[-1].json == {**body, "model": "davinci-002"}


# --------------------------------------------------------------------------- streams
async def test_stream_asks_for_usage_and_parses_it(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "one two three"}],
            "stream_options": {"include_usage": False, "other": 1}, "api_key": "sk-evil"}
    chunks = await collect(provider, chat(body, stream=True), offer_for(provider, "gpt-4o"))
    sent = fake.requests[0].json
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True, "other": 1}
    assert "api_key" not in sent
    assert text_of(chunks) == DEFAULT_TEXT
    assert chunks[0].data["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2].data["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1].data["choices"] == []
    assert chunks[-1].usage == Usage(prompt_tokens=3, completion_tokens=6)
    assert all(c.usage is None for c in chunks[:-1])


async def test_stream_chunks_arrive_incrementally(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    # the fake sends 2 events, then waits for release(): we must have them before that
    fake.script(Behaviour.ok(pause_after=2))
    stream = provider.stream(chat(stream=True), offer_for(provider, "gpt-4o"), TIMEOUTS)
    first = await asyncio.wait_for(anext(stream), 30)
    second = await asyncio.wait_for(anext(stream), 30)
    assert first.data["choices"][0]["delta"]["role"] == "assistant"
    assert second.data["choices"][0]["delta"]["content"] == "Hello "
    fake.release()
    rest = [chunk async for chunk in stream]
    assert text_of([first, second, *rest]) == DEFAULT_TEXT
    assert rest[-1].usage is not None


async def test_stream_completion(fake: FakeOpenAI, provider: OpenAICompatProvider) -> None:
    request = chat({"model": "davinci", "prompt": "hi"}, stream=True, kind=RequestKind.COMPLETION)
    chunks = await collect(provider, request, offer_for(provider, "davinci"))
    assert fake.requests[0].path == "/v1/completions"
    assert text_of(chunks) == DEFAULT_TEXT
    assert chunks[-1].usage == Usage(prompt_tokens=1, completion_tokens=6)


async def test_stream_without_upstream_usage_ends_with_an_estimate(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    fake.script(Behaviour.ok(text="abcd" * 5, chunks=5, usage=False))
    chunks = await collect(provider, chat(stream=True), offer_for(provider, "gpt-4o"))
    assert text_of(chunks) == "abcd" * 5
    last = chunks[-1]
    assert last.data["choices"] == [] and last.data["object"] == "chat.completion.chunk"
    assert last.usage is not None and last.usage.estimated
    assert last.usage.completion_tokens == 5
    assert last.data["usage"] == last.usage.to_openai()


async def test_stream_connection_goes_back_to_the_pool(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    for _ in range(3):
        await collect(provider, chat(stream=True), offer_for(provider, "gpt-4o"))
    assert len({r.peer for r in fake.requests}) == 1


# --------------------------------------------------------------------------- failures
FAILURES: list[tuple[Behaviour, type[MeshError], bool, float | None]] = [
    (Behaviour.error(500), UpstreamUnavailable, True, None),
    (Behaviour.error(502, body="bad gateway"), UpstreamUnavailable, True, None),
    (Behaviour.error(503), UpstreamUnavailable, True, None),
    (Behaviour.error(400), UpstreamBadRequest, False, None),
    (Behaviour.error(404), UpstreamBadRequest, False, None),
    (Behaviour.error(422), UpstreamBadRequest, False, None),
    (Behaviour.error(401), UpstreamAuthError, False, None),
    (Behaviour.error(403), UpstreamAuthError, False, None),
    (Behaviour.rate_limited("3"), UpstreamRateLimited, True, 3.0),
    (Behaviour.rate_limited("Wed, 21 Oct 2015 07:28:00 GMT"), UpstreamRateLimited, True, 0.0),
    (Behaviour.rate_limited("31536000"), UpstreamRateLimited, True, 31536000.0),
    (Behaviour.rate_limited("garbage"), UpstreamRateLimited, True, None),
    (Behaviour.rate_limited(None), UpstreamRateLimited, True, None),
    (Behaviour.reset_before(), UpstreamUnavailable, True, None),
    (Behaviour.not_json(), UpstreamUnavailable, True, None),
]


def _ids(case: tuple[Behaviour, type[MeshError], bool, float | None]) -> str:
    b = case[0]
    return f"{b.kind}-{b.status}-{b.headers.get('Retry-After', '')[:10]}"


@pytest.mark.parametrize("case", FAILURES, ids=_ids)
async def test_failures_map_to_mesh_errors(
    fake: FakeOpenAI, provider: OpenAICompatProvider,
    case: tuple[Behaviour, type[MeshError], bool, float | None],
) -> None:
    behaviour, cls, retryable, retry_after = case
    fake.script(behaviour)
    with pytest.raises(MeshError) as info:
        await provider.complete(chat(), offer_for(provider, "gpt-4o"), TIMEOUTS)
    err = info.value
    assert type(err) is cls and err.retryable is retryable
    assert err.provider == "openai" and err.retry_after == retry_after
    assert KEY not in err.message


@pytest.mark.parametrize("case", FAILURES, ids=_ids)
async def test_stream_failures_before_the_first_chunk_stay_retryable(
    fake: FakeOpenAI, provider: OpenAICompatProvider,
    case: tuple[Behaviour, type[MeshError], bool, float | None],
) -> None:
    behaviour, cls, retryable, retry_after = case
    fake.script(behaviour)
    with pytest.raises(MeshError) as info:
        await collect(provider, chat(stream=True), offer_for(provider, "gpt-4o"))
    err = info.value
    assert type(err) is cls and err.retryable is retryable and err.retry_after == retry_after


async def test_bad_request_carries_the_upstream_message_and_param(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    fake.script(Behaviour.error(400, body={"error": {
        "message": f"Invalid value for 'temperature' (key {KEY})", "type": "invalid_request_error",
        "param": "temperature", "code": None}}))
    with pytest.raises(UpstreamBadRequest) as info:
        await provider.complete(chat(), offer_for(provider, "gpt-4o"), TIMEOUTS)
    assert "Invalid value for 'temperature'" in info.value.message
    assert info.value.param == "temperature"
    assert KEY not in info.value.message


async def test_auth_error_does_not_leak_the_key(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    fake.script(Behaviour.error(401, body={"error": {"message": f"Incorrect API key: {KEY}"}}))
    with pytest.raises(UpstreamAuthError) as info:
        await provider.complete(chat(), offer_for(provider, "gpt-4o"), TIMEOUTS)
    assert KEY not in info.value.message
    assert KEY not in str(info.value.to_openai())


async def test_fake_enforces_a_required_key() -> None:
    async with FakeOpenAI(require_key="sk-right-key-123") as fake:
        provider = make_provider(fake.base_url)  # sends KEY, the wrong one
        await provider.start()
        try:
            with pytest.raises(UpstreamAuthError):
                await provider.complete(chat(), offer_for(provider, "gpt-4o"), TIMEOUTS)
        finally:
            await provider.close()


async def test_hang_is_a_timeout_and_hangs_up(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    fake.script(Behaviour.hang(), Behaviour.hang())
    with pytest.raises(UpstreamTimeout) as info:
        await provider.complete(chat(), offer_for(provider, "gpt-4o"), SHORT_FIRST_BYTE)
    assert info.value.retryable
    with pytest.raises(UpstreamTimeout):
        await collect(provider, chat(stream=True), offer_for(provider, "gpt-4o"), SHORT_FIRST_BYTE)
    await fake.wait_until(lambda f: f.disconnects == 2)


async def test_the_deadline_bounds_the_call(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    fake.script(Behaviour.hang())
    with pytest.raises(DeadlineExceeded):
        await provider.complete(chat(deadline_s=0.2), offer_for(provider, "gpt-4o"), TIMEOUTS)
    await fake.wait_until(lambda f: f.disconnects == 1)


async def test_connection_refused(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = make_provider(f"http://127.0.0.1:{port}/v1")
    await provider.start()
    try:
        with pytest.raises(UpstreamUnavailable) as info:
            await provider.complete(chat(), offer_for(provider, "gpt-4o"), TIMEOUTS)
        assert info.value.retryable
        with pytest.raises(UpstreamUnavailable):
            await collect(provider, chat(stream=True), offer_for(provider, "gpt-4o"))
    finally:
        await provider.close()


async def test_reset_after_the_first_chunk_breaks_the_stream(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    fake.script(Behaviour.reset_after_first())
    received: list[StreamChunk] = []
    with pytest.raises(StreamBroken) as info:
        async for chunk in provider.stream(chat(stream=True), offer_for(provider, "gpt-4o"),
                                           TIMEOUTS):
            received.append(chunk)
    assert len(received) == 1 and not info.value.retryable
    assert info.value.provider == "openai"


async def test_a_stall_after_the_first_chunk_breaks_the_stream(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    # generous enough that the first chunk comes in time even on a loaded machine
    stall = TimeoutsConfig(connect_ms=5000, first_byte_ms=1000)
    fake.script(Behaviour.hang_after_first(), Behaviour.hang_after_first())
    stream = provider.stream(chat(stream=True), offer_for(provider, "gpt-4o"), stall)
    await anext(stream)
    with pytest.raises(StreamBroken):
        await anext(stream)
    # past the deadline mid-stream: a DeadlineExceeded (not retryable either)
    stream = provider.stream(chat(stream=True, deadline_s=2.0), offer_for(provider, "gpt-4o"),
                             TIMEOUTS)
    await anext(stream)
    with pytest.raises(DeadlineExceeded):
        await anext(stream)


# --------------------------------------------------------------------------- cancellation
async def test_closing_the_stream_releases_the_upstream(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    fake.script(Behaviour.ok(pause_after=1))
    stream = provider.stream(chat(stream=True), offer_for(provider, "gpt-4o"), TIMEOUTS)
    await anext(stream)
    await stream.aclose()  # the client went away
    await fake.wait_until(lambda f: f.disconnects == 1)


async def test_cancelling_the_consumer_releases_the_upstream(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    fake.script(Behaviour.ok(pause_after=1))
    got_first = asyncio.Event()

    async def consume() -> None:
        async for _ in provider.stream(chat(stream=True), offer_for(provider, "gpt-4o"),
                                       TIMEOUTS):
            got_first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_first.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await fake.wait_until(lambda f: f.disconnects == 1)


async def test_cancelling_a_whole_call_releases_the_upstream(
    fake: FakeOpenAI, provider: OpenAICompatProvider
) -> None:
    fake.script(Behaviour.hang())
    task = asyncio.create_task(provider.complete(chat(), offer_for(provider, "gpt-4o"), TIMEOUTS))
    await fake.wait_until(lambda f: f.request_count == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await fake.wait_until(lambda f: f.disconnects == 1)


# --------------------------------------------------------------------------- odd upstreams
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _raw_provider(handler: Handler) -> tuple[web.AppRunner, OpenAICompatProvider]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    provider = make_provider(f"http://127.0.0.1:{runner.addresses[0][1]}/v1")
    await provider.start()
    return runner, provider


async def _sse_handler(request: web.Request, events: list[bytes]) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for event in events:
        await resp.write(event)
    await resp.write_eof()
    return resp


async def _stream_of(events: list[bytes]) -> list[StreamChunk]:
    """The chunks the provider makes of an upstream that streams `events` (each one write)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return await _sse_handler(request, events)

    runner, provider = await _raw_provider(handler)
    try:
        return await collect(provider, chat(stream=True), offer_for(provider, "gpt-4o"))
    finally:
        await provider.close()
        await runner.cleanup()


CHUNK = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
         b'"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n')


@pytest.mark.parametrize(
    ("events", "first_ok", "cls"),
    [
        ([b'data: {"error": {"message": "overloaded"}}\n\n'], False, UpstreamUnavailable),
        ([CHUNK, b'data: {"error": {"message": "overloaded"}}\n\n'], True, StreamBroken),
        ([b"data: not json\n\n"], False, UpstreamUnavailable),
        ([CHUNK, b"data: {broken\n\n"], True, StreamBroken),
        ([b": ping\n\n", b"data: [DONE]\n\n"], False, UpstreamUnavailable),  # no chunk at all
    ],
)
async def test_odd_streams(events: list[bytes], first_ok: bool, cls: type[MeshError]) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await _sse_handler(request, events)

    runner, provider = await _raw_provider(handler)
    received: list[StreamChunk] = []
    try:
        with pytest.raises(cls):
            async for chunk in provider.stream(chat(stream=True),
                                               offer_for(provider, "gpt-4o"), TIMEOUTS):
                received.append(chunk)
    finally:
        await provider.close()
        await runner.cleanup()
    assert bool(received) is first_ok


async def test_stream_without_done_and_with_crlf_still_completes() -> None:
    usage = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
             b'"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}}')
    chunks = await _stream_of([CHUNK.replace(b"\n", b"\r\n"), b": keep-alive\n\n", usage])
    assert text_of(chunks) == "hi"
    assert chunks[-1].usage == Usage(prompt_tokens=2, completion_tokens=1)


async def test_stream_chunks_keep_the_json_they_came_as_when_it_can_be_relayed() -> None:
    """`raw` is the event's JSON as it came (what the SSE encoder relays) only when it is one
    line of valid UTF-8; a multi-line event or one with invalid UTF-8 is parsed (the latter
    with replacement characters) and re-serialized instead."""
    spaced = (b'data: {"id": "c", "object": "chat.completion.chunk", "created": 1, '
              b'"model": "m", "choices": [{"index": 0, "delta": {"content": "a"}, '
              b'"finish_reason": null}]}\n\n')
    multi = (b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",\n'
             b'data: "choices":[{"index":0,"delta":{"content":"b"},"finish_reason":null}]}\n\n')
    bad_utf8 = CHUNK.replace(b'"hi"', b'"\xff"')

    chunks = await _stream_of([spaced, multi, bad_utf8, b"data: [DONE]\n\n"])
    assert text_of(chunks) == "ab\ufffd"
    assert chunks[0].raw == spaced[len(b"data: "):-2]
    assert chunks[1].raw is None and chunks[1].data["choices"][0]["delta"] == {"content": "b"}
    assert chunks[2].raw is None
    assert chunks[-1].raw is None and chunks[-1].usage is not None  # the estimate, synthesized


async def test_stream_chunks_with_a_lone_cr_are_not_relayed_as_they_came() -> None:
    """With CRLF line ends every line is parsed on its own; a CR inside an event's JSON (valid
    JSON whitespace, but a line end to an SSE client) keeps the event from being relayed as it
    came, while its clean neighbours still are."""
    clean = CHUNK.replace(b"\n", b"\r\n")
    lone_cr = CHUNK.replace(b'"hi"', b'\r"ho"').replace(b"\n", b"\r\n")

    chunks = await _stream_of([clean + lone_cr + b"data: [DONE]\r\n\r\n"])
    assert text_of(chunks) == "hiho"
    assert chunks[0].raw == CHUNK[len(b"data: "):-2]
    assert chunks[1].raw is None


async def test_a_200_error_body_is_unavailable() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "model is loading"}})

    runner, provider = await _raw_provider(handler)
    try:
        with pytest.raises(UpstreamUnavailable, match="model is loading"):
            await provider.complete(chat(), offer_for(provider, "gpt-4o"), TIMEOUTS)
    finally:
        await provider.close()
        await runner.cleanup()


# --------------------------------------------------------------------------- pure helpers
def test_upstream_body_is_a_new_dict() -> None:
    body = {"model": "a", "messages": [], "stream": True, "base_url": "x"}
    out = upstream_body(body, "b", stream=False)
    assert out == {"model": "b", "messages": [], "stream": False}
    assert body == {"model": "a", "messages": [], "stream": True, "base_url": "x"}
    assert upstream_body({"model": "a"}, "b", stream=True) == {
        "model": "b", "stream": True, "stream_options": {"include_usage": True}}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}, Usage(3, 4)),
        ({"prompt_tokens": 3, "total_tokens": 3}, Usage(3, 0)),
        ({"total_tokens": 3}, None),
        (None, None),
        ("x", None),
    ],
)
def test_parse_usage(raw: Any, expected: Usage | None) -> None:
    assert parse_usage(raw) == expected


# --------------------------------------------------------------------------- the fake's wire
async def test_the_official_client_understands_the_fake(fake: FakeOpenAI) -> None:
    client = openai.AsyncOpenAI(base_url=fake.base_url, api_key="sk-x", max_retries=0)
    try:
        answer = await client.chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "hi"}])
        assert answer.model == "m1" and answer.choices[0].message.content == DEFAULT_TEXT
        assert answer.usage is not None and answer.usage.completion_tokens == 6

        pieces, usage = [], None
        stream = await client.chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "hi"}], stream=True,
            stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            else:
                usage = chunk.usage
        assert "".join(pieces) == DEFAULT_TEXT and usage is not None

        text = await client.completions.create(model="m2", prompt="hi")
        assert text.choices[0].text == DEFAULT_TEXT

        vectors = await client.embeddings.create(model="e", input=["x", "y"])  # base64 wire
        assert [d.embedding for d in vectors.data] == [embedding_vector("x"),
                                                       embedding_vector("y")]

        fake.script(Behaviour.rate_limited("2"))
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(
                model="m1", messages=[{"role": "user", "content": "hi"}])
        models = await client.models.list()
        assert [m.id for m in models.data] == ["fake-model"]
    finally:
        await client.close()


@pytest.mark.slow
async def test_the_fake_as_a_subprocess(tmp_path: Path) -> None:
    with FakeOpenAIProcess() as fake:
        assert fake.base_url.startswith("http://127.0.0.1:") and fake.base_url.endswith("/v1")
        fake.script(Behaviour.error(503), Behaviour.ok(text="second"))
        provider = make_provider(fake.base_url, tmp=tmp_path)
        await provider.start()
        try:
            with pytest.raises(UpstreamUnavailable):
                await provider.complete(chat(), offer_for(provider, "gpt-4o"), TIMEOUTS)
            completion = await provider.complete(chat(), offer_for(provider, "gpt-4o"), TIMEOUTS)
            assert completion.body["choices"][0]["message"]["content"] == "second"
        finally:
            await provider.close()
        requests = fake.requests()
        assert len(requests) == 2 and requests[0]["json"]["model"] == "gpt-4o-2024-08-06"
        assert requests[0]["headers"]["authorization"] == f"Bearer {KEY}"
        assert fake.stats()["requests"] == 2
        fake.reset()
        assert fake.requests() == [] and fake.stats()["queued"] == 0


# --------------------------------------------------------------------------- token estimates
def test_estimate_tokens() -> None:
    assert [estimate_tokens(t) for t in ("", "a", "abcd", "abcde")] == [0, 1, 1, 2]


@pytest.mark.parametrize(
    ("kind", "body", "expected"),
    [
        # 3 priming + (4 + 2) + (4 + 1 + name 1)
        (RequestKind.CHAT, {"messages": [{"role": "system", "content": "abcdefgh"},
                                         {"role": "user", "content": "abc", "name": "bob"}]}, 15),
        # multi-part content: text parts counted, an image part at its flat price
        (RequestKind.CHAT, {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "abcd"}, {"type": "image_url", "image_url": {"url": "x"}}]}]},
         3 + 4 + 1 + 85),
        (RequestKind.COMPLETION, {"prompt": "abcdefgh"}, 2),
        (RequestKind.COMPLETION, {"prompt": [1, 2, 3]}, 3),  # pre-tokenized: exact
        (RequestKind.COMPLETION, {"prompt": ["abcd", "abcd"]}, 2),
        (RequestKind.EMBEDDING, {"input": [[1, 2], [3]]}, 3),
        (RequestKind.EMBEDDING, {"input": "abcd"}, 1),
        (RequestKind.CHAT, {"messages": "garbage"}, 0),
        (RequestKind.CHAT, {"messages": [None, 5]}, 3),
        (RequestKind.EMBEDDING, {"input": None}, 0),
    ],
)
def test_estimate_prompt_tokens(kind: RequestKind, body: dict[str, Any], expected: int) -> None:
    assert estimate_prompt_tokens(kind, body) == expected


def test_tools_count_toward_the_prompt() -> None:
    base = {"messages": [{"role": "user", "content": "hi"}]}
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    assert estimate_prompt_tokens(RequestKind.CHAT, {**base, "tools": tools}) > (
        estimate_prompt_tokens(RequestKind.CHAT, base)
    )


@pytest.mark.parametrize(("name", "keeps_top_k"), [("openai", False), ("vllm", True)])
async def test_anthropic_only_fields_never_reach_an_openai_upstream(
    fake: FakeOpenAI, caplog: pytest.LogCaptureFixture, name: str, keeps_top_k: bool
) -> None:
    overrides = {"type": "openai_compatible"} if name == "vllm" else {}
    p = make_provider(fake.base_url, name=name, **overrides)
    await p.start()
    try:
        mark = {"type": "ephemeral"}
        body = {"model": "gpt-4o", "top_k": 4, "thinking": {"type": "enabled"},
                "anthropic_beta": ["b"], "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "hi",
                                                  "cache_control": mark}]}]}
        with caplog.at_level(logging.INFO, logger="meshnode.providers.anthropic_extensions"):
            await p.complete(chat(body), offer_for(p, "gpt-4o"), TIMEOUTS)
            await collect(p, chat(body, stream=True), offer_for(p, "gpt-4o"))
        for sent in (fake.requests[0].json, fake.requests[1].json):
            assert "thinking" not in sent and "anthropic_beta" not in sent
            assert sent["messages"][0]["content"] == [{"type": "text", "text": "hi"}]
            assert ("top_k" in sent) is keeps_top_k
        assert "Anthropic-only" in caplog.text
        assert fake.requests[0].headers["x-request-id"] == "req-1"
        assert body["messages"][0]["content"][0]["cache_control"] == mark  # never mutated
    finally:
        await p.close()


async def test_responses_pass_through_natively_only_to_openai(fake: FakeOpenAI) -> None:
    from meshnode.errors import StreamBroken, UpstreamUnavailable
    from meshnode.types import RESPONSES_NATIVE_FIELD

    native = {"input": [{"role": "user", "content": "hi"}], "instructions": "Be kind."}
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
            RESPONSES_NATIVE_FIELD: native}
    p = make_provider(fake.base_url)  # type openai
    compatible = make_provider(fake.base_url, name="vllm", type="openai_compatible")
    await p.start()
    await compatible.start()
    try:
        done = await p.complete(chat(body), offer_for(p, "gpt-4o"), TIMEOUTS)
        assert done.body["object"] == "response" and done.usage.completion_tokens > 0
        sent = fake.requests[-1]
        assert sent.path == "/v1/responses"
        assert sent.json == {**native, "model": "gpt-4o-2024-08-06", "stream": False,
                             "store": False}
        chunks = await collect(p, chat(body, stream=True), offer_for(p, "gpt-4o"))
        kinds = [c.data["type"] for c in chunks]
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
        assert all(c.usage is None for c in chunks[:-1])

        fake.script(Behaviour.error(500))
        with pytest.raises(UpstreamUnavailable):  # before the first byte: fail over
            await collect(p, chat(body, stream=True), offer_for(p, "gpt-4o"))
        fake.script(Behaviour.reset_after_first())
        with pytest.raises(StreamBroken):  # after it: never retried
            await collect(p, chat(body, stream=True), offer_for(p, "gpt-4o"))

        await compatible.complete(chat(body), offer_for(compatible, "gpt-4o"), TIMEOUTS)
        sent = fake.requests[-1]
        assert sent.path == "/v1/chat/completions"
        assert RESPONSES_NATIVE_FIELD not in sent.json  # never sent to a chat upstream
    finally:
        await p.close()
        await compatible.close()
