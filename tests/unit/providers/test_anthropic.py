"""The Anthropic adapter: translation both ways, and the adapter against a loopback server that
speaks Anthropic's wire (tests/kit/fake_anthropic.py), which also checks what it receives."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from meshnode.config import ResolvedProvider, TimeoutsConfig, validate
from meshnode.errors import (
    InvalidRequest,
    StreamBroken,
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from meshnode.providers.anthropic import (
    DEFAULT_MAX_TOKENS,
    AnthropicProvider,
    StreamTranslator,
    anthropic_to_chat,
    chat_to_anthropic,
)
from meshnode.providers.registry import ProviderContext, build_provider
from meshnode.types import InferenceRequest, RequestKind, StreamChunk
from tests.kit.fake_anthropic import (
    API_KEY,
    Fail,
    FakeAnthropic,
    Reply,
    behaviour_to_json,
    check_messages_request,
)
from tests.kit.fake_process import FakeServerProcess

TIMEOUTS = TimeoutsConfig(connect_ms=5000, first_byte_ms=20000, total_ms=30000)
TOOLS = [{"type": "function", "function": {
    "name": "weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


# --------------------------------------------------------------------------- translation
def test_system_lifted_turns_merged_and_defaults_filled() -> None:
    body = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
        {"role": "user", "content": "Hi"},
        {"role": "user", "content": [{"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "Again"},
    ], "stop": "END", "temperature": 1.7, "top_p": 0.9, "user": "u-1"}
    out = chat_to_anthropic(body, "claude-x", stream=False)
    check_messages_request(out)
    assert out["system"] == "Be brief.\n\nUse French."
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user"]
    assert out["messages"][0]["content"] == [
        {"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]
    assert out["messages"][1]["content"] == "Bonjour"
    assert out["max_tokens"] == DEFAULT_MAX_TOKENS
    assert out["stop_sequences"] == ["END"]
    assert out["temperature"] == 1.0  # clamped into Anthropic's 0..1
    assert out["top_p"] == 0.9
    assert out["metadata"] == {"user_id": "u-1"}
    assert "stream" not in out


def test_max_tokens_taken_from_either_openai_field() -> None:
    msgs = [{"role": "user", "content": "x"}]
    assert chat_to_anthropic({"messages": msgs, "max_tokens": 7}, "m", stream=True)[
        "max_tokens"] == 7
    out = chat_to_anthropic({"messages": msgs, "max_completion_tokens": 9}, "m", stream=True)
    assert out["max_tokens"] == 9 and out["stream"] is True


def test_tools_and_tool_results_translate_both_ways() -> None:
    body = {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "toolu_1", "type": "function",
            "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "user", "content": "Thanks; and now?"},
    ], "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}
    out = chat_to_anthropic(body, "m", stream=False)
    check_messages_request(out)
    assert out["tools"] == [{"name": "weather", "description": "Weather in a city",
                             "input_schema": TOOLS[0]["function"]["parameters"]}]
    assert out["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert out["messages"][1]["content"] == [
        {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}]
    # the tool result and the following user text merge into one user turn, result first
    assert out["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
        {"type": "text", "text": "Thanks; and now?"}]
    named = chat_to_anthropic(
        {**body, "tool_choice": {"type": "function", "function": {"name": "weather"}},
         "parallel_tool_calls": None}, "m", stream=False)
    assert named["tool_choice"] == {"type": "tool", "name": "weather"}


def test_image_parts_become_image_blocks() -> None:
    body = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.jpg"}},
    ]}]}
    out = chat_to_anthropic(body, "m", stream=False)
    check_messages_request(out)
    blocks = out["messages"][0]["content"]
    assert blocks[1] == {"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    assert blocks[2] == {"type": "image", "source": {
        "type": "url", "url": "https://example.invalid/cat.jpg"}}


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "a", "function": {"name": "f", "arguments": "{not json"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png,raw"}}]}]},
     "messages[0].content[0].image_url.url"),
])
def test_untranslatable_requests_are_invalid_with_param(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        chat_to_anthropic(body, "m", stream=False)
    assert info.value.param == param


def test_answer_translates_text_tool_calls_finish_reason_and_usage() -> None:
    answer = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
              "content": [{"type": "text", "text": "Let me check."},
                          {"type": "tool_use", "id": "toolu_9", "name": "weather",
                           "input": {"city": "Oslo"}}],
              "stop_reason": "tool_use", "stop_sequence": None,
              "usage": {"input_tokens": 10, "output_tokens": 5,
                        "cache_read_input_tokens": 3, "cache_creation_input_tokens": 2}}
    body, usage = anthropic_to_chat(answer, "claude")
    choice = body["choices"][0]
    assert body["object"] == "chat.completion" and body["model"] == "claude"
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."
    assert choice["message"]["tool_calls"] == [{"id": "toolu_9", "type": "function", "function": {
        "name": "weather", "arguments": '{"city":"Oslo"}'}}]
    assert (usage.prompt_tokens, usage.completion_tokens) == (15, 5)
    assert body["usage"] == {"prompt_tokens": 15, "completion_tokens": 5, "total_tokens": 20}
    for reason, mapped in [("end_turn", "stop"), ("max_tokens", "length"),
                           ("stop_sequence", "stop"), ("refusal", "content_filter")]:
        out, _ = anthropic_to_chat({**answer, "stop_reason": reason, "content": []}, "c")
        assert out["choices"][0]["finish_reason"] == mapped
        assert out["choices"][0]["message"]["content"] == ""


def test_stream_translator_emits_role_once_tool_deltas_and_usage_last() -> None:
    t = StreamTranslator("claude", "anthropic")
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {"id": "msg_7", "usage": {"input_tokens": 12,
                                                                       "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {
            "type": "tool_use", "id": "toolu_1", "name": "weather", "input": {}}},
        {"type": "content_block_delta", "index": 1, "delta": {
            "type": "input_json_delta", "partial_json": '{"city":'}},
        {"type": "content_block_delta", "index": 1, "delta": {
            "type": "input_json_delta", "partial_json": '"Rome"}'}},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
         "usage": {"output_tokens": 9}},
        {"type": "message_stop"},
    ]
    chunks = [c for e in events for c in t.feed(e["type"], e)]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": "Hi"}
    assert all("role" not in d for d in deltas[1:])
    assert deltas[1]["tool_calls"][0] == {"index": 0, "id": "toolu_1", "type": "function",
                                          "function": {"name": "weather", "arguments": ""}}
    args = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:4])
    assert args == '{"city":"Rome"}'
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 21
    assert {c["id"] for c in chunks} == {"msg_7"}
    assert t.done


def test_stream_translator_error_event_is_retryable_overload() -> None:
    t = StreamTranslator("claude", "anthropic")
    with pytest.raises(UpstreamUnavailable):
        t.feed("error", {"type": "error", "error": {"type": "overloaded_error",
                                                    "message": "Overloaded"}})


# --------------------------------------------------------------------------- against the fake
def provider_for(fake: FakeAnthropic, api_key: str = API_KEY, base_suffix: str = ""
                 ) -> AnthropicProvider:
    config = validate({"providers": {"anthropic": {
        "base_url": fake.url + base_suffix,
        "credentials": {"api_key": api_key},
        "models": [{"name": "claude", "anthropic_model": "claude-3-5-haiku-latest",
                    "cost_per_1k_input": 0.001, "cost_per_1k_output": 0.002}],
    }}})
    (resolved,) = config.resolved_providers()
    ctx = ProviderContext(node_id="n1", data_dir=Path("."), timeouts=TIMEOUTS)
    provider = build_provider(resolved, ctx)
    assert isinstance(provider, AnthropicProvider)
    return provider


def chat(body: dict[str, Any], stream: bool = False) -> InferenceRequest:
    return InferenceRequest(kind=RequestKind.CHAT, model="claude", body=body, request_id="r1",
                            deadline=time.monotonic() + 30, stream=stream)


HELLO = {"messages": [{"role": "system", "content": "sys"},
                      {"role": "user", "content": "hello there"}]}


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic() as server:
        yield server


@pytest.fixture
async def provider(fake: FakeAnthropic) -> AsyncIterator[AnthropicProvider]:
    p = provider_for(fake)
    await p.start()
    yield p
    await p.close()


async def test_complete_sends_valid_request_with_headers(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    (offer,) = provider.offers()
    assert (offer.provider_kind, offer.upstream_model) == ("anthropic", "claude-3-5-haiku-latest")
    done = await provider.complete(chat(HELLO), offer, TIMEOUTS)
    assert fake.violations == []
    sent = fake.requests[0]
    assert sent["system"] == "sys" and sent["model"] == "claude-3-5-haiku-latest"
    assert fake.headers[0]["x-api-key"] == API_KEY
    assert fake.headers[0]["anthropic-version"] == "2023-06-01"
    assert done.body["choices"][0]["message"] == {"role": "assistant",
                                                  "content": "echo: hello there",
                                                  "refusal": None}
    assert done.body["choices"][0]["finish_reason"] == "stop"
    assert done.usage.completion_tokens == 3 and done.usage.prompt_tokens > 0
    assert not done.usage.estimated


async def test_base_url_with_v1_suffix_also_works(fake: FakeAnthropic) -> None:
    p = provider_for(fake, base_suffix="/v1")
    await p.start()
    try:
        done = await p.complete(chat(HELLO), p.offers()[0], TIMEOUTS)
    finally:
        await p.close()
    assert done.body["choices"][0]["message"]["content"] == "echo: hello there"


async def collect(provider: AnthropicProvider, body: dict[str, Any]) -> list[StreamChunk]:
    return [c async for c in provider.stream(chat(body, True), provider.offers()[0], TIMEOUTS)]


async def test_stream_relays_text_finish_and_usage(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    fake.script(Reply(text="one two three"))
    chunks = await collect(provider, HELLO)
    assert fake.violations == [] and fake.requests[0]["stream"] is True
    text = "".join(c.data["choices"][0]["delta"].get("content") or ""
                   for c in chunks if c.data["choices"])
    assert text == "one two three"
    assert [c.data["choices"][0]["finish_reason"] for c in chunks if c.data["choices"]][-1] \
        == "stop"
    assert chunks[-1].data["choices"] == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])


async def test_tool_call_round_trip(fake: FakeAnthropic, provider: AnthropicProvider) -> None:
    fake.script(Reply(text="", tool="weather", tool_input={"city": "Oslo"}))
    ask = {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": TOOLS}
    first = await provider.complete(chat(ask), provider.offers()[0], TIMEOUTS)
    message = first.body["choices"][0]["message"]
    assert first.body["choices"][0]["finish_reason"] == "tool_calls"
    assert message["content"] is None
    (call,) = message["tool_calls"]
    assert call["function"] == {"name": "weather", "arguments": '{"city":"Oslo"}'}
    follow = {**ask, "messages": [*ask["messages"], message,
                                  {"role": "tool", "tool_call_id": call["id"], "content": "-3C"}]}
    second = await provider.complete(chat(follow), provider.offers()[0], TIMEOUTS)
    assert fake.violations == []
    assert second.body["choices"][0]["message"]["content"] == "echo: -3C"


async def test_streamed_tool_call_arguments_reassemble(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    fake.script(Reply(text="", tool="weather", tool_input={"city": "Lyon"}))
    chunks = await collect(provider, {**HELLO, "tools": TOOLS})
    calls = [tc for c in chunks if c.data["choices"]
             for tc in c.data["choices"][0]["delta"].get("tool_calls") or ()]
    assert calls[0]["function"]["name"] == "weather" and calls[0]["id"].startswith("toolu_")
    assert "".join(tc["function"]["arguments"] for tc in calls) == '{"city":"Lyon"}'


@pytest.mark.parametrize(("fail", "error", "retryable"), [
    (Fail(529), UpstreamUnavailable, True),
    (Fail(429, retry_after=7), UpstreamRateLimited, True),
    (Fail(500), UpstreamUnavailable, True),
    (Fail(400, message="messages: bad"), UpstreamBadRequest, False),
    (Fail(401), UpstreamAuthError, False),
])
async def test_http_errors_map_to_mesh_errors(
    fake: FakeAnthropic, provider: AnthropicProvider, fail: Fail, error: type, retryable: bool
) -> None:
    for stream in (False, True):
        fake.script(fail)
        with pytest.raises(error) as info:
            if stream:
                await collect(provider, HELLO)
            else:
                await provider.complete(chat(HELLO), provider.offers()[0], TIMEOUTS)
        assert info.value.retryable is retryable
        assert info.value.provider == "anthropic"
        if fail.retry_after is not None:
            assert info.value.retry_after == 7
        if fail.status == 400:
            assert "messages: bad" in info.value.message


async def test_overloaded_event_before_content_stays_retryable(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    fake.script(Reply(error_event_after=0))
    with pytest.raises(UpstreamUnavailable) as info:
        await collect(provider, HELLO)
    assert info.value.retryable


async def test_stream_broken_after_first_chunk_is_not_retryable(
    fake: FakeAnthropic, provider: AnthropicProvider
) -> None:
    for reply in (Reply(text="a b c d", break_after=1), Reply(text="a b c", error_event_after=2)):
        fake.script(reply)
        got: list[str] = []
        with pytest.raises(StreamBroken):
            async for chunk in provider.stream(chat(HELLO, True), provider.offers()[0], TIMEOUTS):
                got.append(chunk.data["choices"][0]["delta"].get("content", ""))
        assert got and "".join(got) in ("a ", "a b ")


async def test_wrong_key_is_auth_error_and_missing_key_disables(
    fake: FakeAnthropic,
) -> None:
    p = provider_for(fake, api_key="sk-ant-wrong-key")
    await p.start()
    try:
        with pytest.raises(UpstreamAuthError) as info:
            await p.complete(chat(HELLO), p.offers()[0], TIMEOUTS)
    finally:
        await p.close()
    assert "sk-ant-wrong-key" not in info.value.message
    config = validate({"providers": {"anthropic": {"models": [
        {"name": "c", "anthropic_model": "claude"}]}}})
    (resolved,) = config.resolved_providers()
    assert isinstance(resolved, ResolvedProvider)
    # an unset key variable disables the provider (the node still starts) and says why
    disabled = AnthropicProvider(resolved, ProviderContext("n", Path("."), TIMEOUTS))
    assert disabled.offers() == []
    ready, why = disabled.ready()
    assert not ready and "credentials.api_key" in why


async def test_connection_refused_is_retryable(fake: FakeAnthropic) -> None:
    p = provider_for(fake)
    await fake.stop()
    await p.start()
    try:
        with pytest.raises(UpstreamUnavailable):
            await p.complete(chat(HELLO), p.offers()[0], TIMEOUTS)
        with pytest.raises(UpstreamUnavailable):
            await collect(p, HELLO)
    finally:
        await p.close()


@pytest.mark.slow
async def test_fake_in_its_own_process_is_scriptable() -> None:
    with FakeServerProcess("tests.kit.fake_anthropic") as proc:
        proc.script(behaviour_to_json(Fail(529)))
        p = provider_for(proc)  # type: ignore[arg-type]
        await p.start()
        try:
            with pytest.raises(UpstreamUnavailable):
                await p.complete(chat(HELLO), p.offers()[0], TIMEOUTS)
            done = await p.complete(chat(HELLO), p.offers()[0], TIMEOUTS)
        finally:
            await p.close()
        recorded = proc.recorded()
    assert done.body["choices"][0]["message"]["content"] == "echo: hello there"
    assert len(recorded["requests"]) == 2 and recorded["violations"] == []


def test_anthropic_only_fields_reach_anthropic_and_are_dropped_elsewhere() -> None:
    from meshnode.providers.anthropic_extensions import drop_extensions

    mark = {"type": "ephemeral"}
    body = {
        "model": "m", "top_k": 3, "thinking": {"type": "enabled", "budget_tokens": 1024},
        "anthropic_beta": ["x"],
        "response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema": {
            "type": "object"}}},
        "tools": [{"type": "function", "cache_control": mark,
                   "function": {"name": "f", "parameters": {"type": "object"}}}],
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "S", "cache_control": mark}]},
            {"role": "user", "content": [{"type": "text", "text": "U", "cache_control": mark},
                                         {"type": "text", "text": "V"}]},
            {"role": "assistant", "content": "A", "thinking_blocks": [
                {"type": "thinking", "thinking": "t", "signature": "s"}]},
            {"role": "user", "content": "W"},
        ],
    }
    out = chat_to_anthropic(body, "claude", stream=False)
    assert out["system"] == [{"type": "text", "text": "S", "cache_control": mark}]
    assert out["messages"][0]["content"] == [
        {"type": "text", "text": "U", "cache_control": mark}, {"type": "text", "text": "V"}]
    assert out["messages"][1]["content"][0] == {"type": "thinking", "thinking": "t",
                                                "signature": "s"}
    assert out["tools"][0]["cache_control"] == mark
    assert (out["top_k"], out["thinking"]["type"]) == (3, "enabled")
    assert out["output_config"] == {"format": {"type": "json_schema",
                                               "schema": {"type": "object"}}}
    dropped = drop_extensions(body, "openai", also=("top_k",))
    text = str(dropped)
    for name in ("cache_control", "thinking", "anthropic_beta", "top_k"):
        assert name not in text, name
    assert dropped["messages"][1]["content"] == [{"type": "text", "text": "U"},
                                                 {"type": "text", "text": "V"}]
    assert body["tools"][0]["cache_control"] == mark  # the shared body is never mutated
    assert drop_extensions({"model": "m", "messages": []}, "p") == {"model": "m", "messages": []}
