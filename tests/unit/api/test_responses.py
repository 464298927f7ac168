"""The Responses API translated through chat: pure translation both ways (every body and every
stream event checked against OpenAI's own schemas), then `/v1/responses` in a real aiohttp
server on loopback around a real Router, driven by the official `openai` client."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from aiohttp.test_utils import TestClient

from meshnode.api.responses import (
    ResponseEventWriter,
    chat_to_response,
    parse_create,
    to_chat,
)
from meshnode.errors import InvalidRequest, UpstreamUnavailable
from meshnode.providers.fake import BreakAfter, FakeProvider
from meshnode.responses_store import ResponseStore
from tests.kit.openai_schemas import validate

TOOL = {"type": "function", "name": "weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}, "strict": True}


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    events = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        data = orjson.loads(lines["data"])
        assert lines["event"] == data["type"]
        events.append(data)
    return events


# --------------------------------------------------------------------------- request
def test_items_become_chat_messages() -> None:
    call = parse_create({
        "model": "m", "instructions": "Be terse.", "max_output_tokens": 50,
        "temperature": 0.3, "top_p": 0.9, "tools": [TOOL],
        "tool_choice": {"type": "function", "name": "weather"}, "parallel_tool_calls": False,
        "text": {"format": {"type": "json_schema", "name": "w", "strict": True,
                            "schema": {"type": "object"}}},
        "input": [
            {"role": "user", "content": [
                {"type": "input_text", "text": "Look: "},
                {"type": "input_image", "image_url": "data:image/png;base64,AAAA",
                 "detail": "low"}]},
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
            {"type": "function_call", "call_id": "call_1", "name": "weather",
             "arguments": "{\"city\": \"Oslo\"}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "-3C"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"role": "user", "content": "And tomorrow?"},
        ],
    })
    chat = to_chat(call)
    assert chat["messages"] == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": [
            {"type": "text", "text": "Look: "},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA",
                                                "detail": "low"}}]},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3C"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    assert chat["max_tokens"] == 50 and chat["temperature"] == 0.3 and chat["top_p"] == 0.9
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "weather", "description": "Weather in a city",
        "parameters": TOOL["parameters"], "strict": True}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert chat["parallel_tool_calls"] is False
    assert chat["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "w", "schema": {"type": "object"}, "strict": True}}


def test_history_goes_before_the_new_input_and_instructions_first() -> None:
    call = parse_create({"model": "m", "input": "second", "instructions": "sys"})
    history = [{"type": "message", "role": "user", "content": "first"},
               {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": "one", "annotations": [],
                             "logprobs": []}]}]
    messages = to_chat(call, history)["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert [m["content"] for m in messages] == ["sys", "first", "one", "second"]


def test_instructions_as_items() -> None:
    call = parse_create({"model": "m", "input": "q", "instructions": [
        {"role": "developer", "content": [{"type": "input_text", "text": "Be terse."}]}]})
    assert to_chat(call)["messages"] == [{"role": "developer", "content": "Be terse."},
                                         {"role": "user", "content": "q"}]
    validate("Response", chat_to_response(call, {"choices": [{"finish_reason": "stop",
             "message": {"role": "assistant", "content": "ok"}}]}, "resp_1", 1))
    with pytest.raises(InvalidRequest) as caught:
        parse_create({"model": "m", "input": "q", "instructions": [{"type": "bogus"}]})
    assert caught.value.param == "instructions[0].type"


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "x"}, "model"),
    ({"model": "m"}, "input"),
    ({"model": "m", "input": 3}, "input"),
    ({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"model": "m", "input": "x", "tools": [{"type": "file_search"}]}, "tools[0].type"),
    ({"model": "m", "input": "x", "tool_choice": {"type": "web_search_preview"}},
     "tool_choice"),
    ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "m", "input": "x", "temperature": 3}, "temperature"),
    ({"model": "m", "input": "x", "top_p": "high"}, "top_p"),
    ({"model": "m", "input": "x", "text": {"format": {"type": "grammar"}}}, "text.format.type"),
    ({"model": "m", "input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}},
     "text.format.schema"),
    ({"model": "m", "input": "x", "background": True}, "background"),
    ({"model": "m", "input": "x", "conversation": "conv_1"}, "conversation"),
    ({"model": "m", "input": "x", "prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"model": "m", "input": "x", "top_logprobs": 30}, "top_logprobs"),
    ({"model": "m", "input": "x", "frobnicate": 1}, "frobnicate"),
    ({"model": "m", "input": "x", "stream": "yes"}, "stream"),
])
def test_bad_bodies_name_the_parameter(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_create(body)
    assert caught.value.param == param


@pytest.mark.parametrize(("item", "param"), [
    ({"type": "item_reference", "id": "msg_1"}, "input[0].type"),
    ({"role": "user", "content": [{"type": "input_file", "file_id": "f"}]},
     "input[0].content[0].type"),
    ({"role": "user", "content": [{"type": "input_image", "file_id": "file_1"}]},
     "input[0].content[0].image_url"),
    ({"role": "robot", "content": "hi"}, "input[0].role"),
    ({"type": "function_call", "name": "f", "arguments": "{}"}, "input[0].call_id"),
    ({"type": "function_call_output", "output": "x"}, "input[0].call_id"),
])
def test_bad_items_name_the_item(item: dict[str, Any], param: str) -> None:
    call = parse_create({"model": "m", "input": [item]})
    with pytest.raises(InvalidRequest) as caught:
        to_chat(call)
    assert caught.value.param == param


# --------------------------------------------------------------------------- answer
def test_chat_answer_becomes_a_valid_response() -> None:
    call = parse_create({"model": "m", "input": "hi", "tools": [TOOL], "metadata": {"a": "b"}})
    chat = {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "call_9", "type": "function",
             "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}}]}}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}}
    body = chat_to_response(call, chat, "resp_1", 1_700_000_000)
    validate("Response", body)
    assert body["status"] == "completed"
    assert [item["type"] for item in body["output"]] == ["message", "function_call"]
    assert body["output"][0]["content"][0]["text"] == "Let me look."
    assert body["output"][1]["call_id"] == "call_9"
    assert body["usage"]["input_tokens"] == 7 and body["usage"]["total_tokens"] == 12
    assert body["metadata"] == {"a": "b"} and body["tools"][0]["name"] == "weather"


def test_length_finish_is_incomplete() -> None:
    call = parse_create({"model": "m", "input": "hi", "max_output_tokens": 2})
    chat = {"choices": [{"finish_reason": "length",
                         "message": {"role": "assistant", "content": "a b"}}]}
    body = chat_to_response(call, chat, "resp_1", 1)
    validate("Response", body)
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_interleaved_stream_events_are_complete_ordered_and_valid() -> None:
    call = parse_create({"model": "m", "input": "hi", "tools": [TOOL], "stream": True})
    writer = ResponseEventWriter(call, "resp_1", 1)
    raw = writer.start()
    for chunk in [
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"content": "Check"}),
        _chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                "function": {"name": "weather", "arguments": ""}}]}),
        _chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                                "function": {"name": "weather", "arguments": "{\"ci"}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":\"Oslo\"}"}}]}),
        _chunk({"content": "ing."}),
        _chunk({"tool_calls": [{"index": 1, "function": {"arguments": "ty\":\"Rome\"}"}}]}),
        _chunk({}, "tool_calls"),
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 9}},
    ]:
        raw += writer.feed(chunk)
    raw += writer.finish({"provider": "p"})
    events = sse_events(raw)
    for ev in events:
        validate("ResponseStreamEvent", ev)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    types = [e["type"] for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == "Checking."
    done = {e["item_id"]: e["arguments"] for e in events
            if e["type"] == "response.function_call_arguments.done"}
    assert sorted(done.values()) == ['{"city":"Oslo"}', '{"city":"Rome"}']
    # Every delta names an item that was added and not yet done.
    open_items: set[str] = set()
    for ev in events:
        if ev["type"] == "response.output_item.added":
            open_items.add(ev["item"]["id"])
        elif ev["type"] == "response.output_item.done":
            open_items.remove(ev["item"]["id"])
        elif "item_id" in ev:
            assert ev["item_id"] in open_items, ev
    assert not open_items
    final = events[-1]["response"]
    validate("Response", final)
    assert final["usage"]["output_tokens"] == 9 and final["x_aiproxy"] == {"provider": "p"}
    assert [i["type"] for i in final["output"]] == ["message", "function_call", "function_call"]


def test_failed_stream_event_is_valid() -> None:
    call = parse_create({"model": "m", "input": "hi", "stream": True})
    writer = ResponseEventWriter(call, "resp_1", 1)
    writer.start()
    writer.feed(_chunk({"content": "partial"}))
    events = sse_events(writer.fail(UpstreamUnavailable("boom"), "boom"))
    validate("ResponseStreamEvent", events[0])
    assert events[0]["type"] == "response.failed"
    assert events[0]["response"]["status"] == "failed"
    assert events[0]["response"]["error"] == {"code": "server_error", "message": "boom"}


# --------------------------------------------------------------------------- store
async def test_store_scopes_bounds_and_deletes(tmp_path: Path) -> None:
    now = [1000.0]
    store = ResponseStore(tmp_path, max_entries=2, max_age_s=100, clock=lambda: now[0])
    try:
        for i in range(3):
            now[0] += 1
            await store.put("alice", {"id": f"resp_{i}"}, [{"n": i}])
        assert await store.get("alice", "resp_0") is None  # past max_entries
        stored = await store.get("alice", "resp_2")
        assert stored is not None and stored.conversation == [{"n": 2}]
        assert await store.get("bob", "resp_2") is None  # another key sees nothing
        assert await store.delete("bob", "resp_2") is False
        assert await store.delete("alice", "resp_1") is True
        assert await store.get("alice", "resp_1") is None
        now[0] += 150
        assert await store.get("alice", "resp_2") is None  # past max_age_s
        await store.put("alice", {"id": "resp_new"}, [])
        assert await store.count() == 1  # the write pruned the expired row
    finally:
        await store.close()
    reopened = ResponseStore(tmp_path, clock=lambda: now[0])
    try:
        stored = await reopened.get("alice", "resp_new")  # the file outlives the process
        assert stored is not None and stored.response == {"id": "resp_new"}
    finally:
        await reopened.close()


# --------------------------------------------------------------------------- over HTTP
@pytest.fixture
async def server(api_client: Callable[..., Any]) -> tuple[TestClient, FakeProvider]:
    fake = FakeProvider("fake", models=["m"], cost_per_1k=0.01, text="one two three four")
    client = await api_client([fake], failover={"max_retries": 0})
    return client, fake


def sdk(client: TestClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key="unused", base_url=str(client.make_url("/v1")),
                              max_retries=0)


async def test_create_get_delete_with_the_official_client(
    server: tuple[TestClient, FakeProvider]
) -> None:
    client, fake = server
    api = sdk(client)
    created = await api.responses.create(model="m", input="Say something",
                                         instructions="Be brief.")
    assert created.output_text == "one two three four"
    assert created.status == "completed" and created.usage is not None
    raw = await (await client.post("/v1/responses", json={
        "model": "m", "input": "again"})).json()
    validate("Response", raw)
    assert raw["x_aiproxy"]["provider"] == "fake"
    assert fake.calls[0].body["messages"][0] == {"role": "system", "content": "Be brief."}

    fetched = await api.responses.retrieve(created.id)
    assert fetched.id == created.id and fetched.output_text == created.output_text
    follow = await api.responses.create(model="m", input="More", previous_response_id=created.id)
    assert follow.previous_response_id == created.id
    roles = [(m["role"], m["content"]) for m in fake.calls[-1].body["messages"]]
    # instructions are not carried over (as at OpenAI); the conversation is.
    assert roles == [("user", "Say something"), ("assistant", "one two three four"),
                     ("user", "More")]
    items = await api.responses.input_items.list(follow.id)
    assert [i.type for i in items.data] == ["message", "message", "message"]

    await api.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        await api.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError) as caught:
        await api.responses.create(model="m", input="x", previous_response_id=created.id)
    assert caught.value.body["param"] == "previous_response_id"  # type: ignore[index]


async def test_store_false_keeps_nothing(server: tuple[TestClient, FakeProvider]) -> None:
    client, _ = server
    api = sdk(client)
    created = await api.responses.create(model="m", input="x", store=False)
    with pytest.raises(openai.NotFoundError):
        await api.responses.retrieve(created.id)


async def test_stream_with_the_official_client(server: tuple[TestClient, FakeProvider]) -> None:
    client, _ = server
    api = sdk(client)
    texts = []
    async with api.responses.stream(model="m", input="Say something") as stream:
        async for ev in stream:
            if ev.type == "response.output_text.delta":
                texts.append(ev.delta)
        final = await stream.get_final_response()
    assert "".join(texts) == "one two three four" == final.output_text
    assert final.usage is not None and final.usage.output_tokens == 4
    resp = await client.post("/v1/responses", json={"model": "m", "input": "x", "stream": True})
    events = sse_events(await resp.read())
    for ev in events:
        validate("ResponseStreamEvent", ev)
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["x_aiproxy"]["provider"] == "fake"
    stored = await api.responses.retrieve(events[-1]["response"]["id"])
    assert stored.output_text == "one two three four"


async def test_stream_broken_mid_way_ends_with_response_failed(
    server: tuple[TestClient, FakeProvider]
) -> None:
    client, fake = server
    fake.script(BreakAfter(1))
    resp = await client.post("/v1/responses", json={"model": "m", "input": "x", "stream": True})
    events = sse_events(await resp.read())
    for ev in events:
        validate("ResponseStreamEvent", ev)
    assert events[-1]["type"] == "response.failed"
    assert "response.completed" not in [e["type"] for e in events]


async def test_errors_before_the_answer_are_openai_errors(
    server: tuple[TestClient, FakeProvider]
) -> None:
    client, fake = server
    api = sdk(client)
    with pytest.raises(openai.NotFoundError):
        await api.responses.create(model="nope", input="x")
    with pytest.raises(openai.BadRequestError) as caught:
        await api.responses.create(model="m", input="x",
                                   tools=[{"type": "web_search_preview"}])
    assert caught.value.body["param"] == "tools[0].type"  # type: ignore[index]
    resp = await client.post("/v1/responses", data=b"{")
    assert resp.status == 400
    validate("ErrorResponse", await resp.json())
    fake.script(UpstreamUnavailable("down"))
    resp = await client.post("/v1/responses", json={"model": "m", "input": "x"})
    assert resp.status == 502
    assert not fake.calls or all(c.body.get("messages") for c in fake.calls)


# --------------------------------------------------------------------------- real adapters
@pytest.fixture
async def cloud_node() -> Any:
    """The app around the real Anthropic and Cloudflare adapters, against their wire fakes."""
    from aiohttp.test_utils import TestServer

    from meshnode.api.app import create_app
    from meshnode.config import RoutingConfig, TimeoutsConfig
    from meshnode.config import validate as validate_config
    from meshnode.providers.registry import ProviderContext, build_provider
    from meshnode.routing.router import Router
    from tests.kit.fake_anthropic import API_KEY, FakeAnthropic
    from tests.kit.fake_cloudflare import ACCOUNT_ID, API_TOKEN, FakeCloudflare

    async with FakeAnthropic() as fa, FakeCloudflare() as fc:
        config = validate_config({"providers": {
            "anthropic": {"base_url": fa.url, "credentials": {"api_key": API_KEY},
                          "models": [{"name": "claude", "anthropic_model": "claude-haiku"}]},
            "cloudflare": {"base_url": fc.base_url,
                           "credentials": {"account_id": ACCOUNT_ID, "api_token": API_TOKEN},
                           "models": [{"name": "llama", "cloudflare_model": "@cf/meta/llama"}]},
        }})
        timeouts = TimeoutsConfig(connect_ms=5000, first_byte_ms=20000, total_ms=30000)
        ctx = ProviderContext("node-test", Path("."), timeouts)
        providers = [build_provider(r, ctx) for r in config.resolved_providers()]
        router = Router(RoutingConfig(), ["anthropic", "cloudflare"], providers, "node-test")
        client = TestClient(TestServer(create_app(router, node_id="node-test"), host="127.0.0.1"))
        await client.start_server()
        try:
            yield client, fa, fc
        finally:
            await client.close()


async def test_responses_on_anthropic_and_cloudflare(cloud_node: Any) -> None:
    from tests.kit.fake_anthropic import Reply

    client, fa, _ = cloud_node
    api = sdk(client)
    fa.script(Reply(text="Checking.", tool="get_weather", tool_input={"city": "Oslo"}),
              Reply(text="It is -3C."))
    first = await api.responses.create(model="claude", input="Weather in Oslo?",
                                       instructions="Be brief.", tools=[TOOL])  # type: ignore[list-item]
    validate("Response", first.model_dump(exclude_unset=True))
    assert [o.type for o in first.output] == ["message", "function_call"]
    call = first.output[1]
    assert call.type == "function_call" and call.name == "get_weather"
    assert orjson.loads(call.arguments) == {"city": "Oslo"}
    second = await api.responses.create(
        model="claude", previous_response_id=first.id, tools=[TOOL],  # type: ignore[list-item]
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "-3C"}])
    assert second.output_text == "It is -3C."
    assert fa.violations == []
    assert fa.requests[0]["system"] == "Be brief."
    sent = fa.requests[1]["messages"]
    assert sent[1]["content"][-1]["type"] == "tool_use"
    assert sent[2]["content"][0] == {"type": "tool_result", "tool_use_id": call.call_id,
                                     "content": "-3C"}

    fa.script(Reply(text="streamed from claude"))
    async with api.responses.stream(model="claude", input="hi") as stream:
        final = await stream.get_final_response()
    assert final.output_text == "streamed from claude"

    answer = await api.responses.create(model="llama", input="Say hi")
    assert answer.output_text and answer.model_dump()["x_aiproxy"]["provider"] == "cloudflare"
    async with api.responses.stream(model="llama", input="Say hi") as stream:
        streamed = await stream.get_final_response()
    assert streamed.output_text


# --------------------------------------------------------------------------- Codex-style
PATCH_TOOL = {"type": "custom", "name": "apply_patch", "description": "Edit files.",
              "format": {"type": "grammar", "syntax": "lark",
                         "definition": "start: \"*** Begin Patch\" /(.|\\n)*/"}}
CODEX_BODY: dict[str, Any] = {
    "model": "m", "instructions": "You are a coding agent.", "store": False, "stream": True,
    "tool_choice": "auto", "parallel_tool_calls": False, "prompt_cache_key": "sess-1",
    "reasoning": {"effort": "medium", "summary": "auto"},
    "include": ["reasoning.encrypted_content"],
    "tools": [{"type": "function", "name": "shell", "description": "Run a command",
               "strict": False, "parameters": {"type": "object", "properties": {
                   "command": {"type": "array", "items": {"type": "string"}}},
                   "required": ["command"]}}, PATCH_TOOL],
    "input": [
        {"type": "message", "role": "developer",
         "content": [{"type": "input_text", "text": "<permissions>...</permissions>"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "fix it"}]},
        {"type": "reasoning", "summary": [], "encrypted_content": "gAAAA"},
        {"type": "custom_tool_call", "call_id": "call_p", "name": "apply_patch",
         "input": "*** Begin Patch\n*** End Patch"},
        {"type": "custom_tool_call_output", "call_id": "call_p", "output": "Done!"},
    ],
}


def test_codex_style_request_with_a_custom_tool() -> None:
    call = parse_create(CODEX_BODY)
    chat = to_chat(call)
    patch = chat["tools"][1]["function"]
    assert patch["name"] == "apply_patch"
    assert patch["parameters"]["required"] == ["input"]
    assert "lark grammar" in patch["description"] and "Begin Patch" in patch["description"]
    assert [m["role"] for m in chat["messages"]] == [
        "system", "developer", "user", "assistant", "tool"]
    assert chat["messages"][3]["tool_calls"][0]["function"]["arguments"] == orjson.dumps(
        {"input": "*** Begin Patch\n*** End Patch"}).decode()
    assert chat["messages"][4] == {"role": "tool", "tool_call_id": "call_p", "content": "Done!"}

    writer = ResponseEventWriter(call, "resp_c", 1)
    raw = writer.start()
    patch_args = orjson.dumps({"input": "*** Begin Patch\n+x\n*** End Patch"}).decode()
    raw += writer.feed(_chunk({"tool_calls": [{"index": 0, "id": "call_q", "function": {
        "name": "apply_patch", "arguments": patch_args[:10]}}]}))
    raw += writer.feed(_chunk({"tool_calls": [{"index": 0, "function": {
        "arguments": patch_args[10:]}}]}))
    raw += writer.finish(None, {"prompt_tokens": 5, "completion_tokens": 7})
    events = sse_events(raw)
    for ev in events:
        validate("ResponseStreamEvent", ev)
    kinds = [e["type"] for e in events]
    assert "response.function_call_arguments.delta" not in kinds
    done = next(e for e in events if e["type"] == "response.custom_tool_call_input.done")
    assert done["input"] == "*** Begin Patch\n+x\n*** End Patch"
    final = events[-1]["response"]
    validate("Response", final)
    assert final["output"][0]["type"] == "custom_tool_call"
    assert final["output"][0]["call_id"] == "call_q"

    body = chat_to_response(call, {"choices": [{"finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "tool_calls": [
            {"id": "call_r", "type": "function",
             "function": {"name": "apply_patch", "arguments": patch_args}}]}}]}, "resp_d", 1)
    validate("Response", body)
    assert body["output"][0]["input"] == "*** Begin Patch\n+x\n*** End Patch"
    assert body["tools"][1] == PATCH_TOOL


async def test_chat_bodies_of_the_anthropic_and_cloudflare_adapters_validate(
    cloud_node: Any
) -> None:
    from tests.kit.fake_anthropic import Reply

    client, fa, _ = cloud_node
    for model in ("claude", "llama"):
        if model == "claude":
            fa.script(Reply(text="Checking.", tool="get_weather", tool_input={"city": "Oslo"}),
                      Reply(text="Streamed."))
        chat = {"model": model, "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "function", "function": {
                    "name": "get_weather", "parameters": TOOL["parameters"]}}]}
        resp = await client.post("/v1/chat/completions", json=chat)
        assert resp.status == 200
        validate("CreateChatCompletionResponse", await resp.json())
        resp = await client.post("/v1/chat/completions", json={
            **chat, "stream": True, "stream_options": {"include_usage": True}})
        raw = (await resp.read()).decode()
        chunks = [orjson.loads(b[6:]) for b in raw.split("\n\n")
                  if b.startswith("data: ") and b != "data: [DONE]"]
        assert chunks and raw.endswith("data: [DONE]\n\n")
        for chunk in chunks:
            validate("CreateChatCompletionStreamResponse", chunk)


async def test_thinking_becomes_reasoning_items_and_goes_back_to_anthropic(
    cloud_node: Any
) -> None:
    from tests.kit.fake_anthropic import Reply

    client, fa, _ = cloud_node
    api = sdk(client)
    fa.script(Reply(text="Use a tool.", thinking="Let me think.", tool="get_weather",
                    tool_input={"city": "Oslo"}),
              Reply(text="Done."), Reply(text="Fine.", thinking="Streamed thought."))
    first = await api.responses.create(model="claude", input="Weather?", store=False,
                                       tools=[TOOL])  # type: ignore[list-item]
    raw = first.model_dump(exclude_unset=True)
    validate("Response", raw)
    assert [o["type"] for o in raw["output"]] == ["reasoning", "message", "function_call"]
    reasoning = raw["output"][0]
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Let me think."}]
    assert reasoning["encrypted_content"].startswith("meshnode-thinking:")
    call = raw["output"][2]
    # Codex-style: no store, the whole conversation sent back, reasoning item included.
    replay = [{"role": "user", "content": "Weather?"}, *raw["output"],
              {"type": "function_call_output", "call_id": call["call_id"], "output": "-3C"}]
    await api.responses.create(model="claude", input=replay, store=False,  # type: ignore[arg-type]
                               tools=[TOOL])  # type: ignore[list-item]
    assert fa.violations == []
    turn = fa.requests[1]["messages"][1]["content"]
    assert turn[0]["type"] == "thinking" and turn[0]["thinking"] == "Let me think."
    assert turn[0]["signature"].startswith("sig-")  # the signature Anthropic gave

    resp = await client.post("/v1/responses", json={"model": "claude", "input": "x",
                                                     "stream": True})
    events = sse_events(await resp.read())
    for ev in events:
        validate("ResponseStreamEvent", ev)
    deltas = [e["delta"] for e in events if e["type"] == "response.reasoning_text.delta"]
    assert "".join(deltas) == "Streamed thought."
    final = events[-1]["response"]
    assert final["output"][0]["type"] == "reasoning"
    assert final["output"][0]["encrypted_content"].startswith("meshnode-thinking:")
    assert final["output"][1]["content"][0]["text"] == "Fine."


async def test_a_failed_store_write_still_answers(
    server: tuple[TestClient, FakeProvider], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    from meshnode.api.responses_http import RESPONSE_STORE

    client, _ = server
    store = client.server.app[RESPONSE_STORE]

    def disk_full(*_: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store, "_sync_put", disk_full)
    answer = await sdk(client).responses.create(model="m", input="x")
    assert answer.output_text == "one two three four"
    with pytest.raises(openai.NotFoundError):
        await sdk(client).responses.retrieve(answer.id)
    resp = await client.post("/v1/responses", json={"model": "m", "input": "x", "stream": True})
    assert sse_events(await resp.read())[-1]["type"] == "response.completed"


def test_logprobs_asked_and_carried_both_ways() -> None:
    call = parse_create({"model": "m", "input": "x", "top_logprobs": 2, "stream": True})
    chat = to_chat(call)
    assert (chat["logprobs"], chat["top_logprobs"]) == (True, 2)
    assert to_chat(parse_create({"model": "m", "input": "x",
                                 "include": ["message.output_text.logprobs"]}))["logprobs"]
    assert "logprobs" not in to_chat(parse_create({"model": "m", "input": "x"}))
    entry = {"token": "Hi", "logprob": -0.5, "bytes": [72, 105],
             "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
                              {"token": "Yo", "logprob": -1.5, "bytes": [89, 111]}]}
    body = chat_to_response(call, {"choices": [{"finish_reason": "stop", "logprobs": {
        "content": [entry]}, "message": {"role": "assistant", "content": "Hi"}}]}, "r", 1)
    validate("Response", body)
    assert body["output"][0]["content"][0]["logprobs"] == [entry]
    assert body["top_logprobs"] == 2
    writer = ResponseEventWriter(call, "r", 1)
    raw = writer.start() + writer.feed({"choices": [{"index": 0, "delta": {"content": "Hi"},
                                                     "logprobs": {"content": [entry]}}]})
    raw += writer.finish(None)
    events = sse_events(raw)
    for ev in events:
        validate("ResponseStreamEvent", ev)
    delta = next(e for e in events if e["type"] == "response.output_text.delta")
    assert delta["logprobs"][0]["top_logprobs"][1] == {"token": "Yo", "logprob": -1.5}
    assert events[-1]["response"]["output"][0]["content"][0]["logprobs"] == [entry]


async def test_native_stream_broken_mid_way_ends_with_response_failed() -> None:
    from aiohttp.test_utils import TestServer

    from meshnode.api.app import create_app
    from meshnode.config import RoutingConfig, TimeoutsConfig
    from meshnode.config import validate as validate_config
    from meshnode.providers.registry import ProviderContext, build_provider
    from meshnode.routing.router import Router
    from tests.kit.fake_openai import Behaviour, FakeOpenAI

    async with FakeOpenAI() as upstream:
        config = validate_config({"providers": {"openai": {
            "base_url": upstream.base_url, "credentials": {"api_key": "sk-x"},
            "models": [{"name": "native", "openai_model": "gpt-x"}]}}})
        ctx = ProviderContext("node-test", Path("."), TimeoutsConfig())
        providers = [build_provider(r, ctx) for r in config.resolved_providers()]
        router = Router(RoutingConfig(), ["openai"], providers, "node-test")
        client = TestClient(TestServer(create_app(router, node_id="node-test"), host="127.0.0.1"))
        await client.start_server()
        try:
            upstream.script(Behaviour.reset_after_first())
            resp = await client.post("/v1/responses", json={"model": "native", "input": "x",
                                                            "stream": True})
            events = sse_events(await resp.read())
            for ev in events:
                validate("ResponseStreamEvent", ev)
            assert [e["type"] for e in events] == ["response.created", "response.failed"]
            assert events[1]["sequence_number"] == 1
            assert events[1]["response"]["error"]["code"] == "server_error"
            assert events[1]["response"]["id"] == events[0]["response"]["id"]
            body = await (await client.post("/v1/responses", json={
                "model": "native", "input": "x"})).json()
            validate("Response", body)
            assert body["x_aiproxy"]["provider"] == "openai"
        finally:
            await client.close()


def test_native_events_a_bug_mid_stream_ends_as_a_generic_response_failed() -> None:
    from meshnode.api.responses_http import _NativeEvents
    from meshnode.routing.outcome import Served
    from meshnode.types import ModelOffer, StreamChunk

    offer = ModelOffer(model="native", provider="openai", provider_kind="openai",
                       upstream_model="gpt-x", cost_per_1k_input=0.0, cost_per_1k_output=0.0)
    call = parse_create({"model": "native", "input": "x", "stream": True})
    encoder = _NativeEvents(call, "resp_ours", Served(offer=offer, node="n1", strategy="s"),
                            "req-7")
    upstream = {"id": "resp_theirs", "object": "response", "created_at": 1, "model": "gpt-x",
                "status": "in_progress", "output": []}
    first = sse_events(encoder.feed(StreamChunk({
        "type": "response.created", "sequence_number": 0, "response": upstream})))
    assert first[0]["response"]["id"] == "resp_ours"
    (failed,) = sse_events(encoder.fail(RuntimeError("secret sk-abcdefghijk")))
    assert failed["type"] == "response.failed" and failed["sequence_number"] == 1
    assert failed["response"]["id"] == "resp_ours"
    assert failed["response"]["error"]["code"] == "server_error"
    assert "req-7" in failed["response"]["error"]["message"]
    assert "sk-" not in failed["response"]["error"]["message"]
    assert encoder.final() is None
