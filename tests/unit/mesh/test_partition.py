"""A 2+2 partition over the in-memory MockNetwork heals by itself.

Neither side is ever alone, so the seed joiner (which re-joins only a node with no live peer)
cannot bridge it: the driver itself must keep knocking on members it declared dead, and the
refutations that follow must bring every member back to alive on every node.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from meshnode.mesh.driver import MeshDriver
from meshnode.mesh.membership import Membership, MembershipSettings
from meshnode.mesh.state import MemberStatus, MemberUpdate, NodeState
from meshnode.mesh.transport import MockNetwork
from tests.kit.wait import wait_for

pytestmark = pytest.mark.timeout(60)

FAST = MembershipSettings(
    probe_interval_s=0.05, probe_timeout_s=0.04, indirect_probes=2, suspicion_mult=3.0,
    dead_forget_s=60.0,
)
LEFT = ("a", "b")
RIGHT = ("c", "d")
NAMES = LEFT + RIGHT


class Mesh:
    def __init__(self, net: MockNetwork) -> None:
        self.net = net
        self.drivers: dict[str, MeshDriver] = {}

    def add(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        m = Membership(name, name, FAST, loop.time, random.Random(name), NodeState(name, 1, name))
        d = MeshDriver(m, self.net.transport(name), gossip_interval_s=0.03,
                       rng=random.Random(name + "g"))
        self.net.register(name, d)
        self.drivers[name] = d
        d.start()

    def view(self, observer: str) -> dict[str, MemberStatus]:
        return {m.node_id: m.status for m in self.drivers[observer].membership.members()}

    def sees(self, observers: tuple[str, ...], subjects: tuple[str, ...],
             status: MemberStatus) -> bool:
        return all(self.view(o).get(s) is status for o in observers for s in subjects)

    def cut(self) -> None:
        self.net.partitions |= {frozenset((x, y)) for x in LEFT for y in RIGHT}

    def heal(self) -> None:
        self.net.partitions.clear()


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    m = Mesh(MockNetwork(rng=random.Random(6)))
    for name in NAMES:
        m.add(name)
    for name in NAMES[1:]:
        assert await m.drivers[name].join("a")
    await wait_for(lambda: m.sees(NAMES, NAMES, MemberStatus.ALIVE), "all four alive")
    yield m
    for d in m.drivers.values():
        await d.stop()


async def test_two_sides_declare_each_other_dead_then_reconverge(mesh: Mesh) -> None:
    mesh.cut()
    await wait_for(lambda: mesh.sees(LEFT, RIGHT, MemberStatus.DEAD)
                   and mesh.sees(RIGHT, LEFT, MemberStatus.DEAD), "each side sees the other dead")
    # Each side stayed whole.
    assert mesh.sees(LEFT, LEFT, MemberStatus.ALIVE)
    assert mesh.sees(RIGHT, RIGHT, MemberStatus.ALIVE)

    mesh.heal()  # nobody calls join(): the mesh must find its way back alone
    await wait_for(lambda: mesh.sees(NAMES, NAMES, MemberStatus.ALIVE),
                   "every node sees every node alive after the heal")
    # It holds: several more probe rounds leave nobody suspect or dead.
    for _ in range(20):
        await asyncio.sleep(FAST.probe_interval_s)
        assert mesh.sees(NAMES, NAMES, MemberStatus.ALIVE), {n: mesh.view(n) for n in NAMES}


async def test_a_dead_member_is_knocked_on_with_its_death_and_refutes(mesh: Mesh) -> None:
    # a and c declared each other dead (a one-way cut that healed), and only they can talk:
    # neither gossips with a member it thinks dead, so only a knock can bring them back.
    ma, mc = mesh.drivers["a"].membership, mesh.drivers["c"].membership
    c_before, a_before = ma.get("c"), mc.get("a")
    assert c_before is not None and a_before is not None
    mesh.net.partitions |= {frozenset((x, y)) for x in ("a", "c") for y in ("b", "d")}
    ma.apply(MemberUpdate("c", c_before.address, c_before.incarnation, MemberStatus.DEAD, "a"))
    mc.apply(MemberUpdate("a", a_before.address, a_before.incarnation, MemberStatus.DEAD, "c"))
    await wait_for(lambda: mesh.view("a")["c"] is MemberStatus.ALIVE
                   and mesh.view("c")["a"] is MemberStatus.ALIVE, "a and c see each other again")
    revived = ma.get("c")
    assert revived is not None and revived.incarnation > c_before.incarnation  # c refuted
    assert mc.me.incarnation == revived.incarnation


async def test_left_members_are_not_knocked_on(mesh: Mesh) -> None:
    leaver = mesh.drivers["d"]
    await leaver.stop()
    await leaver.leave(timeout=1.0)
    sent = mesh.net.sent
    knocked: list[str] = []
    original = mesh.net._reach

    def watch(src: str, dst: str):  # type: ignore[no-untyped-def]
        if dst == "d":
            knocked.append(src)
        return original(src, dst)

    mesh.net._reach = watch  # type: ignore[method-assign]
    await wait_for(lambda: mesh.net.sent > sent + 100, "traffic flows")
    assert knocked == []
    assert mesh.sees(("a", "b", "c"), ("d",), MemberStatus.LEFT)
