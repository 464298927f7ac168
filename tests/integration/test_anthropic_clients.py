"""The Anthropic door with the official `anthropic` client against a real node process, in
front of the fake Anthropic upstream (`claude`) and the fake OpenAI upstream (`gpt`), each in
its own process: a fired stop sequence, `messages.parse` (structured output through
`output_config`), a streamed interleaved tool call, what only Anthropic understands
(cache_control, anthropic-beta, thinking, top_k) passed to Anthropic and dropped elsewhere,
count_tokens and models in Anthropic's shape; and the OpenAI client getting an upstream's
`context_length_exceeded` with its code."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from pydantic import BaseModel

from tests.kit.fake_anthropic import API_KEY, Reply, behaviour_to_json
from tests.kit.fake_openai import Behaviour, FakeOpenAIProcess
from tests.kit.fake_process import FakeServerProcess
from tests.kit.node_proc import NodeProcess

pytestmark = pytest.mark.slow

TOOL = {"name": "get_weather", "description": "Weather in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                         "required": ["city"]}}


class Weather(BaseModel):
    city: str
    temp_c: int


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeServerProcess, FakeOpenAIProcess]]:
    with FakeServerProcess("tests.kit.fake_anthropic") as fa, \
            FakeOpenAIProcess(models=["gpt-fake"]) as fo:
        yield fa, fo


@pytest.fixture(scope="module")
def node(fakes: tuple[FakeServerProcess, FakeOpenAIProcess],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    fa, fo = fakes
    config = {
        "mesh": {"enabled": False, "mdns": False},
        "routing": {"failover": {"max_retries": 0, "cooldown": {"failures": 1000}}},
        "providers": {
            "local": {"enabled": False},
            "anthropic": {"base_url": fa.url, "credentials": {"api_key": API_KEY},
                          "models": [{"name": "claude", "anthropic_model": "claude-haiku"}]},
            "openai": {"base_url": fo.base_url, "credentials": {"api_key": "sk-up"},
                       "models": [{"name": "gpt", "openai_model": "gpt-fake"}]},
        },
    }
    with NodeProcess(config, tmp_path_factory.mktemp("anthropic-door"),
                     node_id="door-node") as proc:
        yield proc


def sdk(node: NodeProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="unused", base_url=node.url, max_retries=0, timeout=30)


def last_anthropic(fa: FakeServerProcess) -> tuple[dict[str, Any], dict[str, str]]:
    recorded = fa.recorded()
    assert recorded["violations"] == []
    return recorded["requests"][-1], {k.lower(): v for k, v in recorded["headers"][-1].items()}


def events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in raw.decode().split("\n\n"):
        if block.strip():
            lines = dict(line.split(": ", 1) for line in block.splitlines())
            out.append((lines["event"], json.loads(lines["data"])))
    return out


def post(node: NodeProcess, path: str, body: dict[str, Any]) -> bytes:
    request = urllib.request.Request(node.url + path, data=json.dumps(body).encode(), headers={
        "Content-Type": "application/json", "anthropic-version": "2023-06-01"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
        return bytes(response.read())


# --------------------------------------------------------------------------- stop sequences
def test_fired_stop_sequence_is_reported(
    node: NodeProcess, fakes: tuple[FakeServerProcess, FakeOpenAIProcess]
) -> None:
    fa, _ = fakes
    fa.script(behaviour_to_json(Reply(text="one two", stop_sequence="END")),
              behaviour_to_json(Reply(text="one two", stop_sequence="END")))
    message = sdk(node).messages.create(
        model="claude", max_tokens=50, stop_sequences=["END"],
        messages=[{"role": "user", "content": "count"}])
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "END")
    assert last_anthropic(fa)[0]["stop_sequences"] == ["END"]
    with sdk(node).messages.stream(model="claude", max_tokens=50, stop_sequences=["END"],
                                   messages=[{"role": "user", "content": "count"}]) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "END")
    plain = sdk(node).messages.create(model="claude", max_tokens=50,
                                      messages=[{"role": "user", "content": "hi"}])
    assert (plain.stop_reason, plain.stop_sequence) == ("end_turn", None)


# --------------------------------------------------------------------------- structured output
def test_messages_parse_on_anthropic_and_on_openai(
    node: NodeProcess, fakes: tuple[FakeServerProcess, FakeOpenAIProcess]
) -> None:
    fa, fo = fakes
    fa.script(behaviour_to_json(Reply(text='{"city": "Oslo", "temp_c": -3}')))
    parsed = sdk(node).messages.parse(model="claude", max_tokens=100, output_format=Weather,
                                      messages=[{"role": "user", "content": "Oslo?"}])
    assert parsed.parsed_output == Weather(city="Oslo", temp_c=-3)
    sent, _ = last_anthropic(fa)
    assert sent["output_config"]["format"]["type"] == "json_schema"
    assert "response_format" not in sent

    fo.reset()
    fo.script(Behaviour.ok(text='{"city": "Rome", "temp_c": 12}', chunks=1))
    parsed = sdk(node).messages.parse(model="gpt", max_tokens=100, output_format=Weather,
                                      messages=[{"role": "user", "content": "Rome?"}])
    assert parsed.parsed_output == Weather(city="Rome", temp_c=12)
    body = fo.requests()[-1]["json"]
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"]["required"] == ["city", "temp_c"]
    assert "output_config" not in body


# --------------------------------------------------------------------------- interleaved tools
def test_streamed_interleaved_tool_calls_never_touch_a_closed_block(
    node: NodeProcess, fakes: tuple[FakeServerProcess, FakeOpenAIProcess]
) -> None:
    _, fo = fakes
    calls = [{"id": "call_a", "type": "function", "function": {
                 "name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}},
             {"id": "call_b", "type": "function", "function": {
                 "name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]
    behaviour = Behaviour.ok(text="Checking both.", tool_calls=calls, interleave_tools=True)
    fo.reset()
    fo.script(behaviour, behaviour)
    body = {"model": "gpt", "max_tokens": 100, "stream": True, "tools": [TOOL],
            "messages": [{"role": "user", "content": "Oslo and Rome?"}]}
    seen = events(post(node, "/v1/messages", body))
    open_blocks: set[int] = set()
    closed: set[int] = set()
    for name, data in seen:
        if name == "content_block_start":
            assert not open_blocks, "one block open at a time"
            open_blocks.add(data["index"])
        elif name == "content_block_delta":
            assert data["index"] in open_blocks and data["index"] not in closed, data
        elif name == "content_block_stop":
            open_blocks.remove(data["index"])
            closed.add(data["index"])
    assert not open_blocks and seen[-1][0] == "message_stop"

    with sdk(node).messages.stream(model="gpt", max_tokens=100, tools=[TOOL],  # type: ignore[list-item]
                                   messages=[{"role": "user", "content": "Oslo and Rome?"}]
                                   ) as stream:
        final = stream.get_final_message()
    uses = [b for b in final.content if b.type == "tool_use"]
    assert [(u.id, u.input) for u in uses] == [("call_a", {"city": "Oslo"}),
                                               ("call_b", {"city": "Rome"})]
    assert "".join(b.text for b in final.content if b.type == "text") == "Checking both."
    assert final.stop_reason == "tool_use"


# --------------------------------------------------------------------------- Anthropic-only
def test_cache_control_beta_thinking_top_k_reach_anthropic_only(
    node: NodeProcess, fakes: tuple[FakeServerProcess, FakeOpenAIProcess]
) -> None:
    fa, fo = fakes
    fa.script(behaviour_to_json(Reply(text="Cached.", thinking="Let me think.")))
    request: dict[str, Any] = dict(
        max_tokens=2000, extra_body={"top_k": 5},
        thinking={"type": "enabled", "budget_tokens": 1024},
        system=[{"type": "text", "text": "Long instructions.",
                 "cache_control": {"type": "ephemeral"}}],
        tools=[{**TOOL, "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "Big document.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Question?"}]}],
        extra_headers={"anthropic-beta": "prompt-caching-2024-07-31,interleaved-thinking",
                       "x-request-id": "client-req-1234"},
    )
    message = sdk(node).messages.create(model="claude", **request)
    assert message.content[0].type == "thinking"
    assert message.content[0].thinking == "Let me think."
    assert message.content[0].signature.startswith("sig-")
    sent, headers = last_anthropic(fa)
    assert sent["system"] == [{"type": "text", "text": "Long instructions.",
                               "cache_control": {"type": "ephemeral"}}]
    assert sent["tools"][0]["cache_control"] == {"type": "ephemeral"}
    assert sent["messages"][0]["content"][0] == {
        "type": "text", "text": "Big document.", "cache_control": {"type": "ephemeral"}}
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert sent["top_k"] == 5
    assert headers["anthropic-beta"] == "prompt-caching-2024-07-31,interleaved-thinking"
    assert headers["x-request-id"] == "client-req-1234"  # the client's id travels upstream

    # The signed thinking block goes back to Anthropic in the next turn.
    fa.script(behaviour_to_json(Reply(text="Done.")))
    sdk(node).messages.create(model="claude", max_tokens=2000, messages=[
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": message.content},  # type: ignore[typeddict-item]
        {"role": "user", "content": "And?"}])
    sent, _ = last_anthropic(fa)
    assert sent["messages"][1]["content"][0]["type"] == "thinking"
    assert sent["messages"][1]["content"][0]["signature"] == message.content[0].signature

    fo.reset()
    sdk(node).messages.create(model="gpt", **request)
    body = fo.requests()[-1]["json"]
    text = json.dumps(body)
    for absent in ("cache_control", "thinking", "anthropic_beta", "top_k"):
        assert absent not in text, absent
    assert "dropped" in node.logs() and "Anthropic-only" in node.logs()


# --------------------------------------------------------------------------- count, models
def test_count_tokens_unknown_model_and_models_in_anthropic_shape(node: NodeProcess) -> None:
    client = sdk(node)
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="nope", messages=[{"role": "user", "content": "x"}])
    assert client.messages.count_tokens(
        model="claude", messages=[{"role": "user", "content": "hello " * 20}]).input_tokens > 5
    models = client.models.list()
    ids = {m.id for m in models.data}
    assert {"claude", "gpt"} <= ids
    assert all(m.type == "model" and m.display_name for m in models.data)
    assert client.models.retrieve("claude").id == "claude"
    plain = openai.OpenAI(base_url=node.base_url, api_key="x", max_retries=0).models.list()
    assert {m.id for m in plain.data} >= {"claude", "gpt"}  # the OpenAI shape is unchanged

