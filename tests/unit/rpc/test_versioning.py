"""Protocol versioning on real gRPC: a node one version newer (protocol_version 2, fields this
node does not know, at the top level and inside nested messages) is understood by this older
node on all three calls; a message without a version (0) is refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from meshnode.config import MeshConfig, RoutingConfig
from meshnode.mesh.service import MeshService
from meshnode.mesh.state import PROTOCOL_VERSION
from meshnode.providers.fake import FakeProvider
from meshnode.routing.router import Router
from meshnode.rpc import convert
from meshnode.rpc.client import GOSSIP, HEALTH, INFER
from meshnode.rpc.generated import mesh_pb2 as pb

pytestmark = pytest.mark.timeout(60)

# Unknown fields a version-2 sender might add: field 16 (varint 7) and field 150 (bytes "new").
UNKNOWN = b"\x80\x01\x07" + b"\xb2\x09\x03new"
NEWER = PROTOCOL_VERSION + 1


@pytest.fixture
async def node() -> AsyncIterator[MeshService]:
    fake = FakeProvider("fakeai", models=["m"], text="old node answers")
    router = Router(RoutingConfig(), ["fakeai"], [fake], "old")
    svc = MeshService(MeshConfig(listen_addr="127.0.0.1:0", mdns=False), "old", router,
                      announce=False)
    await svc.start()
    yield svc
    await svc.stop(graceful=False, grace_s=0)


async def test_newer_peer_is_understood_on_every_call(node: MeshService) -> None:
    state = pb.NodeState(node_id="new", version=1, grpc_address="127.0.0.1:1",
                         protocol_version=NEWER)
    record = pb.GossipRecord(
        member=pb.MemberUpdate(node_id="new", address="127.0.0.1:1", status=1),
        state=pb.NodeState.FromString(state.SerializeToString() + UNKNOWN),
    )
    gossip = pb.GossipRequest(protocol_version=NEWER, from_node="new", join=True,
                              records=[record]).SerializeToString() + UNKNOWN
    health = pb.HealthRequest(protocol_version=NEWER, from_node="new",
                              seq=3).SerializeToString() + UNKNOWN
    infer = pb.InferRequest(protocol_version=NEWER, kind="chat", model="m",
                            body=convert.pack({"model": "m", "messages": []}),
                            deadline_ms=5000).SerializeToString() + UNKNOWN
    async with grpc.aio.insecure_channel(node.advertise_address) as channel:
        reply = pb.GossipResponse.FromString(
            await channel.unary_unary(GOSSIP)(gossip, timeout=10))
        ack = pb.HealthResponse.FromString(await channel.unary_unary(HEALTH)(health, timeout=10))
        chunks = [pb.InferChunk.FromString(c)
                  async for c in channel.unary_stream(INFER)(infer, timeout=10)]
    assert reply.protocol_version == PROTOCOL_VERSION  # it answers in its own version
    assert ack.ok and ack.seq == 3 and ack.node_id == "old"
    assert chunks[-1].WhichOneof("payload") == "final"
    assert convert.unpack(chunks[-1].final.body)["choices"][0]["message"]["content"] == \
        "old node answers"
    assert node.membership is not None
    member = node.membership.get("new")
    assert member is not None and member.state is not None
    assert member.state.protocol_version == NEWER  # what the peer speaks, for later features


async def test_message_without_a_version_is_refused(node: MeshService) -> None:
    health = pb.HealthRequest(from_node="x", seq=1).SerializeToString()
    async with grpc.aio.insecure_channel(node.advertise_address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary(HEALTH)(health, timeout=10)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "protocol_version 0" in (err.value.details() or "")
    await asyncio.sleep(0)
