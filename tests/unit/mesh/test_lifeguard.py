"""Lifeguard in the driver, over the MockNetwork: a node whose own event loop is starved during
its probes does not accuse the peers it could not hear, and slows itself down instead; the same
silence without the lag is a suspicion (the control case)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

import pytest

from meshnode.mesh.driver import MeshDriver
from meshnode.mesh.membership import Membership, MembershipSettings
from meshnode.mesh.state import MemberStatus, NodeState
from meshnode.mesh.transport import Ack, MockNetwork, MockTransport, Probe, TransportError
from tests.kit.wait import wait_for

pytestmark = pytest.mark.timeout(60)

FAST = MembershipSettings(probe_interval_s=0.05, probe_timeout_s=0.04, indirect_probes=2,
                          suspicion_mult=3.0, dead_forget_s=60.0)
NAMES = ["a", "b", "c", "d"]


class DeafTransport(MockTransport):
    """Node a hears no answer to its own probes; with `starve`, its loop is blocked for three
    timeouts first (as a CPU-starved process would see its timers fire late)."""

    def __init__(self, network: MockNetwork, address: str) -> None:
        super().__init__(network, address)
        self.deaf = False
        self.starve = False

    async def probe(self, address: str, probe: Probe, timeout: float) -> Ack:
        if not self.deaf:
            return await super().probe(address, probe, timeout)
        if self.starve and not probe.target_node:
            # Longer than the direct and indirect timeouts together: every timer fires late.
            time.sleep(timeout * 5)  # noqa: ASYNC251 - blocking the loop is the point
        else:
            await asyncio.sleep(0)
        raise TransportError(f"{address}: no answer")


@pytest.fixture
async def mesh() -> AsyncIterator[tuple[dict[str, MeshDriver], DeafTransport]]:
    net = MockNetwork(rng=random.Random(5))
    loop = asyncio.get_running_loop()
    drivers: dict[str, MeshDriver] = {}
    deaf = DeafTransport(net, "a")
    for name in NAMES:
        m = Membership(name, name, FAST, loop.time, random.Random(name), NodeState(name, 1, name))
        transport = deaf if name == "a" else net.transport(name)
        d = MeshDriver(m, transport, gossip_interval_s=0.03, rng=random.Random(name + "g"))
        net.register(name, d)
        drivers[name] = d
        d.start()
    for name in NAMES[1:]:
        assert await drivers[name].join("a")
    await wait_for(lambda: all(
        (x := drivers[o].membership.get(s)) is not None and x.status is MemberStatus.ALIVE
        for o in NAMES for s in NAMES), "every node sees every node alive")
    yield drivers, deaf
    for d in drivers.values():
        await d.stop()


def suspected_by_a(drivers: dict[str, MeshDriver]) -> list[str]:
    """Peers a suspects now, or suspected earlier (they refuted: their incarnation rose)."""
    return [m.node_id for m in drivers["a"].membership.members()
            if m.node_id != "a" and (m.status is not MemberStatus.ALIVE or m.incarnation > 0)]


async def test_starved_node_does_not_accuse_and_slows_down(
    mesh: tuple[dict[str, MeshDriver], DeafTransport],
) -> None:
    drivers, deaf = mesh
    deaf.deaf = deaf.starve = True
    a = drivers["a"]
    await wait_for(lambda: a.lagged >= 3, "a counts three lagged probe rounds")
    assert suspected_by_a(drivers) == []
    assert a.membership.awareness >= 1
    assert a.membership.probe_timeout() > FAST.probe_timeout_s
    # Healthy again: successful probes bring the score back down.
    deaf.deaf = deaf.starve = False
    await wait_for(lambda: a.membership.awareness == 0, "a's awareness returns to 0")
    assert suspected_by_a(drivers) == []


async def test_control_the_same_silence_without_lag_is_a_suspicion(
    mesh: tuple[dict[str, MeshDriver], DeafTransport],
) -> None:
    drivers, deaf = mesh
    deaf.deaf = True
    await wait_for(lambda: suspected_by_a(drivers) != [], "a suspects someone")
