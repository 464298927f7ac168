"""Routing policies through the node's HTTP app: a request tagged `pii` under a policy allowing
only `[local, mesh]` never reaches the cloud (the wire-exact fake OpenAI on loopback), not even
when every local and peer candidate fails; the client gets a 503 naming the policy, and
`/admin/route` shows which rule applied.

The local worker and the peer are the router's scriptable `FakeProvider`s (kinds `local` and
`mesh`), made to fail on every call; the cloud is the real OpenAI adapter over HTTP.
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
from meshnode.config import PolicyConfig, PolicyMatch, RoutingConfig, validate
from meshnode.errors import UpstreamUnavailable
from meshnode.providers.fake import FakeProvider
from meshnode.providers.registry import ProviderContext, build_providers
from meshnode.routing.router import Router
from tests.kit.fake_openai import FakeOpenAI

POLICY = "pii-stays-home"
PII = {"x-aiproxy-tags": "pii"}
MESSAGES: Any = [{"role": "user", "content": "my card number is 4111..."}]


@dataclass
class Node:
    url: str
    cloud: FakeOpenAI
    local: FakeProvider
    peer: FakeProvider

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(api_key="unused", base_url=self.url + "/v1", max_retries=0)


def failing(name: str, kind: str, node: str | None = None) -> FakeProvider:
    fake = FakeProvider(name, models=["gpt"], kind=kind, node=node)
    fake.script(*[UpstreamUnavailable(f"{name} is down", provider=name) for _ in range(50)])
    return fake


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    async with FakeOpenAI() as cloud:
        config = validate({"providers": {"openai": {
            "base_url": cloud.base_url, "credentials": {"api_key": "sk-test"},
            "models": [{"name": "gpt", "openai_model": "gpt-4o", "cost_per_1k_tokens": 0.01},
                       {"name": "cloud-only", "openai_model": "gpt-4o"}]}}})
        routing = RoutingConfig(
            strategy="cost_optimized",
            failover={"max_retries": 4,
                      "backoff": {"initial_ms": 1, "max_ms": 2, "jitter": 0.0}},
            policies=[
                PolicyConfig(name=POLICY, match=PolicyMatch(header={"x-aiproxy-tags": "pii"}),
                             allow=["local", "mesh"], strategy="latency_optimized"),
            ],
        )
        local, peer = failing("local", "local"), failing("mesh", "mesh", node="peer-b")
        providers = [*build_providers(
            config, ProviderContext("node-p", tmp_path, routing.timeouts)), local, peer]
        router = Router(routing, ["local", "openai", "mesh"], providers, "node-p")
        app = create_app(router, node_id="node-p", server=config.server,
                         timeouts=routing.timeouts)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            yield Node(f"http://127.0.0.1:{port}", cloud, local, peer)
        finally:
            await runner.cleanup()


async def test_untagged_request_may_use_the_cloud(node: Node) -> None:
    """The control: without the tag, failover reaches the cloud fake (so the tests below could
    fail)."""
    answer = await node.client().chat.completions.create(model="gpt", messages=MESSAGES)
    assert (answer.model_extra or {})["x_aiproxy"]["provider"] == "openai"
    assert len(node.cloud.requests) == 1


async def pii_request(node: Node, stream: bool,
                      tags: str = "pii") -> openai.APIStatusError:
    client = node.client()
    with pytest.raises(openai.APIStatusError) as err:
        if stream:
            await client.chat.completions.create(
                model="gpt", messages=MESSAGES, stream=True, extra_headers={"x-aiproxy-tags": tags})
        else:
            await client.chat.completions.create(
                model="gpt", messages=MESSAGES, extra_headers={"x-aiproxy-tags": tags})
    return err.value


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tags", ["pii", "eu, pii"])
async def test_pii_never_reaches_the_cloud_even_when_every_allowed_candidate_fails(
    node: Node, stream: bool, tags: str
) -> None:
    error = await pii_request(node, stream, tags)
    assert node.cloud.requests == []
    assert node.local.calls and node.peer.calls  # both allowed candidates were tried
    assert error.status_code in (502, 503)


@pytest.mark.parametrize("stream", [False, True])
async def test_exhausted_policy_gives_a_503_naming_the_policy(node: Node, stream: bool) -> None:
    error = await pii_request(node, stream)
    assert error.status_code == 503
    assert POLICY in error.message
    assert error.response.headers.get("Retry-After")
    assert node.cloud.requests == []


async def test_a_policy_that_leaves_no_candidate_is_a_503_naming_it(node: Node) -> None:
    """`cloud-only` is offered by the cloud alone: under the policy nothing may serve it."""
    with pytest.raises(openai.APIStatusError) as err:
        await node.client().chat.completions.create(
            model="cloud-only", messages=MESSAGES, extra_headers=PII)
    assert err.value.status_code == 503
    assert POLICY in err.value.message
    assert node.cloud.requests == []


async def test_admin_route_shows_the_rule_that_applied(node: Node) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(node.url + "/admin/route", params={"model": "gpt"},
                               headers=PII) as resp:
            tagged = await resp.json()
        async with session.get(node.url + "/admin/route", params={"model": "gpt"}) as resp:
            plain = await resp.json()
    assert tagged["policy"] == POLICY
    assert tagged["strategy"] == "latency_optimized"
    assert {c["provider"] for c in tagged["candidates"]} == {"local", "mesh"}
    assert any("openai" in e and POLICY in e for e in tagged["excluded"])
    assert plain["policy"] is None
    assert "openai" in {c["provider"] for c in plain["candidates"]}
