"""The HTTP front end over real loopback HTTP: a real Router with in-process FakeProviders."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from meshnode.errors import UpstreamBadRequest, UpstreamUnavailable
from meshnode.providers.fake import FakeProvider, Hang
from tests.kit.wait import wait_for

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def sse_events(text: str) -> list[Any]:
    out: list[Any] = []
    for event in text.split("\n\n"):
        if event.startswith("data: "):
            payload = event[6:]
            out.append(payload if payload == "[DONE]" else orjson.loads(payload))
    return out


async def test_chat_answer_carries_x_aiproxy_and_headers(api_client, fake) -> None:
    client = await api_client([fake])
    resp = await client.post("/v1/chat/completions", json=CHAT, headers={"x-request-id": "abc-1"})
    assert resp.status == 200
    body = await resp.json()
    assert body["choices"][0]["message"]["content"] == "one two three four"
    x = body["x_aiproxy"]
    assert x["provider"] == "fake" and x["node"] == "node-test" and x["model"] == "m"
    assert x["strategy"] == "cost_optimized"
    assert [a["outcome"] for a in x["attempts"]] == ["ok"]
    assert x["cost"] > 0
    assert resp.headers["x-request-id"] == "abc-1"
    assert resp.headers["x-aiproxy-provider"] == "fake"
    assert resp.headers["x-aiproxy-node"] == "node-test"
    assert float(resp.headers["x-aiproxy-cost"]) == x["cost"]


async def test_insane_request_id_is_replaced(api_client, fake) -> None:
    client = await api_client([fake])
    resp = await client.post("/v1/chat/completions", json=CHAT,
                             headers={"x-request-id": "bad id\twith junk" + "x" * 300})
    assert resp.headers["x-request-id"].startswith("req_")


async def test_stream_with_usage(api_client, fake) -> None:
    client = await api_client([fake])
    resp = await client.post("/v1/chat/completions", json={
        **CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["x-aiproxy-provider"] == "fake"
    events = sse_events(await resp.text())
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"]["total_tokens"] > 0
    assert events[-2]["x_aiproxy"]["provider"] == "fake"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2] if e["choices"])
    assert text == "one two three four"


async def test_stream_broken_after_first_chunk(api_client) -> None:
    from meshnode.providers.fake import BreakAfter

    fake = FakeProvider("fake", models=["m"], text="a b c d", chunks=4)
    other = FakeProvider("other", models=["m"], cost_per_1k=1.0)
    fake.script(BreakAfter(2))
    client = await api_client([fake, other])
    resp = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    events = sse_events(await resp.text())
    assert "[DONE]" not in events
    assert events[-1]["error"]["code"] == "stream_broken"
    assert other.calls == []  # never retried after the first byte


async def test_unknown_model_is_404_without_upstream_calls(api_client, fake) -> None:
    client = await api_client([fake])
    resp = await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    assert resp.status == 404
    body = await resp.json()
    assert body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
    assert fake.calls == []


async def test_bad_requests_are_400_without_upstream_calls(api_client, fake) -> None:
    client = await api_client([fake])
    for body in ({"model": "m"}, {**CHAT, "n": 1000}, {**CHAT, "max_tokens": -1}):
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status == 400
        assert (await resp.json())["error"]["param"]
    resp = await client.post("/v1/chat/completions", data=b"{not json",
                             headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert fake.calls == []


async def test_body_over_limit_is_413_by_declared_length(api_client, fake) -> None:
    client = await api_client([fake], max_body_bytes=1000)
    resp = await client.post("/v1/chat/completions", data=b"x" * 200_000,
                             headers={"Content-Type": "application/json"})
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "request_too_large"
    assert fake.calls == []


async def test_chunked_body_over_limit_is_413(api_client, fake) -> None:
    client = await api_client([fake], max_body_bytes=1000)

    async def body():  # no Content-Length: chunked transfer
        for _ in range(50):
            yield b"x" * 100

    resp = await client.post("/v1/chat/completions", data=body(),
                             headers={"Content-Type": "application/json"})
    assert resp.status == 413
    assert (await resp.json())["error"]["type"] == "invalid_request_error"
    assert fake.calls == []


async def test_all_upstreams_failing_is_502(api_client) -> None:
    a = FakeProvider("a", models=["m"])
    a.script(UpstreamUnavailable("down"), UpstreamUnavailable("down"))
    client = await api_client([a], failover={"max_retries": 1, "backoff": {"initial_ms": 1}})
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 502
    assert (await resp.json())["error"]["type"] == "upstream_error"
    assert len(a.calls) == 2


async def test_upstream_bad_request_is_400_not_failed_over(api_client) -> None:
    a = FakeProvider("a", models=["m"])
    b = FakeProvider("b", models=["m"], cost_per_1k=1.0)
    a.script(UpstreamBadRequest("upstream says no", param="messages"))
    client = await api_client([a, b])
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 400
    assert b.calls == []


async def test_deadline_is_504(api_client) -> None:
    a = FakeProvider("a", models=["m"])
    a.script(Hang())
    client = await api_client([a], timeouts={"total_ms": 200})
    resp = await client.post("/v1/chat/completions", json=CHAT)
    assert resp.status == 504
    assert a.cancelled == 1


async def test_client_disconnect_cancels_upstream(api_client) -> None:
    a = FakeProvider("a", models=["m"])
    a.script(Hang())
    client = await api_client([a])
    task = asyncio.ensure_future(client.post("/v1/chat/completions", json=CHAT))
    await wait_for(lambda: a.calls, "the request reaches the provider")
    task.cancel()
    await wait_for(lambda: a.cancelled, "the provider's call is cancelled")
    assert a.cancelled == 1


async def test_embeddings_and_completions(api_client, fake) -> None:
    client = await api_client([fake])
    resp = await client.post("/v1/embeddings", json={"model": "m", "input": ["a", "b"]})
    assert resp.status == 200
    body = await resp.json()
    assert len(body["data"]) == 2 and body["x_aiproxy"]["provider"] == "fake"
    resp = await client.post("/v1/completions", json={"model": "m", "prompt": "hi"})
    assert resp.status == 200


async def test_wrong_kind_for_model_is_400(api_client) -> None:
    from meshnode.types import RequestKind

    chat_only = FakeProvider("a", models=["m"], kinds=frozenset({RequestKind.CHAT}))
    client = await api_client([chat_only])
    resp = await client.post("/v1/embeddings", json={"model": "m", "input": "x"})
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "model"


async def test_models(api_client, fake) -> None:
    client = await api_client([fake])
    body = await (await client.get("/v1/models")).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["m"]
    assert body["data"][0]["providers"] == ["fake"]
    assert (await (await client.get("/v1/models/m")).json())["id"] == "m"
    resp = await client.get("/v1/models/zzz")
    assert resp.status == 404


async def test_health_and_ready(api_client) -> None:
    class NotReady(FakeProvider):
        def ready(self) -> tuple[bool, str]:
            return False, "warming up"

    client = await api_client([NotReady("a", models=["m"])])
    assert (await client.get("/health/live")).status == 200
    resp = await client.get("/health/ready")
    assert resp.status == 503
    body = await resp.json()
    assert body["reasons"] == ["a: warming up"]
    assert resp.headers["Retry-After"] == "1"


async def test_metrics_and_admin(api_client, fake) -> None:
    client = await api_client([fake])
    await client.post("/v1/chat/completions", json=CHAT)
    await client.post("/v1/chat/completions", json={**CHAT, "model": "sk-secretsecret"})
    text = await (await client.get("/metrics")).text()
    assert 'meshnode_requests_total{kind="chat",model="m",provider="fake",status="200"} 1.0' in text
    assert "meshnode_request_latency_seconds_bucket" in text
    assert 'meshnode_tokens_total{direction="completion",model="m",provider="fake"}' in text
    assert "sk-secret" not in text
    stats = await (await client.get("/admin/stats")).json()
    assert stats["node"] == "node-test"
    assert stats["totals"]["requests"] == 1
    route = await (await client.get("/admin/route", params={"model": "m"})).json()
    assert route["winner"]["provider"] == "fake"
    assert (await client.get("/admin/route")).status == 400
    assert (await client.get("/admin/route", params={"model": "zz"})).status == 404


async def test_unknown_route_is_openai_shaped(api_client, fake) -> None:
    client = await api_client([fake])
    resp = await client.get("/v1/nothing")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"
    resp = await client.get("/v1/chat/completions")
    assert resp.status == 405


async def test_ready_waits_for_a_warming_local_worker_and_ignores_empty_providers(
    api_client,
) -> None:
    class Warming(FakeProvider):
        warm = False

        def ready(self) -> tuple[bool, str]:
            return (True, "") if self.warm else (False, "local/cpu loading")

    local = Warming("local", models=["tiny"], kind="local")
    cloud = FakeProvider("cloud", models=["gpt"])
    empty_mesh = FakeProvider("mesh", models=[], kind="mesh")
    client = await api_client([local, cloud, empty_mesh])
    resp = await client.get("/health/ready")
    assert resp.status == 503  # a cloud could serve, but the local models are still loading
    assert (await resp.json())["reasons"] == ["local: local/cpu loading"]
    local.warm = True
    assert (await client.get("/health/ready")).status == 200
    only_mesh = await api_client([empty_mesh])
    body = await (await only_mesh.get("/health/ready")).json()
    assert body["status"] == "not_ready" and "no provider offers a model" in body["reasons"]


async def test_admin_route_explains_a_bodys_prefix_hit(api_client) -> None:
    worker = FakeProvider("w", models=["m"], kind="local")
    client = await api_client([worker], strategy="cache_aware")
    long_chat = {**CHAT, "messages": [{"role": "system", "content": "Be brief. " * 100},
                                      {"role": "user", "content": "hi"}]}
    assert (await client.post("/v1/chat/completions", json=long_chat)).status == 200
    resp = await client.post("/admin/route", json=long_chat)
    assert resp.status == 200
    route = await resp.json()
    assert route["strategy"] == "cache_aware"
    row = route["winner"]
    assert row["prefix_blocks"] >= 3 and row["prefix_hit_blocks"] == row["prefix_blocks"]
    assert f"prefix hit {row['prefix_blocks']}/{row['prefix_blocks']} blocks" in row["reason"]
    fresh = await (await client.post("/admin/route", json={**long_chat, "messages": [
        {"role": "system", "content": "Be long. " * 100}]})).json()
    assert fresh["winner"]["prefix_hit_blocks"] == 0
    assert (await client.post("/admin/route", data=b"{nope")).status == 400
    assert (await client.post("/admin/route", json=["m"])).status == 400
    assert (await client.post("/admin/route", json={"model": "zz"})).status == 404


async def test_runner_drops_aiohttps_no_op_layer_and_requests_still_see_their_app(fake) -> None:
    # The production runner drops aiohttp's per-request `current_app` middleware of an app
    # without sub-apps; the front door and handlers still find the app (its state) through
    # `request.app`, and an app with a sub-app keeps the layer.
    from aiohttp import ClientSession, web

    from meshnode.api.app import create_app, front_door
    from meshnode.api.server import LimitedAppRunner, drop_current_app_layer
    from tests.unit.api.conftest import make_router

    app = create_app(make_router([fake]), node_id="node-runner", manage_providers=False)
    runner = LimitedAppRunner(app, access_log=None)
    await runner.setup()
    try:
        assert [m for m, _ in app._middlewares_handlers] == [front_door]
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/health/live") as resp:
                assert resp.status == 200
                assert (await resp.json())["node"] == "node-runner"
            async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                    json=CHAT) as resp:
                assert resp.status == 200
                assert resp.headers["x-aiproxy-node"] == "node-test"  # the router's node
                assert (await resp.json())["x_aiproxy"]["provider"] == "fake"
    finally:
        await runner.cleanup()

    parent = web.Application(middlewares=[front_door])
    parent.add_subapp("/sub", web.Application())
    parent.freeze()
    assert not drop_current_app_layer(parent)
    assert len(parent._middlewares_handlers) == 2


def test_aiproxy_headers_are_the_clients_x_aiproxy_ones_lower_cased() -> None:
    from aiohttp.test_utils import make_mocked_request
    from multidict import CIMultiDict

    from meshnode.api.handlers import _aiproxy_headers

    request = make_mocked_request("POST", "/v1/chat/completions", headers=CIMultiDict([
        ("X-AIPROXY-Tags", "pii"), ("x-aiproxy-policy", "p"), ("X-Aiproxy-", "bare prefix"),
        ("X-Other", "o"), ("Accept", "application/json"), ("x", "short"),
    ]))
    assert _aiproxy_headers(request) == {"x-aiproxy-tags": "pii", "x-aiproxy-policy": "p"}
