"""The Anthropic-compatible door: pure translation both ways, then `POST /v1/messages` and
`POST /v1/images/generations` in a real aiohttp server on loopback, driven by the official
`anthropic` and `openai` clients, routed to real adapters talking to the wire-exact fakes."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from meshnode.api.anthropic_door import (
    EventWriter,
    chat_to_message,
    messages_to_chat,
    parse_messages,
)
from meshnode.api.app import create_app
from meshnode.config import RoutingConfig, TimeoutsConfig, validate
from meshnode.errors import InvalidRequest, UpstreamUnavailable
from meshnode.providers.fake import BreakAfter, FakeProvider
from meshnode.providers.registry import ProviderContext, build_provider
from meshnode.routing.router import Router
from tests.kit.fake_anthropic import API_KEY, Fail, FakeAnthropic, Reply
from tests.kit.fake_cloudflare import ACCOUNT_ID, API_TOKEN, FakeCloudflare, tiny_png

TOOL = {"name": "weather", "description": "Weather in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                         "required": ["city"]}}


# --------------------------------------------------------------------------- translation
def test_messages_request_becomes_chat_body() -> None:
    body = {
        "model": "claude", "max_tokens": 100, "system": [{"type": "text", "text": "Be terse."}],
        "stop_sequences": ["END"], "temperature": 0.5, "top_p": 0.8, "top_k": 5,
        "metadata": {"user_id": "u1"}, "tools": [TOOL],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True}, "stream": True,
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Look: "},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": "AAAA"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather",
                 "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1",
                 "content": [{"type": "text", "text": "-3C"}]},
                {"type": "text", "text": "And tomorrow?"}]},
        ],
    }
    chat = messages_to_chat(body)
    assert chat["messages"] == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": [
            {"type": "text", "text": "Look: "},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "toolu_1", "type": "function",
             "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}}],
         # kept for an Anthropic upstream (signed), dropped by every other adapter
         "thinking_blocks": [{"type": "thinking", "thinking": "hmm", "signature": "s"}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "-3C"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "weather", "parameters": TOOL["input_schema"],
        "description": "Weather in a city"}}]
    assert chat["tool_choice"] == "required" and chat["parallel_tool_calls"] is False
    assert (chat["max_tokens"], chat["stop"], chat["user"]) == (100, ["END"], "u1")
    assert (chat["temperature"], chat["top_p"], chat["stream"]) == (0.5, 0.8, True)
    assert chat["top_k"] == 5  # passed on (Anthropic and vLLM read it; OpenAI's adapter drops it)
    request = parse_messages(
        __import__("orjson").dumps(body), request_id="r", timeout_s=5)
    assert request.stream and request.model == "claude" and request.max_output_tokens == 100


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "c", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"model": "c", "max_tokens": 5, "messages": []}, "messages"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "c", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
     "messages.0.role"),
    ({"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {}}]}]}, "messages.0.content.0"),
    ({"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
      "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
])
def test_invalid_messages_requests_name_the_param(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        messages_to_chat(body)
    assert info.value.param == param


def test_chat_answer_becomes_message() -> None:
    body = {"id": "chatcmpl-1", "choices": [{"index": 0, "finish_reason": "tool_calls",
            "message": {"role": "assistant", "content": "Let me see.", "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "weather", "arguments": '{"city": "Rome"}'}}]}}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}
    message = chat_to_message(body, "claude", "req_1")
    assert message == {
        "id": "msg_chatcmpl-1", "type": "message", "role": "assistant", "model": "claude",
        "content": [{"type": "text", "text": "Let me see."},
                    {"type": "tool_use", "id": "call_1", "name": "weather",
                     "input": {"city": "Rome"}}],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 11, "output_tokens": 7},
    }
    for reason, mapped in [("stop", "end_turn"), ("length", "max_tokens"),
                           ("content_filter", "refusal")]:
        body["choices"][0]["finish_reason"] = reason
        assert chat_to_message(body, "c", "r")["stop_reason"] == mapped


def _events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    import orjson
    out = []
    for block in raw.decode().strip().split("\n\n"):
        name, data = block.split("\n")
        out.append((name.removeprefix("event: "), orjson.loads(data.removeprefix("data: "))))
    return out


def test_event_writer_turns_chunks_into_anthropic_events() -> None:
    w = EventWriter("claude", "req_1", 9)
    raw = w.start()
    for delta in ({"role": "assistant", "content": "Hi"}, {"content": " there"},
                  {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                   "function": {"name": "weather", "arguments": ""}}]},
                  {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]},
                  {"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}):
        raw += w.feed({"choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
    raw += w.feed({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    raw += w.feed({"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 6}})
    raw += w.finish({"provider": "p"})
    events = _events(raw)
    names = [n for n, _ in events]
    assert names == ["message_start", "ping", "content_block_start", "content_block_delta",
                     "content_block_delta", "content_block_stop", "content_block_start",
                     "content_block_delta", "content_block_delta", "content_block_stop",
                     "message_delta", "message_stop"]
    assert all(d["type"] == n for n, d in events)
    assert events[0][1]["message"]["usage"] == {"input_tokens": 9, "output_tokens": 0}
    assert events[6][1]["content_block"] == {"type": "tool_use", "id": "call_1",
                                             "name": "weather", "input": {}}
    assert [e[1]["index"] for e in events[7:9]] == [1, 1]
    assert events[10][1]["delta"]["stop_reason"] == "tool_use"
    assert events[10][1]["usage"] == {"input_tokens": 20, "output_tokens": 6}
    assert events[10][1]["x_aiproxy"] == {"provider": "p"}
    error = _events(EventWriter.error(UpstreamUnavailable("boom")))
    assert error == [("error", {"type": "error", "error": {"type": "api_error",
                                                           "message": "boom"}})]


# --------------------------------------------------------------------------- through the app
TIMEOUTS = TimeoutsConfig(connect_ms=5000, first_byte_ms=20000, total_ms=30000)


async def start_app(providers: list[Any], chain: list[str]) -> TestClient:
    routing = RoutingConfig.model_validate(
        {"failover": {"backoff": {"initial_ms": 1, "max_ms": 2, "jitter": 0.0}}})
    router = Router(routing, chain, providers, "node-test")
    app = create_app(router, node_id="node-test")  # app.py registers the door's routes
    client = TestClient(TestServer(app, host="127.0.0.1", handler_cancellation=True))
    await client.start_server()
    return client


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeAnthropic, FakeCloudflare]]:
    async with FakeAnthropic() as fa, FakeCloudflare() as fc:
        yield fa, fc


@pytest.fixture
async def node(fakes: tuple[FakeAnthropic, FakeCloudflare]) -> AsyncIterator[TestClient]:
    fa, fc = fakes
    config = validate({"providers": {
        "anthropic": {"priority": 1, "base_url": fa.url, "credentials": {"api_key": API_KEY},
                      "models": [{"name": "claude", "anthropic_model": "claude-3-5-haiku"}]},
        "cloudflare": {"priority": 2, "base_url": fc.base_url,
                       "credentials": {"account_id": ACCOUNT_ID, "api_token": API_TOKEN},
                       "models": [{"name": "claude", "cloudflare_model": "@cf/meta/llama"},
                                  {"name": "sdxl",
                                   "cloudflare_model": "@cf/stabilityai/sdxl"}]},
    }})
    ctx = ProviderContext("node-test", Path("."), TIMEOUTS)
    providers = [build_provider(r, ctx) for r in config.resolved_providers()]
    client = await start_app(providers, ["anthropic", "cloudflare"])
    yield client
    await client.close()


def sdk(client: TestClient) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key="unused", base_url=str(client.make_url("")),
                                    max_retries=0)


async def test_anthropic_sdk_non_stream_and_tool_round_trip(
    fakes: tuple[FakeAnthropic, FakeCloudflare], node: TestClient
) -> None:
    fa, _ = fakes
    client = sdk(node)
    fa.script(Reply(text="Checking.", tool="weather", tool_input={"city": "Oslo"}))
    first = await client.messages.create(
        model="claude", max_tokens=200, system="Be terse.", tools=[TOOL],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "Weather in Oslo?"}])
    assert first.stop_reason == "tool_use"
    text, call = first.content
    assert text.type == "text" and text.text == "Checking."
    assert call.type == "tool_use" and call.name == "weather" and call.input == {"city": "Oslo"}
    assert first.usage.output_tokens > 0
    raw = first.model_extra or {}
    assert raw["x_aiproxy"]["provider"] == "anthropic"
    second = await client.messages.create(
        model="claude", max_tokens=200, tools=[TOOL],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "Weather in Oslo?"},
                  {"role": "assistant", "content": first.content},  # type: ignore[typeddict-item]
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                "content": "-3C"}]}])
    assert second.content[0].type == "text" and second.content[0].text == "echo: -3C"
    assert second.stop_reason == "end_turn"
    # the upstream got a valid Anthropic request both times, system lifted, tool ids kept
    assert fa.violations == []
    assert fa.requests[0]["system"] == "Be terse."
    assert fa.requests[1]["messages"][2]["content"][0]["tool_use_id"] == call.id


async def test_anthropic_sdk_stream_with_tool_call(
    fakes: tuple[FakeAnthropic, FakeCloudflare], node: TestClient
) -> None:
    fa, _ = fakes
    fa.script(Reply(text="Let me look it up.", tool="weather", tool_input={"city": "Rome"}))
    async with sdk(node).messages.stream(
        model="claude", max_tokens=100, tools=[TOOL],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "Rome?"}],
    ) as stream:
        texts = [t async for t in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(texts) == "Let me look it up."
    assert final.stop_reason == "tool_use"
    assert final.content[1].type == "tool_use" and final.content[1].input == {"city": "Rome"}
    assert final.usage.output_tokens > 0


async def test_failover_before_first_byte_then_errors_in_anthropic_shape(
    fakes: tuple[FakeAnthropic, FakeCloudflare], node: TestClient
) -> None:
    fa, fc = fakes
    client = sdk(node)
    fa.script(Fail(529))
    message = await client.messages.create(
        model="claude", max_tokens=50, messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].type == "text" and message.content[0].text == "echo: hi"
    attempts = (message.model_extra or {})["x_aiproxy"]["attempts"]
    assert [a["provider"] for a in attempts] == ["anthropic", "cloudflare"]
    assert (message.model_extra or {})["x_aiproxy"]["cost_estimated"] is True
    with pytest.raises(anthropic.BadRequestError) as info:
        await client.messages.create(model="claude", max_tokens=0,  # type: ignore[arg-type]
                                     messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.create(model="nope", max_tokens=5,
                                     messages=[{"role": "user", "content": "hi"}])


async def test_stream_broken_after_first_event_ends_with_error_event(
    node: TestClient, fakes: tuple[FakeAnthropic, FakeCloudflare]
) -> None:
    fa, _ = fakes
    fa.script(Reply(text="alpha beta gamma delta", break_after=1))
    response = await node.post("/v1/messages", json={
        "model": "claude", "max_tokens": 50, "stream": True,
        "messages": [{"role": "user", "content": "hi"}]})
    raw = await response.read()
    names = [n for n, _ in _events(raw)]
    assert names[-1] == "error" and "message_stop" not in names
    texts = [d["delta"]["text"] for n, d in _events(raw) if n == "content_block_delta"]
    assert texts == ["alpha "]


async def test_count_tokens_estimate(node: TestClient) -> None:
    count = await sdk(node).messages.count_tokens(
        model="claude", messages=[{"role": "user", "content": "hello " * 40}])
    assert count.input_tokens > 40


async def test_images_through_openai_client(node: TestClient) -> None:
    client = openai.AsyncOpenAI(api_key="unused", base_url=str(node.make_url("/v1")),
                                max_retries=0)
    result = await client.images.generate(model="sdxl", prompt="a red square", n=1,
                                          size="256x256")
    assert result.data is not None
    assert base64.b64decode(result.data[0].b64_json or "") == tiny_png()
    # model left out: the node's one image model is used
    again = await client.images.generate(prompt="a blue square")
    assert again.data and again.data[0].b64_json
    with pytest.raises(openai.BadRequestError):
        await client.images.generate(model="sdxl", prompt="")
    with pytest.raises(openai.BadRequestError):
        await client.images.generate(model="claude", prompt="x")
    with pytest.raises(openai.NotFoundError):
        await client.images.generate(model="nope", prompt="x")


async def test_door_routes_to_any_provider_and_breaks_cleanly() -> None:
    local = FakeProvider("local", models=["tiny"], text="one two three four", chunks=4)
    client = await start_app([local], ["local"])
    try:
        message = await sdk(client).messages.create(
            model="tiny", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        assert message.content[0].type == "text"
        assert message.content[0].text == "one two three four"
        local.script(BreakAfter(1))
        response = await client.post("/v1/messages", json={
            "model": "tiny", "max_tokens": 5, "stream": True,
            "messages": [{"role": "user", "content": "x"}]})
        events = _events(await response.read())
        assert [n for n, _ in events][-1] == "error"
        assert [d["delta"]["text"] for n, d in events if n == "content_block_delta"] == ["one"]
    finally:
        await client.close()


# --------------------------------------------------------------------------- stream shapes
def _chunk(delta: dict[str, Any], finish: str | None = None, **choice: Any) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish, **choice}]}


def _check_blocks(events: list[tuple[str, dict[str, Any]]]) -> None:
    """One block open at a time; no delta to a block that is not open."""
    current: int | None = None
    for name, data in events:
        if name == "content_block_start":
            assert current is None, events
            current = data["index"]
        elif name == "content_block_delta":
            assert data["index"] == current, (data, events)
        elif name == "content_block_stop":
            assert data["index"] == current
            current = None
    assert current is None


def test_interleaved_tool_calls_and_text_never_reach_a_closed_block() -> None:
    writer = EventWriter("m", "req_1")
    raw = writer.start()
    for chunk in [
        _chunk({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f",
                                                                   "arguments": ""}}]}),
        _chunk({"tool_calls": [{"index": 1, "id": "b", "function": {"name": "g",
                                                                   "arguments": "{\"y\""}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"x\": 1}"}}]}),
        _chunk({"content": "Between."}),
        _chunk({"tool_calls": [{"index": 1, "function": {"arguments": ": 2}"}}]}),
        _chunk({}, "tool_calls"),
    ]:
        raw += writer.feed(chunk)
    events = _events(raw + writer.finish())
    _check_blocks(events)
    starts = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert [(b["type"], b.get("id")) for b in starts] == [
        ("tool_use", "a"), ("tool_use", "b"), ("text", None)]
    by_index: dict[int, str] = {}
    for name, data in events:
        if name == "content_block_delta":
            piece = data["delta"].get("partial_json") or data["delta"].get("text") or ""
            by_index[data["index"]] = by_index.get(data["index"], "") + piece
    assert by_index == {0: '{"x": 1}', 1: '{"y": 2}', 2: "Between."}


def test_stop_sequence_and_thinking_in_a_stream() -> None:
    writer = EventWriter("m", "req_1")
    raw = writer.start()
    raw += writer.feed(_chunk({"reasoning_content": "Hmm."}))
    raw += writer.feed(_chunk({"thinking_blocks": [
        {"type": "thinking", "thinking": "", "signature": "sig"}]}))
    raw += writer.feed(_chunk({"content": "one"}))
    raw += writer.feed(_chunk({}, "stop", stop_reason="END"))
    events = _events(raw + writer.finish())
    _check_blocks(events)
    deltas = [d["delta"] for n, d in events if n == "content_block_delta"]
    assert deltas == [{"type": "thinking_delta", "thinking": "Hmm."},
                      {"type": "signature_delta", "signature": "sig"},
                      {"type": "text_delta", "text": "one"}]
    final = [d for n, d in events if n == "message_delta"][0]
    assert final["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}


def test_output_config_becomes_response_format_and_stays_for_anthropic() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    chat = messages_to_chat({"model": "m", "max_tokens": 5,
                             "messages": [{"role": "user", "content": "x"}],
                             "output_config": {"format": {"type": "json_schema",
                                                          "schema": schema}}})
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "output", "schema": schema, "strict": True}}
    assert chat["output_config"]["format"]["schema"] == schema
    with pytest.raises(InvalidRequest) as caught:
        messages_to_chat({"model": "m", "max_tokens": 5, "output_config": {"format": "json"},
                          "messages": [{"role": "user", "content": "x"}]})
    assert caught.value.param == "output_config.format"
