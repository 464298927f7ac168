"""Forged rumours over the in-memory MockNetwork: a "node X is dead" that X never earned is
refuted by X with a higher incarnation, and every node ends up seeing X alive again; a rumour no
one could refute (at the incarnation bound) is ignored."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from meshnode.mesh.driver import MeshDriver
from meshnode.mesh.membership import Membership, MembershipSettings
from meshnode.mesh.state import MAX_INCARNATION, GossipRecord, MemberStatus, MemberUpdate, NodeState
from meshnode.mesh.transport import GossipMessage, MockNetwork
from tests.kit.wait import wait_for

pytestmark = pytest.mark.timeout(60)

FAST = MembershipSettings(probe_interval_s=0.05, probe_timeout_s=0.04, indirect_probes=2,
                          suspicion_mult=3.0, dead_forget_s=60.0)
NAMES = ["a", "b", "c", "d"]


@pytest.fixture
async def drivers() -> AsyncIterator[dict[str, MeshDriver]]:
    net = MockNetwork(rng=random.Random(3))
    loop = asyncio.get_running_loop()
    out: dict[str, MeshDriver] = {}
    for name in NAMES:
        m = Membership(name, name, FAST, loop.time, random.Random(name), NodeState(name, 1, name))
        d = MeshDriver(m, net.transport(name), gossip_interval_s=0.03,
                       rng=random.Random(name + "g"))
        net.register(name, d)
        out[name] = d
        d.start()
    for name in NAMES[1:]:
        assert await out[name].join("a")
    await wait_for(lambda: all_see(out, MemberStatus.ALIVE), "every node sees every node alive")
    yield out
    for d in out.values():
        await d.stop()


def seen(drivers: dict[str, MeshDriver], observer: str, subject: str) -> MemberUpdate | None:
    member = drivers[observer].membership.get(subject)
    return member.rumour() if member is not None else None


def all_see(drivers: dict[str, MeshDriver], status: MemberStatus, subject: str = "") -> bool:
    subjects = [subject] if subject else NAMES
    return all(
        (r := seen(drivers, o, s)) is not None and r.status is status
        for o in NAMES for s in subjects
    )


def forge(victim: str, incarnation: int, status: MemberStatus = MemberStatus.DEAD) -> GossipMessage:
    return GossipMessage("mallory", records=(
        GossipRecord(MemberUpdate(victim, victim, incarnation, status, "mallory")),))


@pytest.mark.parametrize("incarnation", [0, 5, MAX_INCARNATION - 1])
async def test_forged_death_is_refuted_by_the_accused(
    drivers: dict[str, MeshDriver], incarnation: int
) -> None:
    await drivers["a"].on_gossip(forge("b", incarnation))
    assert seen(drivers, "a", "b").status is MemberStatus.DEAD  # a believed it at first
    await wait_for(lambda: drivers["b"].membership.me.incarnation > incarnation,
                   "b refutes with a higher incarnation")
    await wait_for(lambda: all_see(drivers, MemberStatus.ALIVE, "b"), "everyone sees b alive again")
    assert all(seen(drivers, o, "b").incarnation > incarnation for o in NAMES)
    # b never stopped considering itself alive.
    assert drivers["b"].membership.me.status is MemberStatus.ALIVE


async def test_forged_leave_is_refuted_too(drivers: dict[str, MeshDriver]) -> None:
    await drivers["c"].on_gossip(forge("d", 0, MemberStatus.LEFT))
    await wait_for(lambda: all_see(drivers, MemberStatus.ALIVE, "d")
                   and seen(drivers, "c", "d").incarnation >= 1,
                   "everyone sees d alive, c at incarnation >= 1")


@pytest.mark.parametrize("incarnation", [MAX_INCARNATION, MAX_INCARNATION + 1, 2**64 - 1])
async def test_unrefutable_rumour_is_ignored(drivers: dict[str, MeshDriver],
                                             incarnation: int) -> None:
    reply = await drivers["a"].on_gossip(forge("b", incarnation))
    assert reply.from_node == "a"
    assert seen(drivers, "a", "b").status is MemberStatus.ALIVE
    assert seen(drivers, "a", "b").incarnation == 0
    assert drivers["b"].membership.me.incarnation == 0
