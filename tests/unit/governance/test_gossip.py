"""Gossip of governance state between nodes: signed digests, and the NodeState counter map."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from meshnode.config import AuthConfig, BudgetConfig
from meshnode.errors import BudgetExceeded
from meshnode.governance.gossip import (
    PAGE_BYTES,
    RECORDS_PREFIX,
    SPEND_PAGE,
    GossipRejected,
    decode_digest,
    encode_digest,
    encode_pages,
)
from meshnode.governance.service import Governance
from meshnode.rpc.convert import MAX_BLOBS


def gov(tmp_path: Path, node: str, secret: str = "mesh-secret", **budget: object) -> Governance:
    g = Governance(AuthConfig(enabled=True), BudgetConfig(**budget), tmp_path / node, node,
                   mesh_secret=secret)
    g.open()
    return g


def test_key_created_on_a_works_on_c_and_revoked_on_c_is_refused_on_a(tmp_path: Path) -> None:
    """Each node gossips only what it wrote; the mesh relays the owner's state, so C gets A's
    pages through B unchanged, and B does not re-send A's record as its own."""
    a, b, c = gov(tmp_path, "a"), gov(tmp_path, "b"), gov(tmp_path, "c")
    _, secret = a.keys.create("ci", rpm=10)
    a_pages = a.gossip_blobs()
    assert b.merge_gossip_blobs("a", a_pages) == (1, 0)
    assert not any(n.startswith(RECORDS_PREFIX) for n in b.gossip_blobs())  # learned: not b's
    c.merge_gossip_blobs("a", a_pages)  # relayed by b
    record = c.keys.lookup(secret)
    assert record is not None and record.rpm == 10
    c.keys.revoke("ci")
    a.merge_gossip_blobs("c", c.gossip_blobs())
    assert a.keys.lookup(secret) is None
    # A's own page now would carry nothing for "ci": the newer version is c's.
    assert decode_digest(a.export_gossip(), "mesh-secret").records == []


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


def test_pages_carry_500_keys_under_the_cap_and_spend_only_in_its_owners_name(
    tmp_path: Path,
) -> None:
    a = gov(tmp_path, "a", scope="mesh")
    for i in range(500):
        a.keys.create(f"key-{i:03d}", rpm=60, daily_limit=1.0)
        if i % 50 == 0:
            a.ledger.settle(a.ledger.reserve(0.01, f"key-{i:03d}"), 0.01)
    pages = a.gossip_blobs()
    assert len(pages) <= MAX_BLOBS and all(len(p) <= PAGE_BYTES for p in pages.values())
    assert SPEND_PAGE in pages
    b = gov(tmp_path, "b", scope="mesh")
    assert b.merge_gossip_blobs("a", pages) == (500, 2 + 2 * 10)
    assert b.ledger.spent() == pytest.approx(0.1)
    # A page relayed in another node's name: its records merge, its spend slots do not.
    c = gov(tmp_path, "c", scope="mesh")
    assert c.merge_gossip_blobs("impostor", {SPEND_PAGE: pages[SPEND_PAGE]}) == (0, 0)


def test_spend_elsewhere_changes_nothing_here_and_unchanged_pages_write_nothing(
    tmp_path: Path,
) -> None:
    a, b = gov(tmp_path, "a", scope="mesh"), gov(tmp_path, "b", scope="mesh")
    a.keys.create("ci")
    before = a.gossip_blobs()
    b.ledger.settle(b.ledger.reserve(0.5), 0.5)
    a.merge_gossip_blobs("b", b.gossip_blobs())
    assert a.gossip_blobs() == before  # a's state (so its version) does not move
    b.merge_gossip_blobs("a", before)
    wal = tmp_path / "b" / "keys.db-wal"
    size = wal.stat().st_size
    for _ in range(5):  # the same pages, tick after tick: skipped, no keys.db write
        assert b.merge_gossip_blobs("a", before) == (0, 0)
    assert wal.stat().st_size == size
    assert b.keys.merge_records(b.keys.records()) == 0  # nothing newer: no transaction


def test_what_does_not_fit_or_verify_is_logged_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = gov(tmp_path, "a")
    for i in range(40):
        a.keys.create(f"k{i}")
    pages = encode_pages(a.keys.export_records(), [], "mesh-secret", page_bytes=400)
    assert pages.overflow_records and all(len(p) <= 400 for p in pages.blobs.values())
    b = gov(tmp_path, "b")
    seen: list[tuple[str, int]] = []
    b.on_dropped = lambda reason, n: seen.append((reason, n))
    stranger = gov(tmp_path, "x", secret="other-secret")
    stranger.keys.create("evil", admin=True)
    with caplog.at_level("WARNING"):
        assert b.merge_gossip_blobs("x", stranger.gossip_blobs()) == (0, 0)
    assert seen and seen[0][0] == "bad_digest"
    assert any("governance records from x refused" in r.getMessage() for r in caplog.records)


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
