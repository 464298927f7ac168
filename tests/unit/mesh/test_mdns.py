"""mDNS discovery on loopback only (zeroconf bound to 127.0.0.1): three nodes with no seeds find
each other by mDNS alone; a node of another mesh (another secret) is never joined; two nodes
with the same id are detected and reported; an interface that does not exist is a warning and
the seeds still form the mesh. Skipped, with the reason, when loopback cannot do multicast."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import uuid
from collections.abc import AsyncIterator

import pytest

from meshnode.mesh.mdns import interface_addresses
from tests.kit.mesh_services import MeshServices, members
from tests.kit.wait import wait_for

pytestmark = pytest.mark.timeout(90)
WAIT_S = 30.0  # mDNS answers and re-announces on its own timers


def _loopback_multicast() -> str:
    """'' when lo carries MULTICAST (set it if we may), else why not."""
    try:
        flags = subprocess.run(["ip", "link", "show", "lo"], capture_output=True, text=True,
                               check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"cannot read the loopback flags: {exc}"
    if "MULTICAST" in flags:
        return ""
    done = subprocess.run(["ip", "link", "set", "lo", "multicast", "on"], capture_output=True,
                          text=True)
    if done.returncode != 0:
        return f"loopback has no MULTICAST flag and it cannot be set: {done.stderr.strip()}"
    return ""


NO_MULTICAST = _loopback_multicast()
needs_multicast = pytest.mark.skipif(bool(NO_MULTICAST), reason=NO_MULTICAST)


@pytest.fixture
async def nodes() -> AsyncIterator[MeshServices]:
    n = MeshServices(listen_addr="127.0.0.1:0", probe_interval_ms=100, gossip_interval_ms=100,
                     mdns=True)
    yield n
    await n.stop()



def test_only_the_interface_that_carries_the_listen_address() -> None:
    assert interface_addresses([], "127.0.0.1:50051", "127.0.0.1:50051") == ["127.0.0.1"]
    assert interface_addresses([], "localhost:1", "localhost:1") == ["127.0.0.1"]
    assert interface_addresses([], "0.0.0.0:1", "127.0.0.1:1") == ["127.0.0.1"]
    assert interface_addresses(["lo"], "0.0.0.0:1", "10.9.9.9:1") == ["127.0.0.1"]
    assert interface_addresses(["no-such-if0"], "127.0.0.1:1", "127.0.0.1:1") == []


@needs_multicast
async def test_three_nodes_find_each_other_by_mdns_alone(nodes: MeshServices) -> None:
    secret = uuid.uuid4().hex  # a mesh of our own: other nodes on this host are not ours
    trio = [await nodes.start(f"mdns-{i}", secret=secret) for i in range(3)]
    assert all(s.mdns is not None and s.mdns.running for s in trio)
    assert all(s.mdns.interfaces == ["127.0.0.1"] for s in trio)  # type: ignore[union-attr]
    names = {s.node_id for s in trio}
    await wait_for(lambda: all(members(s) == names for s in trio),
                   "the three nodes find each other by mDNS", WAIT_S)
    # A node of another mesh on the same link is never joined (nor does it join us).
    stranger = await nodes.start("stranger", secret=uuid.uuid4().hex)
    await wait_for(lambda: stranger.mdns is not None and bool(stranger.mdns.running),
                   "the stranger's mDNS runs", WAIT_S)
    await asyncio.sleep(1.0)
    assert members(stranger) == {"stranger"}
    assert all(members(s) == names for s in trio)


@needs_multicast
async def test_two_nodes_with_the_same_id_are_reported(
    nodes: MeshServices, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    secret = uuid.uuid4().hex
    first = await nodes.start("twin", secret=secret)
    second = await nodes.start("twin", secret=secret)
    await wait_for(lambda: "twin" in first.mdns.duplicates  # type: ignore[union-attr]
                   and "twin" in second.mdns.duplicates,  # type: ignore[union-attr]
                   "both twins see the duplicate id", WAIT_S)
    assert any("two nodes announce the id twin" in r.getMessage() for r in caplog.records)
    assert members(first) == {"twin"} and members(second) == {"twin"}


async def test_missing_interface_is_a_warning_and_seeds_still_work(
    nodes: MeshServices, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    a = await nodes.start("a", mdns_interfaces=["no-such-if0"])
    b = await nodes.start("b", mdns_interfaces=["no-such-if0"], seeds=[a.advertise_address])
    await wait_for(lambda: members(a) == {"a", "b"} == members(b),
                   "a and b join by mDNS on the interface left", WAIT_S)
    assert a.mdns is not None and not a.mdns.running
    assert any("no-such-if0" in r.getMessage() for r in caplog.records)
