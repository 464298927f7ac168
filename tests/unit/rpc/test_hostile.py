"""Hostile or broken input on real gRPC over loopback: garbage bytes, oversized messages, a
message claiming hundreds of thousands of members, numbers out of range, and a lying peer
(cost 0, infinite capacity) whose measured failures outweigh its claims."""

from __future__ import annotations

import math
import random
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from meshnode.errors import UpstreamUnavailable
from meshnode.mesh.service import MeshService
from meshnode.mesh.state import MAX_INCARNATION
from meshnode.providers.fake import FakeProvider
from meshnode.rpc import convert
from meshnode.rpc.client import GOSSIP, HEALTH, INFER
from meshnode.rpc.generated import mesh_pb2 as pb
from meshnode.types import Capacity, InferenceRequest, RequestKind
from tests.kit.mesh_services import MeshServices, members
from tests.kit.wait import wait_for

pytestmark = pytest.mark.timeout(90)

MESH = dict(listen_addr="127.0.0.1:0", probe_interval_ms=50, probe_timeout_ms=100,
            gossip_interval_ms=50, mdns=False)


@pytest.fixture
async def nodes() -> AsyncIterator[MeshServices]:
    n = MeshServices(**MESH)
    yield n
    await n.stop()



async def call(address: str, method: str, body: bytes) -> grpc.StatusCode:
    """Send raw bytes; the status code the node answers with (OK when it answered)."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            if method == INFER:
                async for _ in channel.unary_stream(method)(body, timeout=10):
                    pass
            else:
                await channel.unary_unary(method)(body, timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def still_serves(a: MeshService, nodes: MeshServices, name: str) -> None:
    """An honest node can still join afterwards: the node survived."""
    b = await nodes.start(name, seeds=[a.advertise_address])
    await wait_for(lambda: name in members(a) and a.node_id in members(b),
                   "the two nodes see each other")


# ------------------------------------------------------------------------------ bytes
async def test_garbage_bytes_are_refused_and_the_node_survives(nodes: MeshServices) -> None:
    a = await nodes.start("a")
    truncated = b"\x0a\xff\xff\xff\x0f" + b"x" * 10  # field 1, a length far past the end
    for method in (HEALTH, GOSSIP, INFER):
        assert await call(a.advertise_address, method, truncated) is \
            grpc.StatusCode.INVALID_ARGUMENT
    # Random bytes either fail to parse or parse into nonsense that is bounded; never a crash.
    rng = random.Random(6)
    for _ in range(20):
        noise = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 2048)))
        for method in (HEALTH, GOSSIP, INFER):
            code = await call(a.advertise_address, method, noise)
            assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), code
    assert a.guard.refused["garbage"] >= 3
    await still_serves(a, nodes, "b")


async def test_oversized_messages_are_refused_before_parsing(nodes: MeshServices) -> None:
    a = await nodes.start("a")
    big_probe = pb.HealthRequest(from_node="x" * (100 * 1024)).SerializeToString()
    assert await call(a.advertise_address, HEALTH, big_probe) is \
        grpc.StatusCode.RESOURCE_EXHAUSTED
    big_gossip = pb.GossipRequest(
        from_node="x", records=[pb.GossipRecord(state=pb.NodeState(
            node_id="x", blobs={str(i): b"\0" * 60_000 for i in range(16)}))] * 10,
    ).SerializeToString()
    assert len(big_gossip) > 8 * 1024 * 1024
    assert await call(a.advertise_address, GOSSIP, big_gossip) is \
        grpc.StatusCode.RESOURCE_EXHAUSTED
    huge_infer = b"\x2a" + b"\xff\xff\xff\x08" + b"\0" * (17 * 1024 * 1024)  # body field 5
    assert await call(a.advertise_address, INFER, huge_infer) is \
        grpc.StatusCode.RESOURCE_EXHAUSTED
    assert a.guard.refused["oversized"] == 2  # the 17 MiB one gRPC itself refused
    await still_serves(a, nodes, "b")


def _record_bytes(i: int) -> bytes:
    record = pb.GossipRecord(member=pb.MemberUpdate(
        node_id=f"g{i}", address=f"127.0.0.1:{1 + i % 60000}", incarnation=0, status=1))
    # Field 4 (records) of GossipRequest, length-delimited.
    raw = record.SerializeToString()
    return b"\x22" + bytes([len(raw)]) + raw


async def test_a_message_claiming_huge_membership_is_bounded(nodes: MeshServices) -> None:
    a = await nodes.start("a")
    b = await nodes.start("b", seeds=[a.advertise_address])
    await wait_for(lambda: members(a) == {"a", "b"}, "a and b see each other")
    # A million members does not even fit the gossip bound: refused unread.
    head = pb.GossipRequest(protocol_version=1, from_node="mallory", join=True).SerializeToString()
    million = head + b"".join(_record_bytes(i) for i in range(1_000_000))
    assert await call(a.advertise_address, GOSSIP, million) is \
        grpc.StatusCode.RESOURCE_EXHAUSTED
    # 200,000 that fit: one message brings at most 256 of them in, and the answer is bounded.
    many = head + b"".join(_record_bytes(i) for i in range(200_000))
    async with grpc.aio.insecure_channel(a.advertise_address) as channel:
        reply = pb.GossipResponse.FromString(
            await channel.unary_unary(GOSSIP)(many, timeout=20))
    assert len(reply.records) <= 256 and len(reply.wants) <= 256
    assert len(members(a)) <= 2 + 256
    assert {"a", "b"} <= members(a)
    assert "b" in members(a) and b.membership is not None


# ------------------------------------------------------------------------------ numbers
def test_claimed_numbers_are_clamped() -> None:
    state = pb.NodeState(
        node_id="liar", version=5, grpc_address="x:1",
        models=[pb.ModelAd(name="m", provider_kind="p", kinds=["chat"],
                           cost_per_1k_input=-3.0, cost_per_1k_output=math.nan)],
        capacity=pb.CapacityAd(slots_total=2**32 - 1, slots_free=2**32 - 1,
                               queue_depth=2**32 - 1, tokens_per_s=math.inf,
                               prefill_tokens_per_s=math.nan, decode_tokens_per_s=math.inf),
        latency=[pb.LatencyAd(model="m", ewma_ms=-1.0, p95_ms=math.inf, ttft_ms=math.nan)],
        counters={"spend": math.inf, "ok": 1.5, "nan": math.nan},
    )
    got = convert.state_from_pb(state)
    assert got is not None
    model = got.models[0]
    assert model.cost_per_1k_input == 0.0
    assert model.cost_per_1k_output == convert.MAX_PRICE  # unknown price: the most expensive
    assert got.capacity.slots_total == convert.MAX_SLOTS
    assert got.capacity.slots_free == convert.MAX_SLOTS
    assert got.capacity.queue_depth == convert.MAX_QUEUE
    assert got.capacity.tokens_per_s == convert.MAX_TOKENS_PER_S
    # Measured speeds: not a number reads as not measured, an infinity as the bound.
    assert got.capacity.prefill_tokens_per_s == 0.0
    assert got.capacity.decode_tokens_per_s == convert.MAX_TOKENS_PER_S
    negative = convert.state_from_pb(pb.NodeState(
        node_id="x", version=1, capacity=pb.CapacityAd(prefill_tokens_per_s=-5.0,
                                                       decode_tokens_per_s=20.0)))
    assert negative is not None
    assert (negative.capacity.prefill_tokens_per_s, negative.capacity.decode_tokens_per_s) == (
        0.0, 20.0)
    latency = got.latency[0]
    assert (latency.ewma_ms, latency.p95_ms, latency.ttft_ms) == (0.0, convert.MAX_LATENCY_MS, 0.0)
    assert dict(got.counters) == {"ok": 1.5}
    free_over_total = convert.state_from_pb(pb.NodeState(
        node_id="x", version=1, capacity=pb.CapacityAd(slots_total=2, slots_free=9)))
    assert free_over_total is not None and free_over_total.capacity.slots_free == 2


def test_counters_beyond_the_bound_are_dropped() -> None:
    state = pb.NodeState(node_id="x", version=2**63)
    assert convert.state_from_pb(state) is None
    member = pb.MemberUpdate(node_id="x", incarnation=MAX_INCARNATION + 1, status=3)
    assert convert.member_from_pb(member) is None


async def test_liar_with_cost_zero_and_infinite_capacity_loses_to_measurement(
    nodes: MeshServices,
) -> None:
    liar_fake = FakeProvider("liarai", models=["m"], cost_per_1k=0.0,
                             capacity=Capacity(2**32 - 1, 2**32 - 1, 0, math.inf))
    liar_fake.script(*[UpstreamUnavailable("I lied") for _ in range(100)])
    honest_fake = FakeProvider("honestai", models=["m"], cost_per_1k=1.0,
                               capacity=Capacity(4, 4, 0, 50.0))
    liar = await nodes.start("liar", [liar_fake], relay=False)
    await nodes.start("honest", [honest_fake], seeds=[liar.advertise_address])
    a = await nodes.start("a", seeds=[liar.advertise_address])
    assert a.provider is not None
    await wait_for(lambda: {o.node for o in a.provider.offers() if o.model == "m"}
                   == {"liar", "honest"}, "a learns the offers of liar and honest")
    # What the liar claims arrives bounded.
    claimed = a.provider.peer_capacity("liar")
    assert claimed is not None and claimed.slots_total == convert.MAX_SLOTS
    assert math.isfinite(claimed.tokens_per_s)
    served = []
    tried_liar = 0
    for _ in range(10):
        routed = await a.router.complete(InferenceRequest(
            kind=RequestKind.CHAT, model="m", body={"model": "m", "messages": []},
            request_id=uuid.uuid4().hex, deadline=time.monotonic() + 10))
        served.append(routed.served.node)
        tried_liar += sum(1 for t in routed.served.attempts if t.node == "liar")
    assert served == ["honest"] * 10
    # Its failures, measured here, cooled it down: the cheapest claim stopped being tried.
    assert 1 <= tried_liar <= 3


def test_cut_counters_and_blobs_are_counted_not_silent() -> None:
    from meshnode.rpc.convert import DROPPED, MAX_BLOB_BYTES, MAX_BLOBS, MAX_COUNTERS

    before = dict(DROPPED)
    state = pb.NodeState(
        node_id="big", version=1, grpc_address="x",
        counters={f"c{i}": 1.0 for i in range(MAX_COUNTERS + 5)},
        blobs={f"b{i}": b"x" for i in range(MAX_BLOBS + 1)},
    )
    decoded = convert.state_from_pb(state)
    assert decoded is not None and len(decoded.counters) == MAX_COUNTERS
    assert len(decoded.blobs) == MAX_BLOBS
    assert DROPPED["too_many_counters"] - before.get("too_many_counters", 0) == 5
    assert DROPPED["too_many_blobs"] - before.get("too_many_blobs", 0) == 1
    # A separate state: which map entries come first is protobuf's hash order, so a huge blob
    # among too many could be cut as one too many instead (the test was flaky so, 1 run in 3).
    huge = convert.state_from_pb(pb.NodeState(
        node_id="big", version=1, grpc_address="x",
        blobs={"huge": b"y" * (MAX_BLOB_BYTES + 1), "small": b"z"}))
    assert huge is not None and dict(huge.blobs) == {"small": b"z"}
    assert DROPPED["oversized_blob"] - before.get("oversized_blob", 0) == 1


def test_the_dearest_price_travels_and_is_never_read_below_the_cheapest() -> None:
    from meshnode.mesh.state import ModelAd, NodeState

    state = NodeState("p", 1, "p:1", models=(
        ModelAd("m", "local", cost_per_1k_input=0.0, cost_per_1k_output=0.0,
                max_cost_per_1k_input=0.01, max_cost_per_1k_output=0.03),))
    (ad,) = convert.state_from_pb(convert.state_to_pb(state)).models  # type: ignore[union-attr]
    assert (ad.max_cost_per_1k_input, ad.max_cost_per_1k_output) == (0.01, 0.03)
    old = convert.state_to_pb(state)
    old.models[0].ClearField("max_cost_per_1k_input")
    old.models[0].ClearField("max_cost_per_1k_output")
    (ad,) = convert.state_from_pb(old).models  # type: ignore[union-attr]
    assert ad.max_cost_per_1k_input is None  # a node from before: its price stands
    liar = convert.state_to_pb(state)
    liar.models[0].cost_per_1k_input = 0.5
    liar.models[0].max_cost_per_1k_input = float("nan")
    (ad,) = convert.state_from_pb(liar).models  # type: ignore[union-attr]
    assert ad.max_cost_per_1k_input == convert.MAX_PRICE  # NaN reads as the highest


# ------------------------------------------------------------------------------ prefix names
def test_prefix_names_round_trip_bounded_and_only_in_a_known_scheme() -> None:
    from meshnode.mesh.state import CapacityAd, NodeState
    from meshnode.routing import prefix

    names = prefix.request_prefix("m", {"prompt": "p" * (4 * prefix.BLOCK_BYTES)}).chain
    state = NodeState("p", 1, "p:1", capacity=CapacityAd(
        4, 2, 0, 1.0, prefix_scheme=prefix.SCHEME, prefix_names=names))
    wire = convert.state_to_pb(state).SerializeToString()
    got = convert.state_from_pb(pb.NodeState.FromString(wire))
    assert got is not None and got.capacity == state.capacity
    old = pb.NodeState.FromString(wire)
    old.capacity.ClearField("prefix_scheme")  # a node from before, or one with another scheme
    assert convert.state_from_pb(old).capacity.prefix_names == ()  # type: ignore[union-attr]
    old.capacity.prefix_scheme = prefix.SCHEME + 1
    assert convert.state_from_pb(old).capacity.prefix_names == ()  # type: ignore[union-attr]
    liar = pb.NodeState.FromString(wire)
    liar.capacity.prefix_names = b"x" * (prefix.MAX_NAMES * prefix.NAME_BYTES * 4 + 3)
    cut = convert.state_from_pb(liar).capacity.prefix_names  # type: ignore[union-attr]
    assert len(cut) == prefix.MAX_NAMES


async def test_prefix_names_a_worker_served_reach_a_peers_router(nodes: MeshServices) -> None:
    from meshnode.routing import prefix

    a = await nodes.start("a", providers=[FakeProvider("fakeai", models=["m"])])
    b = await nodes.start("b", seeds=[a.advertise_address])
    served = prefix.request_prefix("m", {"prompt": "q" * (3 * prefix.BLOCK_BYTES)}).chain
    a.router.prefix_index.record(served)  # as the router does when its local worker answers
    assert b.provider is not None

    def seen() -> frozenset[bytes]:
        capacity = b.provider.peer_capacity("a")  # type: ignore[union-attr]
        return capacity.prefix_names if capacity is not None else frozenset()

    await wait_for(lambda: set(served) <= seen(), "a sees every served prefix name")
    assert prefix.leading_hits(served, seen()) == 3


async def test_prefix_names_a_worker_reports_are_what_its_node_gossips(
        nodes: MeshServices) -> None:
    from meshnode.routing import prefix

    held = prefix.request_prefix("m", {"prompt": "w" * (2 * prefix.BLOCK_BYTES)}).chain
    report = Capacity(slots_total=2, slots_free=2, prefix_names=frozenset(held),
                      prefix_recent=held)
    worker = FakeProvider("w", models=["m"], kind="local", capacity=report)
    a = await nodes.start("a", providers=[worker])
    b = await nodes.start("b", seeds=[a.advertise_address])
    assert b.provider is not None

    def seen() -> frozenset[bytes]:
        capacity = b.provider.peer_capacity("a")  # type: ignore[union-attr]
        return capacity.prefix_names if capacity is not None else frozenset()

    await wait_for(lambda: set(held) <= seen(), "b sees the names a's worker reports")
    worker._capacity = Capacity(slots_total=2, slots_free=2, prefix_recent=())  # evicted
    await wait_for(lambda: not seen(), "b sees them gone once a's worker evicted them")


async def test_a_nodes_measured_prefill_and_decode_speed_reach_its_peers(
        nodes: MeshServices) -> None:
    worker = FakeProvider("w", models=["m"], kind="local",
                          capacity=Capacity(slots_total=2, slots_free=2, prefill_tokens_per_s=420.0,
                                            decode_tokens_per_s=21.5))
    a = await nodes.start("a", providers=[worker])
    b = await nodes.start("b", seeds=[a.advertise_address])
    assert b.provider is not None

    def rates() -> tuple[float, float]:
        capacity = b.provider.peer_capacity("a")  # type: ignore[union-attr]
        if capacity is None:
            return (0.0, 0.0)
        return (capacity.prefill_tokens_per_s, capacity.decode_tokens_per_s)

    await wait_for(lambda: rates() == (420.0, 21.5), "b sees a's measured speeds")
    # What b's cache_aware weighs a's hits with: a's ratio, not the default.
    row = b.router.explain("m", body={"prompt": "x"})["candidates"][0]
    assert (row["prefill_tokens_per_s"], row["decode_tokens_per_s"]) == (420.0, 21.5)


async def test_cache_aware_entry_nodes_agree_and_a_later_turn_finds_its_cache(
        nodes: MeshServices) -> None:
    """Three nodes, each with a local worker; two entry nodes. A conversation's first turn goes
    to the same node from either entry node (rendezvous); once that node's gossip says it holds
    the prefix, the next turn through the other entry node goes there too (a real gRPC hop)."""
    from meshnode.config import RoutingConfig

    cache_aware = RoutingConfig(strategy="cache_aware")
    workers = {n: FakeProvider("w", models=["m"], kind="local") for n in ("a", "b", "c")}
    a = await nodes.start("a", providers=[workers["a"]], routing=cache_aware)
    b = await nodes.start("b", providers=[workers["b"]], routing=cache_aware,
                          seeds=[a.advertise_address])
    await nodes.start("c", providers=[workers["c"]], routing=cache_aware,
                      seeds=[a.advertise_address])

    def peers_seen(svc: MeshService) -> int:
        return len({o.node for o in svc.provider.offers()})  # type: ignore[union-attr]

    await wait_for(lambda: peers_seen(a) == 2 and peers_seen(b) == 2, "a and b each see two peers")
    system = {"role": "system", "content": "You reply in one line. " * 60}
    first = [system, {"role": "user", "content": "hello " * 60}]
    home = a.router.explain("m", body={"messages": first})["winner"]["node"]
    assert b.router.explain("m", body={"messages": first})["winner"]["node"] == home

    def chat(messages: list[dict]) -> InferenceRequest:
        return InferenceRequest(kind=RequestKind.CHAT, model="m", body={"messages": messages},
                                request_id=str(uuid.uuid4()), deadline=time.monotonic() + 10)

    routed = await a.router.complete(chat(first))
    assert routed.served.node == home and len(workers[home].calls) == 1
    later = [*first, {"role": "assistant", "content": "hi " * 60},
             {"role": "user", "content": "more " * 60}]

    def hit_from_b() -> int:
        rows = b.router.explain("m", body={"messages": later})["candidates"]
        return next(r["prefix_hit_blocks"] for r in rows if r["node"] == home)

    await wait_for(lambda: hit_from_b() > 0, "b routes a prefix hit to home")
    out = b.router.explain("m", body={"messages": later})
    assert out["winner"]["node"] == home and "prefix hit" in out["winner"]["reason"]
    routed = await b.router.complete(chat(later))
    assert routed.served.node == home and len(workers[home].calls) == 2
