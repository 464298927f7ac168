"""The Cloudflare Workers AI adapter against a loopback server speaking Workers AI's wire
(tests/kit/fake_cloudflare.py), which checks path, account, bearer token and body shape."""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from meshnode.config import TimeoutsConfig, validate
from meshnode.errors import (
    InvalidRequest,
    StreamBroken,
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from meshnode.providers.cloudflare import CloudflareProvider, envelope_error
from meshnode.providers.registry import ProviderContext, build_provider
from meshnode.routing.outcome import Served
from meshnode.types import InferenceRequest, ModelOffer, RequestKind, StreamChunk
from tests.kit.fake_cloudflare import (
    ACCOUNT_ID,
    API_TOKEN,
    Fail,
    FakeCloudflare,
    Reply,
    behaviour_to_json,
    tiny_png,
)
from tests.kit.fake_process import FakeServerProcess

TIMEOUTS = TimeoutsConfig(connect_ms=5000, first_byte_ms=20000, total_ms=30000)
MODELS = [
    {"name": "llama", "cloudflare_model": "@cf/meta/llama-3.1-8b-instruct",
     "cost_per_1k_tokens": 0.001},
    {"name": "bge", "cloudflare_model": "@cf/baai/bge-base-en-v1.5"},  # kind guessed
    {"name": "sdxl", "cloudflare_model": "@cf/stabilityai/stable-diffusion-xl-base-1.0",
     "kind": "image"},
]


def provider_for(fake: FakeCloudflare, token: str = API_TOKEN) -> CloudflareProvider:
    config = validate({"providers": {"cloudflare": {
        "base_url": fake.base_url,
        "credentials": {"account_id": ACCOUNT_ID, "api_token": token},
        "models": MODELS,
    }}})
    (resolved,) = config.resolved_providers()
    provider = build_provider(resolved, ProviderContext("n1", Path("."), TIMEOUTS))
    assert isinstance(provider, CloudflareProvider)
    return provider


def offer(provider: CloudflareProvider, name: str) -> ModelOffer:
    return next(o for o in provider.offers() if o.model == name)


def req(kind: RequestKind, model: str, body: dict[str, Any], stream: bool = False
        ) -> InferenceRequest:
    return InferenceRequest(kind=kind, model=model, body=body, request_id="r1",
                            deadline=time.monotonic() + 30, stream=stream)


HELLO = {"messages": [{"role": "system", "content": "sys"},
                      {"role": "user", "content": [{"type": "text", "text": "hi there"}]}],
         "max_tokens": 64, "temperature": 0.2, "stop": ["x"]}


@pytest.fixture
async def fake() -> AsyncIterator[FakeCloudflare]:
    async with FakeCloudflare() as server:
        yield server


@pytest.fixture
async def provider(fake: FakeCloudflare) -> AsyncIterator[CloudflareProvider]:
    p = provider_for(fake)
    await p.start()
    yield p
    await p.close()


def test_offers_kinds_from_config_or_model_name(fake: FakeCloudflare) -> None:
    p = provider_for(fake)
    kinds = {o.model: o.kinds for o in p.offers()}
    assert kinds["llama"] == {RequestKind.CHAT, RequestKind.COMPLETION}
    assert kinds["bge"] == {RequestKind.EMBEDDING}
    assert kinds["sdxl"] == {RequestKind.IMAGE}
    assert offer(p, "llama").upstream_model == "@cf/meta/llama-3.1-8b-instruct"


async def test_chat_without_upstream_usage_is_estimated(
    fake: FakeCloudflare, provider: CloudflareProvider
) -> None:
    done = await provider.complete(req(RequestKind.CHAT, "llama", HELLO), offer(provider, "llama"),
                                   TIMEOUTS)
    assert fake.violations == []
    model, sent = fake.requests[0]
    assert model == "@cf/meta/llama-3.1-8b-instruct"
    assert sent == {"messages": [{"role": "system", "content": "sys"},
                                 {"role": "user", "content": "hi there"}],
                    "max_tokens": 64, "temperature": 0.2}
    assert done.body["object"] == "chat.completion" and done.body["model"] == "llama"
    assert done.body["choices"][0]["message"] == {"role": "assistant", "content": "echo: hi there",
                                                  "refusal": None}
    assert done.body["choices"][0]["finish_reason"] == "stop"
    assert done.usage.estimated and done.usage.prompt_tokens > 0
    assert done.usage.completion_tokens == 4  # "echo: hi there" is 14 chars, about 4 tokens
    # what the API layer then reports
    served = Served(offer=offer(provider, "llama"), node="n1", strategy="cost_optimized",
                    usage=done.usage)
    assert served.to_json()["cost_estimated"] is True


async def test_chat_with_upstream_usage_is_exact(fake: FakeCloudflare) -> None:
    fake.include_usage = True
    p = provider_for(fake)
    await p.start()
    try:
        done = await p.complete(req(RequestKind.CHAT, "llama", HELLO), offer(p, "llama"),
                                TIMEOUTS)
        chunks = [c async for c in p.stream(req(RequestKind.CHAT, "llama", HELLO, True),
                                            offer(p, "llama"), TIMEOUTS)]
    finally:
        await p.close()
    assert not done.usage.estimated and done.usage.completion_tokens == 3
    assert chunks[-1].usage is not None and not chunks[-1].usage.estimated
    assert chunks[-1].usage.completion_tokens == 3


async def test_completion_kind_uses_prompt(
    fake: FakeCloudflare, provider: CloudflareProvider
) -> None:
    done = await provider.complete(
        req(RequestKind.COMPLETION, "llama", {"prompt": "Once upon"}), offer(provider, "llama"),
        TIMEOUTS)
    assert fake.requests[0][1] == {"prompt": "Once upon"}
    assert done.body["object"] == "text_completion"
    assert done.body["choices"][0]["text"] == "echo: Once upon"


async def collect(provider: CloudflareProvider, request: InferenceRequest) -> list[StreamChunk]:
    return [c async for c in provider.stream(request, offer(provider, request.model), TIMEOUTS)]


async def test_stream_relays_pieces_then_finish_then_estimated_usage(
    fake: FakeCloudflare, provider: CloudflareProvider
) -> None:
    fake.script(Reply(text="one two three"))
    chunks = await collect(provider, req(RequestKind.CHAT, "llama", HELLO, True))
    assert fake.requests[0][1]["stream"] is True and fake.violations == []
    deltas = [c.data["choices"][0]["delta"] for c in chunks if c.data["choices"]]
    assert deltas[0] == {"role": "assistant", "content": "one "}
    assert "".join(d.get("content", "") for d in deltas) == "one two three"
    assert chunks[-2].data["choices"][0]["finish_reason"] == "stop"
    last = chunks[-1]
    assert last.data["choices"] == [] and last.usage is not None and last.usage.estimated
    assert last.data["usage"]["completion_tokens"] == last.usage.completion_tokens == 4
    assert all(c.data["object"] == "chat.completion.chunk" for c in chunks)


async def test_completion_stream(fake: FakeCloudflare, provider: CloudflareProvider) -> None:
    chunks = await collect(provider, req(RequestKind.COMPLETION, "llama", {"prompt": "a b"}, True))
    texts = [c.data["choices"][0]["text"] for c in chunks if c.data["choices"]]
    assert "".join(texts) == "echo: a b"
    assert chunks[0].data["object"] == "text_completion"


async def test_embeddings(fake: FakeCloudflare, provider: CloudflareProvider) -> None:
    done = await provider.complete(
        req(RequestKind.EMBEDDING, "bge", {"input": ["a", "bb"]}), offer(provider, "bge"),
        TIMEOUTS)
    assert fake.requests[0] == ("@cf/baai/bge-base-en-v1.5", {"text": ["a", "bb"]})
    assert done.body["object"] == "list" and done.body["model"] == "bge"
    assert [d["index"] for d in done.body["data"]] == [0, 1]
    assert done.body["data"][1]["embedding"] == [2.0, 0.5, -0.25, 1.0]
    assert done.usage.estimated
    with pytest.raises(InvalidRequest):
        await provider.complete(req(RequestKind.EMBEDDING, "bge", {"input": [1, 2]}),
                                offer(provider, "bge"), TIMEOUTS)


async def test_embeddings_in_base64_as_openai_node_asks(
    fake: FakeCloudflare, provider: CloudflareProvider
) -> None:
    done = await provider.complete(
        req(RequestKind.EMBEDDING, "bge", {"input": ["a", "bb"], "encoding_format": "base64"}),
        offer(provider, "bge"), TIMEOUTS)
    raw = base64.b64decode(done.body["data"][1]["embedding"])
    assert struct.unpack("<4f", raw) == (2.0, 0.5, -0.25, 1.0)
    sent = len(fake.requests)
    with pytest.raises(InvalidRequest) as info:  # Workers AI cannot shorten: refused, not ignored
        await provider.complete(
            req(RequestKind.EMBEDDING, "bge", {"input": "a", "dimensions": 2}),
            offer(provider, "bge"), TIMEOUTS)
    assert info.value.param == "dimensions"
    assert len(fake.requests) == sent  # nothing was sent upstream


async def test_images_png_bytes_become_b64_json(
    fake: FakeCloudflare, provider: CloudflareProvider
) -> None:
    body = {"prompt": "a red square", "n": 2, "size": "512x256"}
    done = await provider.complete(req(RequestKind.IMAGE, "sdxl", body), offer(provider, "sdxl"),
                                   TIMEOUTS)
    assert fake.violations == []
    assert [b for _, b in fake.requests] == [{"prompt": "a red square", "width": 512,
                                              "height": 256}] * 2
    assert len(done.body["data"]) == 2
    assert base64.b64decode(done.body["data"][0]["b64_json"]) == tiny_png()
    url = await provider.complete(
        req(RequestKind.IMAGE, "sdxl", {"prompt": "x", "response_format": "url"}),
        offer(provider, "sdxl"), TIMEOUTS)
    assert url.body["data"][0]["url"].startswith("data:image/png;base64,")


@pytest.mark.parametrize(("fail", "error", "retryable"), [
    (Fail(429, retry_after=3), UpstreamRateLimited, True),
    (Fail(500), UpstreamUnavailable, True),
    (Fail(400, message="AiError: Bad input"), UpstreamBadRequest, False),
    (Fail(401), UpstreamAuthError, False),
])
async def test_error_envelopes_map(
    fake: FakeCloudflare, provider: CloudflareProvider, fail: Fail, error: type, retryable: bool
) -> None:
    for stream in (False, True):
        fake.script(fail)
        request = req(RequestKind.CHAT, "llama", HELLO, stream)
        with pytest.raises(error) as info:
            if stream:
                await collect(provider, request)
            else:
                await provider.complete(request, offer(provider, "llama"), TIMEOUTS)
        assert info.value.retryable is retryable
        if fail.retry_after:
            assert info.value.retry_after == 3
        if fail.status == 400:
            assert "Bad input" in info.value.message


def test_envelope_codes_on_a_200() -> None:
    def env(code: int) -> dict[str, Any]:
        return {"success": False, "errors": [{"code": code, "message": "m"}], "result": None}
    assert isinstance(envelope_error(env(3040), "cf"), UpstreamRateLimited)
    assert isinstance(envelope_error(env(5007), "cf"), UpstreamBadRequest)
    assert isinstance(envelope_error(env(10000), "cf"), UpstreamAuthError)
    assert isinstance(envelope_error(env(9999), "cf"), UpstreamUnavailable)
    assert isinstance(envelope_error({}, "cf"), UpstreamUnavailable)


async def test_wrong_token_is_auth_error_without_leaking_it(fake: FakeCloudflare) -> None:
    p = provider_for(fake, token="cf-wrong-token-123")
    await p.start()
    try:
        with pytest.raises(UpstreamAuthError) as info:
            await p.complete(req(RequestKind.CHAT, "llama", HELLO), offer(p, "llama"), TIMEOUTS)
    finally:
        await p.close()
    assert "cf-wrong-token-123" not in info.value.message


async def test_stream_broken_midway_is_stream_broken(
    fake: FakeCloudflare, provider: CloudflareProvider
) -> None:
    fake.script(Reply(text="a b c d", break_after=2))
    got: list[str] = []
    with pytest.raises(StreamBroken):
        async for chunk in provider.stream(req(RequestKind.CHAT, "llama", HELLO, True),
                                           offer(provider, "llama"), TIMEOUTS):
            got.append(chunk.data["choices"][0]["delta"]["content"])
    assert got == ["a ", "b "]


def test_missing_credentials_disable_the_provider() -> None:
    config = validate({"providers": {"cloudflare": {
        "credentials": {"account_id": "a", "api_token": ""}, "models": MODELS}}})
    (resolved,) = config.resolved_providers()
    disabled = CloudflareProvider(resolved, ProviderContext("n", Path("."), TIMEOUTS))
    assert disabled.offers() == []
    ready, why = disabled.ready()
    assert not ready and "api_token" in why and "account_id" not in why


@pytest.mark.slow
async def test_fake_in_its_own_process_is_scriptable() -> None:
    with FakeServerProcess("tests.kit.fake_cloudflare") as proc:
        proc.script(behaviour_to_json(Fail(429, retry_after=2)))
        config = validate({"providers": {"cloudflare": {
            "base_url": proc.url, "credentials": {"account_id": ACCOUNT_ID, "api_token": API_TOKEN},
            "models": MODELS}}})
        (resolved,) = config.resolved_providers()
        p = build_provider(resolved, ProviderContext("n1", Path("."), TIMEOUTS))
        await p.start()
        try:
            request = req(RequestKind.CHAT, "llama", HELLO)
            with pytest.raises(UpstreamRateLimited):
                await p.complete(request, offer(p, "llama"), TIMEOUTS)  # type: ignore[arg-type]
            done = await p.complete(request, offer(p, "llama"), TIMEOUTS)  # type: ignore[arg-type]
        finally:
            await p.close()
        recorded = proc.recorded()
    assert done.body["choices"][0]["message"]["content"] == "echo: hi there"
    assert [r["model"] for r in recorded["requests"]] == ["@cf/meta/llama-3.1-8b-instruct"] * 2


WEATHER_TOOL = {"type": "function", "function": {
    "name": "weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
ASK_TOOL = {"messages": [{"role": "user", "content": "Weather in Oslo?"}],
            "tools": [WEATHER_TOOL]}


@pytest.mark.parametrize("style", ["openai", "flat"])
async def test_tool_calls_in_answers_both_wire_shapes(
    fake: FakeCloudflare, provider: CloudflareProvider, style: str
) -> None:
    fake.script(Reply(tool="weather", tool_input={"city": "Oslo"}, tool_style=style))
    done = await provider.complete(req(RequestKind.CHAT, "llama", ASK_TOOL),
                                   offer(provider, "llama"), TIMEOUTS)
    assert fake.requests[0][1]["tools"] == [WEATHER_TOOL["function"]]
    choice = done.body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "weather", "arguments": '{"city":"Oslo"}'}
    assert call["id"] == ("chatcmpl-tool-0001" if style == "openai" else "call_r1_0")


@pytest.mark.parametrize("style", ["openai", "flat"])
async def test_tool_calls_in_streams_both_wire_shapes(
    fake: FakeCloudflare, provider: CloudflareProvider, style: str
) -> None:
    fake.script(Reply(text="Let me look. ", tool="weather", tool_input={"city": "Oslo"},
                      tool_style=style))
    chunks = await collect(provider, req(RequestKind.CHAT, "llama", ASK_TOOL, True))
    assert fake.violations == []
    deltas = [c.data["choices"][0]["delta"] for c in chunks if c.data["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == "Let me look. "
    calls = [tc for d in deltas for tc in d.get("tool_calls") or ()]
    # OpenAI's form: the first delta names the call, the later ones carry argument pieces
    assert calls[0]["index"] == 0 and calls[0]["type"] == "function"
    assert calls[0]["function"]["name"] == "weather" and calls[0]["id"]
    assert all(set(c) == {"index", "function"} and c["index"] == 0 for c in calls[1:])
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city":"Oslo"}'
    assert len(calls) == (3 if style == "openai" else 1)  # the null finalization is dropped
    assert chunks[-2].data["choices"][0]["finish_reason"] == "tool_calls"


async def test_tool_round_trip_keeps_ids_for_newer_models(
    fake: FakeCloudflare, provider: CloudflareProvider
) -> None:
    call = {"id": "call_9", "type": "function",
            "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}}
    body = {"messages": [*ASK_TOOL["messages"],
                         {"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": "call_9", "content": "-3C"}],
            "tools": [WEATHER_TOOL]}
    await provider.complete(req(RequestKind.CHAT, "llama", body), offer(provider, "llama"),
                            TIMEOUTS)
    assert fake.violations == []
    sent = fake.requests[0][1]["messages"]
    assert sent[1]["tool_calls"] == [call]
    assert sent[1]["content"] == '[{"name":"weather","arguments":"{\\"city\\":\\"Oslo\\"}"}]'
    assert sent[2] == {"role": "tool", "content": "-3C", "tool_call_id": "call_9"}


async def test_openai_shaped_answers_are_read(
    fake: FakeCloudflare, provider: CloudflareProvider
) -> None:
    # gpt-oss / kimi on /ai/run answer `choices[0].message` and stream `choices[0].delta`
    fake.script(Reply(text="plain words", openai_shape=True),
                Reply(text="streamed words", openai_shape=True),
                Reply(tool="weather", tool_input={"city": "Oslo"}, openai_shape=True))
    done = await provider.complete(req(RequestKind.CHAT, "llama", HELLO),
                                   offer(provider, "llama"), TIMEOUTS)
    assert done.body["choices"][0]["message"]["content"] == "plain words"
    chunks = await collect(provider, req(RequestKind.CHAT, "llama", HELLO, True))
    deltas = [c.data["choices"][0]["delta"] for c in chunks if c.data["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == "streamed words"
    chunks = await collect(provider, req(RequestKind.CHAT, "llama", ASK_TOOL, True))
    calls = [tc for c in chunks if c.data["choices"]
             for tc in c.data["choices"][0]["delta"].get("tool_calls") or ()]
    assert calls[0]["function"]["name"] == "weather"
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city":"Oslo"}'
    assert chunks[-2].data["choices"][0]["finish_reason"] == "tool_calls"
    assert fake.violations == []
