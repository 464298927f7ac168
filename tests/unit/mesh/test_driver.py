"""The SWIM driver over the in-memory MockNetwork: join, failure detection, leave, refutation."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from meshnode.mesh.driver import MeshDriver
from meshnode.mesh.membership import Membership, MembershipSettings
from meshnode.mesh.state import MemberStatus, NodeState
from meshnode.mesh.transport import MockNetwork
from tests.kit.wait import wait_for

# A hang (a stop that never returns) must fail fast, not after the global 300 s.
pytestmark = pytest.mark.timeout(60)

FAST = MembershipSettings(
    probe_interval_s=0.05, probe_timeout_s=0.04, indirect_probes=2, suspicion_mult=3.0,
    dead_forget_s=60.0,
)


class Cluster:
    def __init__(self, net: MockNetwork) -> None:
        self.net = net
        self.drivers: dict[str, MeshDriver] = {}

    def add(self, name: str) -> MeshDriver:
        loop = asyncio.get_running_loop()
        m = Membership(name, name, FAST, loop.time, random.Random(name),
                       NodeState(name, 1, name))
        d = MeshDriver(m, self.net.transport(name), gossip_interval_s=0.03,
                       rng=random.Random(name + "g"))
        self.net.register(name, d)
        self.drivers[name] = d
        d.start()
        return d

    def status_seen_by(self, observer: str, subject: str) -> MemberStatus | None:
        member = self.drivers[observer].membership.get(subject)
        return member.status if member is not None else None

    def everyone_sees(self, subject: str, status: MemberStatus, among: list[str]) -> bool:
        return all(self.status_seen_by(o, subject) is status for o in among)

    async def stop(self) -> None:
        for d in self.drivers.values():
            await d.stop()


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    c = Cluster(MockNetwork(rng=random.Random(1)))
    yield c
    await c.stop()


async def test_five_nodes_join_through_one_seed_and_detect_a_death(cluster: Cluster) -> None:
    names = ["a", "b", "c", "d", "e"]
    for name in names:
        cluster.add(name)
    for name in names[1:]:
        assert await cluster.drivers[name].join("a")
    await wait_for(lambda: all(cluster.everyone_sees(s, MemberStatus.ALIVE, names)
                               for s in names), "every node sees every node alive")
    # States travelled with the records.
    assert cluster.drivers["e"].membership.get("b").state is not None

    cluster.net.down.add("c")
    await cluster.drivers["c"].stop()
    live = [n for n in names if n != "c"]
    await wait_for(lambda: cluster.everyone_sees("c", MemberStatus.DEAD, live),
                   "the live nodes all see c dead")
    # No false deaths among the live ones.
    assert all(cluster.everyone_sees(s, MemberStatus.ALIVE, live) for s in live)


async def test_graceful_leave_reaches_everyone(cluster: Cluster) -> None:
    names = ["a", "b", "c", "d"]
    for name in names:
        cluster.add(name)
    for name in names[1:]:
        await cluster.drivers[name].join("a")
    await wait_for(lambda: all(cluster.everyone_sees(s, MemberStatus.ALIVE, names)
                               for s in names), "every node sees every node alive")
    leaver = cluster.drivers["b"]
    await leaver.stop()
    acked = await leaver.leave(timeout=1.0)
    assert acked == 3
    # The leave was pushed to everyone directly: no waiting on gossip.
    assert cluster.everyone_sees("b", MemberStatus.LEFT, ["a", "c", "d"])


async def test_suspected_node_refutes_and_stays_alive(cluster: Cluster) -> None:
    names = ["a", "b", "c"]
    for name in names:
        cluster.add(name)
    for name in names[1:]:
        await cluster.drivers[name].join("a")
    await wait_for(lambda: all(cluster.everyone_sees(s, MemberStatus.ALIVE, names)
                               for s in names), "every node sees every node alive")
    # a wrongly suspects b; b hears it and refutes with a higher incarnation.
    spread = cluster.drivers["a"].membership.probe_failed("b")
    assert spread is not None
    cluster.drivers["a"].spread(spread)
    await wait_for(lambda: cluster.drivers["b"].membership.me.incarnation >= 1,
                   "b refutes with a higher incarnation")
    await wait_for(lambda: cluster.everyone_sees("b", MemberStatus.ALIVE, names),
                   "everyone sees b alive again")
    assert cluster.drivers["a"].membership.get("b").incarnation >= 1


async def test_partitioned_node_is_declared_dead_then_rejoins(cluster: Cluster) -> None:
    names = ["a", "b", "c"]
    for name in names:
        cluster.add(name)
    for name in names[1:]:
        await cluster.drivers[name].join("a")
    await wait_for(lambda: all(cluster.everyone_sees(s, MemberStatus.ALIVE, names)
                               for s in names), "every node sees every node alive")
    cluster.net.down.add("c")
    await wait_for(lambda: cluster.everyone_sees("c", MemberStatus.DEAD, ["a", "b"]),
                   "a and b see c dead")
    # c comes back (same process, it never stopped): it learns it was declared dead and refutes.
    cluster.net.down.discard("c")
    assert await cluster.drivers["c"].join("a")
    await wait_for(lambda: cluster.everyone_sees("c", MemberStatus.ALIVE, names),
                   "everyone sees c alive after it refutes")
