"""Forwarding over real gRPC on loopback: two in-process MeshServices, each with a real Router.

Node B serves model `m` from a FakeProvider; node A serves nothing itself and must answer
through B with the `mesh` provider: whole answers, streams chunk by chunk, errors with the right
retryability, and a peer that vanishes before or after the first chunk.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from meshnode.config import FailoverConfig, MeshConfig, RoutingConfig
from meshnode.errors import InvalidRequest, StreamBroken, UpstreamBadRequest, UpstreamUnavailable
from meshnode.mesh.service import MeshService
from meshnode.mesh.state import MemberStatus
from meshnode.providers.fake import BreakAfter, Delay, FakeProvider, Hang
from meshnode.routing.router import Router
from meshnode.types import Capacity, InferenceRequest, RequestKind, StreamChunk
from tests.kit.wait import wait_for

# A hang (a stop that never returns) must fail fast, not after the global 300 s.
pytestmark = pytest.mark.timeout(60)

MESH = dict(listen_addr="127.0.0.1:0", probe_interval_ms=50, probe_timeout_ms=100,
            gossip_interval_ms=50, mdns=False)


def request(stream: bool = False, model: str = "m", timeout_s: float = 10.0) -> InferenceRequest:
    return InferenceRequest(
        kind=RequestKind.CHAT, model=model,
        body={"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream},
        request_id=uuid.uuid4().hex, deadline=time.monotonic() + timeout_s, stream=stream,
        include_usage=True,
    )


class Pair:
    def __init__(self) -> None:
        self.fake = FakeProvider("fakeai", models=["m"], cost_per_1k=0.5,
                                 text="one two three four five six", chunks=6)
        chain = ["fakeai", "mesh"]
        # B does not retry itself, so its errors reach A as they are.
        no_retry = RoutingConfig(failover=FailoverConfig(max_retries=0))
        self.router_b = Router(no_retry, chain, [self.fake], "node-b")
        self.router_a = Router(RoutingConfig(), chain, [], "node-a")
        self.b = MeshService(MeshConfig(**MESH), "node-b", self.router_b, announce=False)
        self.a: MeshService | None = None

    async def start(self) -> None:
        await self.b.start()
        self.a = MeshService(MeshConfig(**MESH, seeds=[self.b.advertise_address]), "node-a",
                             self.router_a, announce=False)
        await self.a.start()
        await wait_for(lambda: any(o.model == "m" for o in self.a.provider.offers()),
                       "a learns b's offer of m")

    async def stop(self) -> None:
        for svc in (self.a, self.b):
            if svc is not None:
                await svc.stop(graceful=False, grace_s=0)


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    p = Pair()
    await p.start()
    yield p
    await p.stop()


async def test_offer_comes_from_gossip_with_peer_and_prices(pair: Pair) -> None:
    assert pair.a is not None
    offers = [o for o in pair.a.provider.offers() if o.model == "m"]
    assert len(offers) == 1
    offer = offers[0]
    assert (offer.provider, offer.provider_kind, offer.node) == ("mesh", "mesh", "node-b")
    assert offer.cost_per_1k_input == 0.5 and offer.cost_per_1k_output == 0.5
    snapshot = pair.a.snapshot()
    ids = [m["id"] for m in snapshot["members"]]
    assert ids == ["node-a", "node-b"] and snapshot["members"][0]["self"] is True
    peer = snapshot["members"][1]
    assert peer["status"] == "alive" and peer["models"][0]["name"] == "m"
    assert peer["addresses"]["grpc"] == pair.b.advertise_address


async def test_complete_through_peer(pair: Pair) -> None:
    routed = await pair.router_a.complete(request())
    assert routed.served.node == "node-b"
    assert routed.completion.body["choices"][0]["message"]["content"] == "one two three four five six"
    assert routed.completion.usage.prompt_tokens == 10
    # The serving node saw the caller chain plus itself.
    assert pair.fake.calls[-1].visited == ("node-a", "node-b")


async def test_stream_through_peer_relays_chunks_as_they_come(pair: Pair) -> None:
    pair.fake.script(Delay(0.0))
    routed = await pair.router_a.open_stream(request(stream=True))
    texts = []
    async for chunk in routed:
        assert chunk.node == "node-b"
        for choice in chunk.data.get("choices", []):
            texts.append(choice["delta"].get("content", ""))
    assert "".join(texts) == "one two three four five six"
    assert routed.served.node == "node-b" and routed.served.usage.completion_tokens == 6


async def test_peer_error_keeps_its_meaning(pair: Pair) -> None:
    pair.fake.script(UpstreamBadRequest("bad tool schema"))
    with pytest.raises((UpstreamBadRequest, InvalidRequest)) as info:
        await pair.router_a.complete(request())
    assert not info.value.retryable
    pair.fake.script(UpstreamUnavailable("upstream 503"))
    provider = pair.a.provider
    offer = next(o for o in provider.offers() if o.model == "m")
    with pytest.raises(UpstreamUnavailable) as info2:
        await provider.complete(request(), offer, RoutingConfig().timeouts)
    assert info2.value.retryable


async def test_stream_breaking_after_first_chunk_is_stream_broken(pair: Pair) -> None:
    pair.fake.script(BreakAfter(2))
    offer = next(o for o in pair.a.provider.offers() if o.model == "m")
    got = 0
    with pytest.raises(StreamBroken):
        async for _chunk in pair.a.provider.stream(request(stream=True), offer,
                                                   RoutingConfig().timeouts):
            got += 1
    assert got == 2


async def test_peer_dying_before_first_chunk_is_retryable(pair: Pair) -> None:
    pair.fake.script(Hang())
    offer = next(o for o in pair.a.provider.offers() if o.model == "m")
    task = asyncio.create_task(
        pair.a.provider.complete(request(), offer, RoutingConfig().timeouts)
    )
    await wait_for(lambda: len(pair.fake.calls) > 0, "b's provider got the call")
    await pair.b.stop(graceful=False, grace_s=0)
    with pytest.raises(UpstreamUnavailable) as info:
        await task
    assert info.value.retryable
    # The membership notices too, and the offer disappears.
    await wait_for(lambda: pair.a.membership.get("node-b").status
                   in (MemberStatus.SUSPECT, MemberStatus.DEAD), "a suspects b or sees it dead")
    assert not [o for o in pair.a.provider.offers() if o.model == "m"] or \
        pair.a.membership.get("node-b").status is MemberStatus.SUSPECT


async def test_graceful_leave_removes_offers_at_once(pair: Pair) -> None:
    await pair.b.leave()
    await wait_for(lambda: pair.a.membership.get("node-b").status is MemberStatus.LEFT,
                   "a sees b left")
    assert [o for o in pair.a.provider.offers() if o.model == "m"] == []


class _FirstChunkThenWait(FakeProvider):
    """Streams one chunk, then waits until cancelled: a peer that dies mid-stream."""

    async def stream(self, request, offer, timeouts):  # type: ignore[no-untyped-def, override]
        self.calls.append(request)
        yield StreamChunk({"object": "chat.completion.chunk", "model": offer.model,
                           "choices": [{"index": 0, "delta": {"content": "first"},
                                        "finish_reason": None}]})
        await asyncio.Event().wait()


async def test_peer_dying_after_first_chunk_is_stream_broken() -> None:
    waiting = _FirstChunkThenWait("fakeai", models=["m"])
    router_b = Router(RoutingConfig(), ["fakeai", "mesh"], [waiting], "node-b")
    b = MeshService(MeshConfig(**MESH), "node-b", router_b, announce=False)
    await b.start()
    a = MeshService(MeshConfig(**MESH, seeds=[b.advertise_address]), "node-a",
                    Router(RoutingConfig(), ["mesh"], [], "node-a"), announce=False)
    await a.start()
    try:
        await wait_for(lambda: any(o.model == "m" for o in a.provider.offers()),
                       "a learns b's offer of m")
        offer = next(o for o in a.provider.offers() if o.model == "m")
        stream = a.provider.stream(request(stream=True), offer, RoutingConfig().timeouts)
        first = await stream.__anext__()
        assert first.data["choices"][0]["delta"]["content"] == "first"
        assert first.node == "node-b"
        await b.stop(graceful=False, grace_s=0)
        with pytest.raises(StreamBroken):
            await stream.__anext__()
    finally:
        await a.stop(graceful=False, grace_s=0)
        await b.stop(graceful=False, grace_s=0)


async def test_per_offer_capacity_and_latency_come_from_gossip() -> None:
    capacity = Capacity(slots_total=8, slots_free=2, queue_depth=1, tokens_per_s=50.0)
    fake = FakeProvider("fakeai", models=["m"], capacity=capacity)
    router_b = Router(RoutingConfig(), ["fakeai", "mesh"], [fake], "node-b")
    fake.script(Delay(0.01))
    await router_b.complete(request())  # B measures its own latency for m (>= 10 ms)
    b = MeshService(MeshConfig(**MESH), "node-b", router_b, announce=False)
    await b.start()
    a = MeshService(MeshConfig(**MESH, seeds=[b.advertise_address]), "node-a",
                    Router(RoutingConfig(), ["mesh"], [], "node-a"), announce=False)
    await a.start()
    try:
        await wait_for(lambda: any(o.model == "m" for o in a.provider.offers()),
                       "a learns b's offer of m")
        offer = next(o for o in a.provider.offers() if o.model == "m")
        assert a.provider.capacity_for(offer) == capacity
        await wait_for(lambda: a.provider.latency_ms_for(offer) is not None,
                       "a measured b's latency for m")
        assert a.provider.latency_ms_for(offer) >= 10.0
    finally:
        await a.stop(graceful=False, grace_s=0)
        await b.stop(graceful=False, grace_s=0)


async def test_blobs_travel_in_node_state_and_are_handed_over_once_per_version() -> None:
    received: list[tuple[str, dict[str, bytes]]] = []
    payload = {"governance.keys": b"\x00signed-records\xff"}
    b = MeshService(MeshConfig(**MESH), "node-b",
                    Router(RoutingConfig(), ["mesh"], [], "node-b"), announce=False,
                    blobs=lambda: payload)
    await b.start()
    a = MeshService(MeshConfig(**MESH, seeds=[b.advertise_address]), "node-a",
                    Router(RoutingConfig(), ["mesh"], [], "node-a"), announce=False,
                    on_peer_blobs=lambda node, blobs: received.append((node, dict(blobs))))
    await a.start()
    try:
        await wait_for(lambda: len(received) >= 1, "the hand-over arrived")
        assert received[0] == ("node-b", payload)
        await asyncio.sleep(0.2)  # several publish ticks: no new version, no new hand-over
        assert len(received) == 1
    finally:
        await a.stop(graceful=False, grace_s=0)
        await b.stop(graceful=False, grace_s=0)
