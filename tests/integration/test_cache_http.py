"""The response cache through the node's HTTP app, with the official `openai` client, in front
of the real OpenAI-compatible adapter and the wire-exact fake OpenAI server on loopback.

The app is built the way the node builds it (config -> providers -> router -> app, the cache
installed under `CACHE`). `test_cache.py` runs the headline cases against a real node process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from meshnode.api.app import create_app
from meshnode.api.state import CACHE
from meshnode.cache.service import ResponseCache
from meshnode.config import validate
from meshnode.observability.metrics import Metrics
from meshnode.providers.registry import ProviderContext, build_providers
from meshnode.routing.router import Router
from tests.kit.fake_openai import Behaviour, FakeOpenAI

MESSAGES: Any = [{"role": "user", "content": "say something deterministic"}]


@dataclass
class Node:
    url: str
    upstream: FakeOpenAI

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(api_key="unused", base_url=self.url + "/v1", max_retries=0)

    def calls(self, path: str = "/v1/chat/completions") -> list[Any]:
        return [r for r in self.upstream.requests if r.path == path]


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with FakeOpenAI() as upstream:
        config = validate({
            "providers": {"openai": {
                "base_url": upstream.base_url, "credentials": {"api_key": "sk-test"},
                "models": [{"name": "gpt", "openai_model": "gpt-4o", "cost_per_1k_tokens": 0.01},
                           {"name": "emb", "openai_model": "text-embedding-3-small",
                            "kind": "embedding", "cost_per_1k_tokens": 0.0001}]}},
        })
        providers = build_providers(
            config, ProviderContext("node-c", tmp_path, config.routing.timeouts))
        router = Router(config.routing, config.fallback_chain(), providers, "node-c")
        metrics = Metrics()
        app = create_app(router, node_id="node-c", server=config.server,
                         timeouts=config.routing.timeouts, metrics=metrics)
        app[CACHE] = ResponseCache(config.cache, node_id="node-c", registry=metrics.registry)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            yield Node(f"http://127.0.0.1:{port}", upstream)
        finally:
            await runner.cleanup()


def aiproxy(obj: Any) -> dict[str, Any]:
    return (obj.model_extra or {})["x_aiproxy"]


async def test_same_deterministic_request_twice_second_is_a_free_hit(node: Node) -> None:
    client = node.client()
    first = await client.chat.completions.create(model="gpt", messages=MESSAGES, temperature=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt", messages=MESSAGES, temperature=0)
    second = raw.parse()
    assert len(node.calls()) == 1
    assert aiproxy(first)["cost"] > 0 and "cache" not in aiproxy(first)
    x = aiproxy(second)
    assert x["cache"] == "hit" and x["cost"] == 0 and x["provider"] == "cache"
    assert x["cached_provider"] == "openai"
    assert raw.headers["x-aiproxy-cost"] == "0.00000000"
    assert raw.headers["x-aiproxy-provider"] == "cache"
    assert second.choices[0].message.content == first.choices[0].message.content
    assert second.usage == first.usage


async def test_sampling_without_opt_in_goes_upstream_every_time(node: Node) -> None:
    client = node.client()
    for _ in range(2):
        answer = await client.chat.completions.create(
            model="gpt", messages=MESSAGES, temperature=0.7)
        assert "cache" not in aiproxy(answer)
    assert len(node.calls()) == 2


async def test_opt_in_and_bypass_by_body_and_header(node: Node) -> None:
    client = node.client()
    await client.chat.completions.create(model="gpt", messages=MESSAGES, temperature=0.7,
                                         extra_body={"cache": True})
    hit = await client.chat.completions.create(model="gpt", messages=MESSAGES, temperature=0.7,
                                               extra_body={"cache": True})
    assert aiproxy(hit)["cache"] == "hit"
    refreshed = await client.chat.completions.create(
        model="gpt", messages=MESSAGES, temperature=0.7, extra_body={"cache": True},
        extra_headers={"Cache-Control": "no-cache"})
    off = await client.chat.completions.create(model="gpt", messages=MESSAGES, temperature=0,
                                               extra_body={"cache": False})
    assert "cache" not in aiproxy(refreshed) and "cache" not in aiproxy(off)
    calls = node.calls()
    assert len(calls) == 3
    # Our field is never forwarded: a real OpenAI rejects unknown parameters.
    assert all("cache" not in c.json for c in calls)


async def test_cached_stream_is_a_well_formed_stream_for_the_openai_client(node: Node) -> None:
    node.upstream.script(Behaviour.ok(text="one two three four five"))
    client = node.client()

    async def streamed(**kw: Any) -> tuple[str, list[Any]]:
        chunks = [c async for c in await client.chat.completions.create(
            model="gpt", messages=MESSAGES, temperature=0, stream=True, **kw)]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, chunks

    live_text, _ = await streamed()
    text, chunks = await streamed()
    assert text == live_text == "one two three four five"
    assert len(node.calls()) == 1
    x = aiproxy(chunks[-1])
    assert x["cache"] == "hit" and x["cost"] == 0
    assert chunks[-1].choices[0].finish_reason == "stop"

    # With usage asked: the usage chunk comes last and carries x_aiproxy.
    text, chunks = await streamed(stream_options={"include_usage": True})
    assert text == live_text
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    assert aiproxy(chunks[-1])["cache"] == "hit"

    # And a non-stream request for the same thing is served from the streamed answer.
    whole = await client.chat.completions.create(model="gpt", messages=MESSAGES, temperature=0)
    assert whole.choices[0].message.content == live_text
    assert aiproxy(whole)["cache"] == "hit"
    assert len(node.calls()) == 1


async def test_raw_sse_of_a_cached_stream_ends_with_done(node: Node) -> None:
    body = {"model": "gpt", "messages": MESSAGES, "temperature": 0, "stream": True}
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(node.url + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/event-stream")
                raw = await resp.read()
    events = [e for e in raw.split(b"\n\n") if e]
    assert all(e.startswith(b"data: ") for e in events)
    assert events[-1] == b"data: [DONE]"
    assert b'"cache":"hit"' in events[-2]


async def test_embeddings_are_cached_and_hits_show_in_metrics(node: Node) -> None:
    client = node.client()
    first = await client.embeddings.create(model="emb", input="hello", encoding_format="float")
    second = await client.embeddings.create(model="emb", input="hello", encoding_format="float")
    assert second.data[0].embedding == first.data[0].embedding
    assert len(node.calls("/v1/embeddings")) == 1
    async with aiohttp.ClientSession() as session:
        async with session.get(node.url + "/metrics") as resp:
            text = await resp.text()
    assert 'meshnode_cache_lookups_total{result="hit"} 1.0' in text
    assert 'meshnode_cache_lookups_total{result="miss"} 1.0' in text
    assert 'provider="cache"' in text  # the hit is a served request of the `cache` provider
