"""The Responses API with the official clients against real node processes: `responses.create`
(plain, tools round trip, json_schema via `responses.parse`, stream, `previous_response_id`
across two calls) on a local model, on a cloud fake and through a peer; and openai-node's
`responses.create` where npm can install it.

Two nodes: `b` serves the local builtin `tiny-gpt2` (random weights: its text is noise, so
only shapes are asserted) and `cloud` through the fake OpenAI upstream (scripted answers);
`a` serves nothing itself and reaches both through the mesh (gRPC to `b`).
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from pydantic import BaseModel

from tests.kit.fake_openai import Behaviour, FakeOpenAIProcess
from tests.kit.node_proc import NodeProcess
from tests.kit.openai_node import openai_node_folder
from tests.kit.openai_schemas import validate
from tests.kit.wait import wait_for_sync

pytestmark = pytest.mark.slow

SECRET = "responses-test-" + os.urandom(6).hex()
TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"], "additionalProperties": False},
        "strict": True}


class Weather(BaseModel):
    city: str
    temp_c: int


def _mesh(node_id: str) -> dict[str, Any]:
    return {"mdns": False, "secret": SECRET, "probe_interval_ms": 250,
            "probe_timeout_ms": 250, "gossip_interval_ms": 200}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAIProcess]:
    with FakeOpenAIProcess(models=["gpt-fake"]) as fake:
        yield fake


@pytest.fixture(scope="module")
def nodes(upstream: FakeOpenAIProcess, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    workdir = tmp_path_factory.mktemp("responses")
    config_b = {
        "mesh": _mesh("b"),
        "providers": {
            "local": {"device": "cpu", "models": [
                {"name": "tiny-gpt2", "builtin": "tiny-gpt2", "kind": "chat"}]},
            "up": {"type": "openai_compatible", "base_url": upstream.base_url,
                   "credentials": {"api_key": "sk-up"},
                   "models": [{"name": "cloud", "openai_model": "gpt-fake",
                               "cost_per_1k_tokens": 0.001}]},
            # type openai speaks the Responses API: /v1/responses passes through natively
            "openai": {"base_url": upstream.base_url, "credentials": {"api_key": "sk-up"},
                       "models": [{"name": "native", "openai_model": "gpt-fake",
                                   "cost_per_1k_tokens": 0.001}]},
        },
    }
    config_a = {"mesh": _mesh("a"), "providers": {"local": {"enabled": False}}}
    with NodeProcess(config_b, workdir, name="b", grpc_listen="127.0.0.1:0", node_id="resp-b",
                     startup_timeout=120) as b:
        wait_for_sync(lambda: "MESHNODE_GRPC" in b.refresh_announcements(),
                      "b announces gRPC")
        wait_for_sync(lambda: _get(b, "/health/ready")["status"] == "ready",
                      "b's local model is loaded", timeout=240)
        with NodeProcess(config_a, workdir, name="a", grpc_listen="127.0.0.1:0",
                         node_id="resp-a", seeds=[b.announced["MESHNODE_GRPC"]]) as a:
            wait_for_sync(lambda: {"tiny-gpt2", "cloud", "native"} <= {
                m["id"] for m in _get(a, "/v1/models")["data"]}, "a sees b's models")
            yield a, b


def _get(node: NodeProcess, path: str) -> Any:
    with urllib.request.urlopen(node.url + path, timeout=10) as response:  # noqa: S310
        return json.loads(response.read())


@pytest.fixture
def fake(upstream: FakeOpenAIProcess) -> FakeOpenAIProcess:
    upstream.reset()
    return upstream


def client(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.base_url, api_key="sk-none", max_retries=0, timeout=60)


def _via(nodes: tuple[NodeProcess, NodeProcess], where: str) -> NodeProcess:
    return nodes[0] if where == "peer" else nodes[1]


# --------------------------------------------------------------------------- plain and two turns
@pytest.mark.parametrize(("where", "model"), [
    ("local", "tiny-gpt2"), ("cloud", "cloud"), ("peer", "tiny-gpt2"), ("peer", "cloud")])
def test_plain_and_previous_response_id(
    nodes: tuple[NodeProcess, NodeProcess], fake: FakeOpenAIProcess, where: str, model: str
) -> None:
    node = _via(nodes, where)
    api = client(node)
    first = api.responses.create(model=model, input="My name is Ada.", max_output_tokens=8,
                                 instructions="Answer briefly.")
    assert first.status in ("completed", "incomplete")
    assert first.output and first.output[0].type == "message"
    assert isinstance(first.output_text, str) and first.usage is not None
    raw = first.model_dump()
    served_by = raw["x_aiproxy"]
    assert served_by["node"] == "resp-b"  # b served it, directly or as a's peer
    if model == "cloud":
        assert first.output_text == "Hello from the fake OpenAI server."
    second = api.responses.create(model=model, input="What is my name?", max_output_tokens=8,
                                  previous_response_id=first.id)
    assert second.previous_response_id == first.id
    if model == "cloud":
        # The upstream got the whole conversation, the first turn's answer included.
        messages = fake.requests()[-1]["json"]["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant", "user"]
        assert messages[1]["content"] == first.output_text
    assert api.responses.retrieve(second.id).id == second.id


# --------------------------------------------------------------------------- stream
# The SDK's own parsed-output union warns while dumping its events (not our wire).
@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning")
@pytest.mark.parametrize(("where", "model"), [
    ("local", "tiny-gpt2"), ("cloud", "cloud"), ("peer", "tiny-gpt2")])
def test_stream_events_are_valid_and_complete(
    nodes: tuple[NodeProcess, NodeProcess], where: str, model: str
) -> None:
    api = client(_via(nodes, where))
    seen: list[dict[str, Any]] = []
    with api.responses.stream(model=model, input="Tell me a story",
                              max_output_tokens=6) as stream:
        for event in stream:
            seen.append(event.model_dump(exclude_unset=True))
    # tiny-gpt2 never says EOS: its answers end at max_output_tokens, `response.incomplete`
    # (as at OpenAI; the SDK's get_final_response() is for `response.completed` only).
    final = seen[-1]["response"]
    for event in seen:
        validate("ResponseStreamEvent", event)
    kinds = [e["type"] for e in seen]
    assert kinds[:3] == ["response.created", "response.in_progress",
                         "response.output_item.added"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e["sequence_number"] for e in seen] == list(range(len(seen)))
    text = "".join(e["delta"] for e in seen if e["type"] == "response.output_text.delta")
    assert text == final["output"][0]["content"][0]["text"]
    assert final["usage"]["output_tokens"] >= 1
    assert final["x_aiproxy"]["node"] == "resp-b"
    if model == "cloud":
        assert kinds[-1] == "response.completed"
        assert text == "Hello from the fake OpenAI server."


# --------------------------------------------------------------------------- tools round trip
@pytest.mark.parametrize("where", ["cloud", "peer"])
def test_tools_round_trip_on_the_cloud_fake(
    nodes: tuple[NodeProcess, NodeProcess], fake: FakeOpenAIProcess, where: str
) -> None:
    fake.script(Behaviour.ok(tool_calls=[{"id": "call_w1", "type": "function", "function": {
        "name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]),
        Behaviour.ok(text="It is -3C in Oslo."))
    api = client(_via(nodes, where))
    first = api.responses.create(model="cloud", input="Weather in Oslo?", tools=[TOOL],  # type: ignore[list-item]
                                 tool_choice="required")
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": "Oslo"}
    second = api.responses.create(
        model="cloud", previous_response_id=first.id, tools=[TOOL],  # type: ignore[list-item]
        input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                "output": "-3C"}])
    assert second.output_text == "It is -3C in Oslo."
    sent = fake.requests()
    assert sent[0]["json"]["tools"][0]["function"]["name"] == "get_weather"
    assert sent[0]["json"]["tool_choice"] == "required"
    messages = sent[1]["json"]["messages"]
    assert messages[1]["tool_calls"][0]["id"] == "call_w1"
    assert messages[2] == {"role": "tool", "tool_call_id": "call_w1", "content": "-3C"}


def test_tools_on_the_local_model(nodes: tuple[NodeProcess, NodeProcess]) -> None:
    """tiny-gpt2 is random, but tool_choice=required is enforced by constrained decoding: the
    answer is a function call with arguments that parse (the local worker's grammar)."""
    api = client(nodes[1])
    answer = api.responses.create(model="tiny-gpt2", input="Weather in Oslo?",
                                  tools=[TOOL], tool_choice="required",  # type: ignore[list-item]
                                  max_output_tokens=64)
    calls = [item for item in answer.output if item.type == "function_call"]
    if answer.status == "completed":
        assert calls and calls[0].name == "get_weather"
        assert isinstance(json.loads(calls[0].arguments), dict)
    followup = api.responses.create(
        model="tiny-gpt2", previous_response_id=answer.id, max_output_tokens=4,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id if calls else "x",
                "output": "-3C"}] if calls else "ok")
    assert followup.status in ("completed", "incomplete")


# --------------------------------------------------------------------------- json_schema
@pytest.mark.parametrize("where", ["cloud", "peer"])
def test_json_schema_with_responses_parse(
    nodes: tuple[NodeProcess, NodeProcess], fake: FakeOpenAIProcess, where: str
) -> None:
    fake.script(Behaviour.ok(text='{"city": "Oslo", "temp_c": -3}', chunks=1))
    api = client(_via(nodes, where))
    parsed = api.responses.parse(model="cloud", input="Weather in Oslo as JSON",
                                 text_format=Weather)
    assert parsed.output_parsed == Weather(city="Oslo", temp_c=-3)
    sent = fake.requests()[-1]["json"]["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["name"] == "Weather"
    assert sent["json_schema"]["schema"]["required"] == ["city", "temp_c"]


# --------------------------------------------------------------------------- errors
def test_unsupported_tool_is_a_400_naming_it(nodes: tuple[NodeProcess, NodeProcess]) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(nodes[1]).responses.create(model="cloud", input="x",
                                          tools=[{"type": "web_search"}])  # type: ignore[list-item]
    assert caught.value.body["param"] == "tools[0].type"  # type: ignore[index]


# --------------------------------------------------------------------------- openai-node
NODE_SCRIPT = r"""
import OpenAI from "openai";
const client = new OpenAI({ baseURL: process.env.BASE_URL, apiKey: "sk-none", maxRetries: 0 });
const plain = await client.responses.create({ model: "cloud", input: "hi" });
const stream = await client.responses.create({ model: "cloud", input: "hi", stream: true });
const types = [];
let text = "";
for await (const event of stream) {
  types.push(event.type);
  if (event.type === "response.output_text.delta") text += event.delta;
}
const next = await client.responses.create({ model: "cloud", input: "again",
                                             previous_response_id: plain.id });
console.log(JSON.stringify({ plain: plain.output_text, id: plain.id, types, text,
                             previous: next.previous_response_id }));
"""


@pytest.fixture(scope="module")
def openai_node_kit(request: pytest.FixtureRequest,
                    tmp_path_factory: pytest.TempPathFactory) -> Path:
    return openai_node_folder(request, tmp_path_factory)


def test_openai_node_responses_create(
    nodes: tuple[NodeProcess, NodeProcess], openai_node_kit: Path
) -> None:
    script = openai_node_kit / "responses_check.mjs"
    script.write_text(NODE_SCRIPT)
    done = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "BASE_URL": nodes[0].base_url}, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["plain"] == "Hello from the fake OpenAI server."
    assert result["text"] == result["plain"]
    assert result["types"][0] == "response.created"
    assert result["types"][-1] == "response.completed"
    assert result["previous"] == result["id"]


# --------------------------------------------------------------------------- conformance
def _post(node: NodeProcess, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    request = urllib.request.Request(node.base_url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _data_events(raw: bytes) -> list[dict[str, Any]]:
    out = []
    for block in raw.decode().split("\n\n"):
        if block.startswith("data: ") and block != "data: [DONE]":
            out.append(json.loads(block[len("data: "):]))
    return out


@pytest.mark.parametrize(("where", "model"), [
    ("local", "tiny-gpt2"), ("cloud", "cloud"), ("peer", "tiny-gpt2"), ("peer", "cloud")])
def test_chat_and_completion_bodies_validate_against_openai_schemas(
    nodes: tuple[NodeProcess, NodeProcess], where: str, model: str
) -> None:
    node = _via(nodes, where)
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    status, body = _post(node, "/chat/completions", chat)
    assert status == 200, body
    validate("CreateChatCompletionResponse", json.loads(body))
    status, body = _post(node, "/chat/completions", {
        **chat, "stream": True, "stream_options": {"include_usage": True}})
    chunks = _data_events(body)
    assert chunks and body.endswith(b"data: [DONE]\n\n")
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    if model == "tiny-gpt2":  # the fake upstream serves chat only
        status, body = _post(node, "/completions", {"model": model, "prompt": "Once",
                                                    "max_tokens": 3})
        assert status == 200, body
        validate("CreateCompletionResponse", json.loads(body))
    status, body = _post(node, "/chat/completions", {**chat, "temperature": 9})
    assert status == 400
    validate("ErrorResponse", json.loads(body))
    validate("ListModelsResponse", _get(node, "/v1/models"))


# --------------------------------------------------------------------------- OpenAI Agents SDK
@pytest.mark.parametrize("where", ["cloud", "peer"])
async def test_openai_agents_sdk_runs_a_tool_loop_and_a_typed_output(
    nodes: tuple[NodeProcess, NodeProcess], fake: FakeOpenAIProcess, where: str
) -> None:
    agents = pytest.importorskip("agents", reason="openai-agents is in the dev extra")
    agents.set_tracing_disabled(True)  # never reach OpenAI's tracing endpoint
    api = openai.AsyncOpenAI(base_url=_via(nodes, where).base_url, api_key="sk-none",
                             max_retries=0)
    model = agents.OpenAIResponsesModel(model="cloud", openai_client=api)
    asked: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        asked.append(city)
        return f"-3C in {city}"

    fake.script(Behaviour.ok(tool_calls=[{"id": "call_ag1", "type": "function", "function": {
        "name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]),
        Behaviour.ok(text="It is -3C in Oslo."))
    agent = agents.Agent(name="weather", instructions="Use the tool.", tools=[get_weather],
                         model=model)
    result = await agents.Runner.run(agent, "Weather in Oslo?")
    assert asked == ["Oslo"]
    assert result.final_output == "It is -3C in Oslo."
    second = fake.requests()[-1]["json"]["messages"]
    assert second[-1] == {"role": "tool", "tool_call_id": "call_ag1", "content": "-3C in Oslo"}

    fake.script(Behaviour.ok(text='{"city": "Oslo", "temp_c": -3}', chunks=3))
    typed = agents.Agent(name="typed", instructions="Answer as JSON.", output_type=Weather,
                         model=model)
    streamed = agents.Runner.run_streamed(typed, "Oslo?")
    async for _ in streamed.stream_events():
        pass
    assert streamed.final_output == Weather(city="Oslo", temp_c=-3)
    assert fake.requests()[-1]["json"]["response_format"]["type"] == "json_schema"


# --------------------------------------------------------------------------- native pass-through
@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning")
@pytest.mark.parametrize("where", ["cloud", "peer"])
def test_openai_upstream_is_served_natively(
    nodes: tuple[NodeProcess, NodeProcess], fake: FakeOpenAIProcess, where: str
) -> None:
    api = client(_via(nodes, where))
    first = api.responses.create(model="native", input="Hi there", instructions="Be kind.",
                                 include=["reasoning.encrypted_content"])
    raw = first.model_dump(exclude_unset=True)
    validate("Response", raw)
    assert first.output_text == "Hello from the fake OpenAI server."
    assert [o["type"] for o in raw["output"]] == ["reasoning", "message"]
    assert raw["model"] == "native" and raw["id"].startswith("resp_")
    assert raw["id"] != "resp_fake1" and raw["x_aiproxy"]["node"] == "resp-b"
    sent = fake.requests()[-1]
    assert sent["path"] == "/v1/responses"
    assert sent["json"]["store"] is False and sent["json"]["model"] == "gpt-fake"
    assert sent["json"]["instructions"] == "Be kind."
    assert first.usage is not None and first.usage.output_tokens > 0

    second = api.responses.create(model="native", input="Again",
                                  previous_response_id=first.id,
                                  include=["reasoning.encrypted_content"])
    assert second.previous_response_id == first.id
    items = fake.requests()[-1]["json"]["input"]
    # The whole conversation, stateless: OpenAI's own reasoning item (encrypted) goes back.
    assert [i.get("type", "message") for i in items] == [
        "message", "reasoning", "message", "message"]
    assert items[1]["encrypted_content"].startswith("gAAAA")
    assert "id" not in items[2]

    seen = []
    with api.responses.stream(model="native", input="Stream it") as stream:
        for event in stream:
            seen.append(event.model_dump(exclude_unset=True))
        final = stream.get_final_response()
    for event in seen:
        validate("ResponseStreamEvent", event)
    assert seen[-1]["type"] == "response.completed"
    assert final.output_text == "Hello from the fake OpenAI server."
    assert seen[-1]["response"]["id"] == seen[0]["response"]["id"] == final.id
    assert seen[-1]["response"]["x_aiproxy"]["provider"] == ("mesh" if where == "peer"
                                                             else "openai")
    assert api.responses.retrieve(final.id).output_text == final.output_text
