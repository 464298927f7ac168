"""Mesh authentication on real gRPC over loopback: HMAC with `mesh.secret`, mTLS with
`mesh.tls`, and the start-up refusal of an unauthenticated mesh beyond loopback.

Every refused case asserts both sides: the call is refused (UNAUTHENTICATED or a failed TLS
handshake) and the intruder never appears in the honest node's membership (nor the honest node
in the intruder's)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from meshnode.cli.main import build_parser, run_overrides
from meshnode.config import MeshConfig, RoutingConfig, TLSConfig
from meshnode.errors import ConfigError
from meshnode.mesh.service import MeshService
from meshnode.mesh.state import GossipRecord, MemberStatus, MemberUpdate, NodeState
from meshnode.mesh.transport import GossipMessage, Probe
from meshnode.providers.fake import FakeProvider
from meshnode.routing.router import Router
from meshnode.rpc import convert
from meshnode.rpc.auth import MeshAuth, ReplayCache
from meshnode.rpc.client import GOSSIP, HEALTH, INFER
from meshnode.rpc.generated import mesh_pb2 as pb
from meshnode.rpc.security import MeshSecurity
from meshnode.types import InferenceRequest, RequestKind
from tests.kit.mesh_services import MeshServices, members
from tests.kit.wait import wait_for
from tests.unit.rpc.tls_certs import LeafFiles, TestCA

pytestmark = pytest.mark.timeout(60)

SECRET = "s3cret-mesh-key-for-tests"
MESH = dict(listen_addr="127.0.0.1:0", probe_interval_ms=50, probe_timeout_ms=100,
            gossip_interval_ms=50, mdns=False)


class Nodes(MeshServices):
    async def start(  # type: ignore[override]
        self, node_id: str, models: list[str] | None = None, **mesh: object
    ) -> MeshService:
        providers = [FakeProvider("fakeai", models=models, text="authed answer", chunks=2)] \
            if models else []
        return await super().start(node_id, providers, **mesh)


@pytest.fixture
async def nodes() -> AsyncIterator[Nodes]:
    n = Nodes(**MESH)
    yield n
    await n.stop()



async def settle(svc: MeshService, rounds: int = 10) -> None:
    """Let a few gossip/probe intervals pass (a refusal has nothing to wait on)."""
    await asyncio.sleep(rounds * 0.05)


# ------------------------------------------------------------------------------ HMAC
async def test_nodes_with_the_secret_join_and_forward(nodes: Nodes,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    b = await nodes.start("b", models=["m"], secret=SECRET)
    a = await nodes.start("a", secret=SECRET, seeds=[b.advertise_address])
    await wait_for(lambda: members(a) == {"a", "b"} == members(b), "a and b see each other")
    await wait_for(lambda: any(o.model == "m" for o in a.provider.offers()),
                   "a learns b's offer of m")
    request = InferenceRequest(
        kind=RequestKind.CHAT, model="m", body={"model": "m", "messages": []},
        request_id=uuid.uuid4().hex, deadline=time.monotonic() + 10,
    )
    routed = await a.router.complete(request)
    assert routed.served.node == "b"
    assert a.security.mode == "hmac"
    assert not a.guard.refused and not b.guard.refused
    assert all(SECRET not in r.getMessage() for r in caplog.records)
    assert SECRET not in repr(a.security)


async def test_wrong_secret_is_refused_and_never_a_member(nodes: Nodes) -> None:
    a = await nodes.start("a", secret=SECRET)
    intruder = await nodes.start("intruder", secret="not-the-secret", seeds=[a.advertise_address])
    await wait_for(lambda: a.guard.refused["bad_mac"] >= 2, "a refuses two gossips with a bad MAC")
    await settle(a)
    assert members(a) == {"a"}
    assert members(intruder) == {"intruder"}


async def test_no_secret_at_all_is_refused(nodes: Nodes) -> None:
    a = await nodes.start("a", secret=SECRET)
    intruder = await nodes.start("plain", seeds=[a.advertise_address])
    await wait_for(lambda: a.guard.refused["missing"] >= 2, "a refuses two gossips with no MAC")
    await settle(a)
    assert members(a) == {"a"} and members(intruder) == {"plain"}


async def test_honest_node_does_not_take_records_from_an_unauthenticated_answer(
    nodes: Nodes,
) -> None:
    # The seed runs without the secret (it checks nothing); its answers carry no MAC, so the
    # honest node must not believe them.
    open_seed = await nodes.start("open-seed")
    a = await nodes.start("a", secret=SECRET, seeds=[open_seed.advertise_address])
    await settle(a, 20)
    assert members(a) == {"a"}


def _ghost_join(ghost: str) -> bytes:
    message = GossipMessage(
        ghost, digest=(), join=True,
        records=(GossipRecord(MemberUpdate(ghost, "127.0.0.1:1", 0, MemberStatus.ALIVE,
                                                   ghost), NodeState(ghost, 1, "127.0.0.1:1")),),
    )
    return convert.gossip_request_to_pb(message).SerializeToString()


async def test_stale_timestamp_is_refused_and_never_a_member(nodes: Nodes) -> None:
    a = await nodes.start("a", secret=SECRET)
    old = MeshAuth(SECRET, clock=lambda: time.time() - 120.0)
    body = _ghost_join("ghost")
    metadata, _ = old.sign_request("ghost", GOSSIP, body)
    async with grpc.aio.insecure_channel(a.advertise_address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary(GOSSIP)(body, metadata=metadata, timeout=5)
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert a.guard.refused["stale"] == 1
    assert members(a) == {"a"}
    # The same message signed now is accepted: the refusal was the timestamp, nothing else.
    fresh = MeshAuth(SECRET)
    metadata, _ = fresh.sign_request("ghost", GOSSIP, body)
    async with grpc.aio.insecure_channel(a.advertise_address) as channel:
        await channel.unary_unary(GOSSIP)(body, metadata=metadata, timeout=5)
    assert "ghost" in members(a)


async def test_replayed_message_is_refused(nodes: Nodes) -> None:
    a = await nodes.start("a", secret=SECRET)
    signer = MeshAuth(SECRET)
    probe = convert.probe_to_pb(Probe("someone", 7)).SerializeToString()
    metadata, _ = signer.sign_request("someone", HEALTH, probe)
    gossip = _ghost_join("ghost-2")
    gossip_metadata, _ = signer.sign_request("ghost-2", GOSSIP, gossip)
    async with grpc.aio.insecure_channel(a.advertise_address) as channel:
        health = channel.unary_unary(HEALTH)
        await health(probe, metadata=metadata, timeout=5)  # the original: accepted
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health(probe, metadata=metadata, timeout=5)  # the copy: refused
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        # A gossip join captured and replayed after the ghost left changes nothing.
        await channel.unary_unary(GOSSIP)(gossip, metadata=gossip_metadata, timeout=5)
        assert "ghost-2" in members(a)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary(GOSSIP)(gossip, metadata=gossip_metadata, timeout=5)
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert a.guard.refused["replayed"] == 2


def _infer_for(node: str) -> bytes:
    request = InferenceRequest(
        kind=RequestKind.CHAT, model="m", request_id="captured", deadline=time.monotonic() + 10,
        body={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    )
    return convert.infer_request_to_pb(request, ("x",), "x", 10.0).SerializeToString()


async def _infer(address: str, body: bytes, metadata: list[tuple[str, str]]) -> list[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_stream(INFER, response_deserializer=pb.InferChunk.FromString)
        return [m.WhichOneof("payload") for m in [x async for x in call(
            body, metadata=metadata, timeout=5)]]


async def test_infer_captured_for_one_node_is_refused_by_another_and_after_a_restart(
    nodes: Nodes,
) -> None:
    """The MAC names the callee, and the replay floor is the process start: a captured Infer
    works once, on the node it was meant for, before that node restarts."""
    b = await nodes.start("b", ["m"], secret=SECRET)
    c = await nodes.start("c", ["m"], secret=SECRET)
    body = _infer_for("b")
    metadata, _ = MeshAuth(SECRET).sign_request("x", INFER, body, callee="b")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _infer(c.advertise_address, body, metadata)
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert c.guard.refused["wrong_callee"] == 1
    unaddressed, _ = MeshAuth(SECRET).sign_request("x", INFER, body)
    with pytest.raises(grpc.aio.AioRpcError):
        await _infer(b.advertise_address, body, unaddressed)
    assert b.guard.refused["no_callee"] == 1
    assert (await _infer(b.advertise_address, body, metadata))[-1] == "final"  # the original
    address = b.advertise_address
    await b.stop(graceful=False, grace_s=0)
    nodes.services.remove(b)
    restarted = await nodes.start("b", ["m"], secret=SECRET, listen_addr=address)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _infer(restarted.advertise_address, body, metadata)
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert restarted.guard.refused["stale"] == 1
    fresh, _ = MeshAuth(SECRET).sign_request("x", INFER, body, callee="b")
    assert (await _infer(restarted.advertise_address, body, fresh))[-1] == "final"


async def test_tampered_body_is_refused(nodes: Nodes) -> None:
    a = await nodes.start("a", secret=SECRET)
    body = _ghost_join("ghost-3")
    metadata, _ = MeshAuth(SECRET).sign_request("ghost-3", GOSSIP, body)
    tampered = _ghost_join("ghost-4")
    async with grpc.aio.insecure_channel(a.advertise_address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary(GOSSIP)(tampered, metadata=metadata, timeout=5)
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert members(a) == {"a"}


def test_replay_cache_is_bounded_and_eviction_never_reopens_a_replay() -> None:
    cache = ReplayCache(max_entries=3)
    window = 30_000
    for i in range(5):
        assert cache.check_and_add(bytes([i]), 1000 + i, 2000, window) is None
    assert len(cache) == 3
    # Entries 0 and 1 were evicted: their timestamps are now below the floor, so stale.
    assert cache.check_and_add(bytes([1]), 1001, 2000, window) == "stale"
    assert cache.check_and_add(bytes([4]), 1004, 2000, window) == "replayed"
    # Time passes beyond the window: everything expires.
    assert cache.check_and_add(b"new", 100_000, 100_000, window) is None
    assert len(cache) == 1


# ------------------------------------------------------------------------------ mTLS
def _tls(files: LeafFiles) -> dict[str, object]:
    return {"tls": TLSConfig(cert_file=files.cert_file, key_file=files.key_file,
                             ca_file=files.ca_file)}


async def test_mtls_same_ca_joins_other_ca_is_refused(nodes: Nodes, tmp_path: Path) -> None:
    mesh_ca = TestCA(tmp_path, "mesh")
    other_ca = TestCA(tmp_path, "other")
    a = await nodes.start("a", **_tls(mesh_ca.issue("a")))
    b = await nodes.start("b", seeds=[a.advertise_address], **_tls(mesh_ca.issue("b")))
    await wait_for(lambda: members(a) == {"a", "b"} == members(b), "a and b join over mTLS")
    assert a.security.mode == "mtls"
    # A client certificate from another CA (which trusts its own CA only, or ours).
    rogue = await nodes.start("rogue", seeds=[a.advertise_address], **_tls(other_ca.issue("rogue")))
    both = other_ca.issue("rogue2")
    trusting = await nodes.start(
        "rogue2", seeds=[a.advertise_address],
        tls=TLSConfig(cert_file=both.cert_file, key_file=both.key_file, ca_file=mesh_ca.ca_file),
    )
    # A plaintext client: no certificate at all.
    plain = await nodes.start("plain", seeds=[a.advertise_address])
    await wait_for(lambda: rogue.joiner is not None and trusting.joiner is not None,
                   "rogue and rogue2 have tried to join")
    await settle(a, 30)
    assert members(a) == {"a", "b"} and members(b) == {"a", "b"}
    assert members(rogue) == {"rogue"} and members(trusting) == {"rogue2"}
    assert members(plain) == {"plain"}


def test_partial_tls_config_is_a_config_error(tmp_path: Path) -> None:
    ca = TestCA(tmp_path, "mesh")
    files = ca.issue("a")
    config = MeshConfig(**MESH, tls=TLSConfig(cert_file=files.cert_file, key_file=files.key_file))
    with pytest.raises(ConfigError) as err:
        MeshService(config, "a", Router(RoutingConfig(), ["mesh"], [], "a"), announce=False)
    assert err.value.errors == ["mesh.tls.ca_file: required for mTLS"]


# ------------------------------------------------------------------------------ exposure
@pytest.mark.parametrize("listen", ["0.0.0.0:50051", "[::]:50051", "10.1.2.3:50051"])
def test_unauthenticated_mesh_beyond_loopback_is_refused_at_start(listen: str) -> None:
    router = Router(RoutingConfig(), ["mesh"], [], "a")
    with pytest.raises(ConfigError) as err:
        MeshService(MeshConfig(listen_addr=listen), "a", router, announce=False)
    assert "--insecure" in err.value.errors[0] and err.value.errors[0].startswith("mesh.listen_addr")
    # Any of: a secret, --insecure.
    MeshService(MeshConfig(listen_addr=listen, secret="x"), "a", router, announce=False)
    MeshService(MeshConfig(listen_addr=listen, insecure=True), "a", router, announce=False)


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "127.0.0.5:0", "localhost:0", "[::1]:0"])
def test_loopback_needs_no_authentication(listen: str) -> None:
    router = Router(RoutingConfig(), ["mesh"], [], "a")
    MeshService(MeshConfig(listen_addr=listen), "a", router, announce=False)


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "0.0.0.0:50051"])
def test_auth_on_needs_an_authenticated_mesh_even_on_loopback(listen: str) -> None:
    with pytest.raises(ConfigError) as err:
        MeshSecurity.from_config(MeshConfig(listen_addr=listen), auth_enabled=True)
    (line,) = err.value.errors
    assert line.startswith("auth.enabled: true needs an authenticated mesh") and "--insecure" in line
    assert MeshSecurity.from_config(MeshConfig(listen_addr=listen, secret="x"),
                                    auth_enabled=True).authenticated
    insecure = MeshSecurity.from_config(MeshConfig(listen_addr=listen, insecure=True),
                                        auth_enabled=True)
    assert not insecure.authenticated


def test_insecure_flag_maps_to_mesh_insecure() -> None:
    parser = build_parser()
    assert run_overrides(parser.parse_args(["run", "--insecure"]))["mesh.insecure"] is True
    assert run_overrides(parser.parse_args(["run"]))["mesh.insecure"] is None


def test_auth_has_no_secret_in_its_repr() -> None:
    assert SECRET not in repr(MeshAuth(SECRET)) and SECRET not in str(vars(MeshAuth(SECRET)))


