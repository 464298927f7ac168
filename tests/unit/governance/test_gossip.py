"""Gossip of governance state between nodes: signed digests, and the NodeState counter map."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from meshnode.config import AuthConfig, BudgetConfig
from meshnode.errors import BudgetExceeded
from meshnode.governance.gossip import GossipRejected, decode_digest, encode_digest
from meshnode.governance.service import Governance


def gov(tmp_path: Path, node: str, secret: str = "mesh-secret", **budget: object) -> Governance:
    g = Governance(AuthConfig(enabled=True), BudgetConfig(**budget), tmp_path / node, node,
                   mesh_secret=secret)
    g.open()
    return g


def test_key_created_on_a_works_on_c_and_revoked_on_c_is_refused_on_a(tmp_path: Path) -> None:
    a, b, c = gov(tmp_path, "a"), gov(tmp_path, "b"), gov(tmp_path, "c")
    _, secret = a.keys.create("ci", rpm=10)
    b.merge_gossip(a.export_gossip())  # a -> b -> c: relayed, not only direct
    c.merge_gossip(b.export_gossip())
    record = c.keys.lookup(secret)
    assert record is not None and record.rpm == 10
    c.keys.revoke("ci")
    b.merge_gossip(c.export_gossip())
    a.merge_gossip(b.export_gossip())
    assert a.keys.lookup(secret) is None


def test_digest_from_another_mesh_or_tampered_is_rejected(tmp_path: Path) -> None:
    a = gov(tmp_path, "a")
    stranger = gov(tmp_path, "x", secret="other-secret")
    stranger.keys.create("evil", admin=True)
    with pytest.raises(GossipRejected):
        a.merge_gossip(stranger.export_gossip())
    assert a.keys.get("evil") is None
    payload, mac = msgpack.unpackb(a.export_gossip(), raw=False)
    tampered = msgpack.packb([payload + b"\x00", mac], use_bin_type=True)
    with pytest.raises(GossipRejected):
        decode_digest(tampered, "mesh-secret")
    for garbage in (b"", b"\x93\x01\x02\x03", b"not msgpack at all \xff"):
        with pytest.raises(GossipRejected):
            decode_digest(garbage, "mesh-secret")
    assert decode_digest(encode_digest([], [], None), None).records == []


def test_mesh_wide_spend_through_node_state_counters(tmp_path: Path) -> None:
    a = gov(tmp_path, "a", daily_limit=1.0, scope="mesh")
    b = gov(tmp_path, "b", daily_limit=1.0, scope="mesh")
    b.ledger.settle(b.ledger.reserve(0.6, "ci"), 0.6)
    counters = b.gossip_counters()
    assert all(k.startswith("spend|") for k in counters)
    assert a.merge_peer_counters("b", {**counters, "errors": 3.0, "spend|bad": 1.0}) == 4
    assert a.merge_peer_counters("b", counters) == 0
    assert a.ledger.spent() == pytest.approx(0.6)
    with pytest.raises(BudgetExceeded):
        a.ledger.reserve(0.5)
    assert a.merge_peer_counters("a", counters) == 0  # our own name from a peer: ignored
    limited = b.gossip_counters(limit=2)
    assert len(limited) == 2 and all("|*|" in k for k in limited)  # global slots first


def test_signed_digest_carries_counters_too(tmp_path: Path) -> None:
    a = gov(tmp_path, "a", scope="mesh")
    b = gov(tmp_path, "b", scope="mesh")
    b.ledger.settle(b.ledger.reserve(0.25), 0.25)
    assert a.merge_gossip(b.export_gossip()) == (0, 2)
    assert a.ledger.spent() == pytest.approx(0.25)


def test_records_from_an_auth_off_origin_are_refused_logged_once_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A digest MAC'd with the right secret still carries records whose origin had auth off
    (a node from before the flag, or a forged one): they are not merged."""
    on = gov(tmp_path, "on")
    off = Governance(AuthConfig(enabled=False), BudgetConfig(), tmp_path / "off", "off",
                     mesh_secret="mesh-secret")
    off.open()
    record, secret = off.keys.create("minted", admin=True)
    seen: list[tuple[str, int]] = []
    on.on_dropped = lambda reason, n: seen.append((reason, n))
    blob = encode_digest([record], [], "mesh-secret")  # what an old node would send
    with caplog.at_level("WARNING"):
        assert on.merge_gossip(blob, "off") == (0, 0)
        assert on.merge_gossip(blob, "off") == (0, 0)
    assert on.keys.lookup(secret) is None
    assert seen == [("key_unauthorized", 1), ("key_unauthorized", 1)]
    assert on.dropped["key_unauthorized"] == 2
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and "from off" in refusals[0].getMessage()
    assert "auth off" in refusals[0].getMessage()
    assert off.export_gossip() != b"" and decode_digest(off.export_gossip(),
                                                       "mesh-secret").records == []
