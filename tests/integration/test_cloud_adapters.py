"""The cloud adapters end to end: the official `openai` and `anthropic` clients talk to a real
HTTP server (the node's app, built from a config the way the node builds it: config ->
providers -> router -> app) on loopback, which talks to the wire-exact vendor fakes.

Covers: each adapter stream and non-stream through the OpenAI API; failover across vendors
(Anthropic 529 -> Cloudflare 429 -> OpenAI) with one clean answer; a stream broken after its
first chunk ends with an error event, no [DONE] and no duplicated text; the Anthropic door with
the `anthropic` client routed to a non-Anthropic provider.

The same cases against a real `meshnode run` process started from the seed's full example are
in `test_cloud_nodes.py`; this in-process build (which mirrors what the node does) keeps the
failures debuggable in one process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest
from aiohttp import web

from meshnode.api.app import create_app
from meshnode.config import validate
from meshnode.providers.registry import ProviderContext, build_providers
from meshnode.routing.router import Router
from tests.kit import fake_anthropic as fa
from tests.kit import fake_cloudflare as fc
from tests.kit.fake_openai import Behaviour, FakeOpenAI


@dataclass
class Mesh:
    url: str
    anthropic: fa.FakeAnthropic
    cloudflare: fc.FakeCloudflare
    openai: FakeOpenAI

    def oa(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(api_key="unused", base_url=self.url + "/v1", max_retries=0)

    def an(self) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(api_key="unused", base_url=self.url, max_retries=0)


def node_config(a: fa.FakeAnthropic, c: fc.FakeCloudflare, o: FakeOpenAI) -> dict[str, Any]:
    """The seed's provider layout, pointed at the fakes (fake credentials)."""
    return {
        "providers": {
            "anthropic": {"priority": 1, "base_url": a.url,
                          "credentials": {"api_key": fa.API_KEY},
                          "models": [{"name": "chat", "anthropic_model": "claude-3-5-haiku",
                                      "cost_per_1k_input": 0.0008, "cost_per_1k_output": 0.004},
                                     {"name": "claude", "anthropic_model": "claude-sonnet-4"}]},
            "cloudflare": {"priority": 2, "base_url": c.base_url,
                           "credentials": {"account_id": fc.ACCOUNT_ID,
                                           "api_token": fc.API_TOKEN},
                           "models": [{"name": "chat",
                                       "cloudflare_model": "@cf/meta/llama-3.1-8b-instruct",
                                       "cost_per_1k_tokens": 0.001},
                                      {"name": "llama", "cloudflare_model": "@cf/meta/llama"}]},
            "openai": {"priority": 3, "base_url": o.base_url,
                       "credentials": {"api_key": "sk-openai-test-key"},
                       "models": [{"name": "chat", "openai_model": "gpt-4o-mini",
                                   "cost_per_1k_tokens": 0.005},
                                  {"name": "gpt", "openai_model": "gpt-4o"}]},
        },
        "routing": {
            "strategy": "availability",
            "failover": {"fallback_chain": ["anthropic", "cloudflare", "openai"],
                         "backoff": {"initial_ms": 1, "max_ms": 2, "jitter": 0.0}},
        },
    }


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    async with fa.FakeAnthropic() as a, fc.FakeCloudflare() as c, FakeOpenAI(
        require_key="sk-openai-test-key"
    ) as o:
        config = validate(node_config(a, c, o))
        providers = build_providers(
            config, ProviderContext("node-it", tmp_path, config.routing.timeouts))
        router = Router(config.routing, config.fallback_chain(), providers, "node-it")
        app = create_app(router, node_id="node-it", server=config.server,
                         timeouts=config.routing.timeouts)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            yield Mesh(f"http://127.0.0.1:{port}", a, c, o)
        finally:
            await runner.cleanup()
        assert a.violations == [] and c.violations == []


MESSAGES = [{"role": "user", "content": "hello mesh"}]


@pytest.mark.parametrize(("model", "provider"), [
    ("claude", "anthropic"), ("llama", "cloudflare"), ("gpt", "openai")])
async def test_openai_client_through_each_adapter(mesh: Mesh, model: str, provider: str) -> None:
    client = mesh.oa()
    raw = await client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES)  # type: ignore[arg-type]
    answer = raw.parse()
    assert raw.headers["x-aiproxy-provider"] == provider
    assert answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    x = (answer.model_extra or {})["x_aiproxy"]
    assert x["provider"] == provider and x["model"] == model
    assert x.get("cost_estimated", False) is (provider == "cloudflare")

    stream = await client.chat.completions.create(
        model=model, messages=MESSAGES, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True})
    text, finish, usage, last_extra = "", None, None, None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
        last_extra = chunk.model_extra
    assert text == answer.choices[0].message.content
    assert finish == "stop" and usage is not None and usage.completion_tokens > 0
    assert (last_extra or {})["x_aiproxy"]["provider"] == provider


async def test_failover_across_vendors_gives_one_clean_answer(mesh: Mesh) -> None:
    mesh.anthropic.script(fa.Fail(529))
    mesh.cloudflare.script(fc.Fail(429, retry_after=1))
    answer = await mesh.oa().chat.completions.create(
        model="chat", messages=MESSAGES)  # type: ignore[arg-type]
    x = (answer.model_extra or {})["x_aiproxy"]
    assert [(a["provider"], a["outcome"] == "ok") for a in x["attempts"]] == [
        ("anthropic", False), ("cloudflare", False), ("openai", True)]
    assert x["provider"] == "openai"
    assert len(answer.choices) == 1 and answer.choices[0].message.content
    assert len(mesh.openai.requests) == 1

    # the same for a stream: nothing reaches the client before the route is committed
    mesh.anthropic.script(fa.Fail(529))
    mesh.cloudflare.script(fc.Fail(500))
    stream = await mesh.oa().chat.completions.create(
        model="chat", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(pieces) == answer.choices[0].message.content


async def _raw_stream(mesh: Mesh, body: dict[str, Any], path: str) -> bytes:
    import aiohttp
    async with aiohttp.ClientSession() as session, session.post(
        mesh.url + path, data=orjson.dumps(body),
        headers={"content-type": "application/json"},
    ) as response:
        assert response.status == 200
        return await response.read()


async def test_stream_broken_after_first_chunk(mesh: Mesh) -> None:
    mesh.anthropic.script(fa.Reply(text="alpha beta gamma delta", break_after=1))
    raw = await _raw_stream(
        mesh, {"model": "claude", "messages": MESSAGES, "stream": True}, "/v1/chat/completions")
    events = [e for e in raw.decode().split("\n\n") if e]
    assert b"[DONE]" not in raw
    assert '"error"' in events[-1]
    texts = [orjson.loads(e.removeprefix("data: "))["choices"][0]["delta"].get("content", "")
             for e in events[:-1]]
    assert "".join(texts) == "alpha "  # once, not replayed from another provider
    assert len(mesh.anthropic.requests) == 1 and mesh.cloudflare.requests == []
    # the official client surfaces it as an error, after the text it got
    mesh.cloudflare.script(fc.Reply(text="one two three", break_after=1))
    stream = await mesh.oa().chat.completions.create(
        model="llama", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    got: list[str] = []
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            if chunk.choices:
                got.append(chunk.choices[0].delta.content or "")
    assert "".join(got) == "one "


async def test_anthropic_client_through_the_door_to_openai(mesh: Mesh) -> None:
    client = mesh.an()
    message = await client.messages.create(
        model="gpt", max_tokens=64, system="Be brief.",
        messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason == "end_turn"
    assert (message.model_extra or {})["x_aiproxy"]["provider"] == "openai"
    sent = mesh.openai.requests[-1].json
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    async with client.messages.stream(
        model="gpt", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == message.content[0].text
    assert final.usage.output_tokens > 0


async def test_anthropic_client_tool_round_trip_through_openai(mesh: Mesh) -> None:
    calls = [{"id": "call_1", "type": "function",
              "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]
    mesh.openai.script(Behaviour.ok(text="", tool_calls=calls))
    tool = {"name": "weather", "description": "Weather",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
    client = mesh.an()
    first = await client.messages.create(
        model="gpt", max_tokens=64, tools=[tool],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "Oslo?"}])
    assert first.stop_reason == "tool_use"
    use = next(b for b in first.content if b.type == "tool_use")
    assert (use.id, use.name, use.input) == ("call_1", "weather", {"city": "Oslo"})
    second = await client.messages.create(
        model="gpt", max_tokens=64, tools=[tool],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "Oslo?"},
                  {"role": "assistant", "content": first.content},  # type: ignore[typeddict-item]
                  {"role": "user", "content": [
                      {"type": "tool_result", "tool_use_id": "call_1", "content": "-3C"}]}])
    assert second.content[0].type == "text"
    sent = mesh.openai.requests[-1].json["messages"]
    assert sent[1]["tool_calls"][0]["id"] == "call_1"
    assert sent[2] == {"role": "tool", "tool_call_id": "call_1", "content": "-3C"}
