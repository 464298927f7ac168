"""Gossip convergence, simulated (SPEC §6: a change reaches every node of 1,000 in <= 12 rounds,
also at 10 % message loss).

It runs the real `Membership` tables (the pure state machine, no sockets) in synchronous rounds:
each round every node does the driver's anti-entropy exchange with `fanout` random peers (digest
-> newer records + wants -> pushed records), each message lost with probability `loss`. One node
publishes a new state; we count rounds until every node holds it.

Governance at scale (issue 15): every node also carries its own 500 API keys as the real signed
pages (`governance.gossip.encode_pages`) in its state; we measure the bytes each node sends per
second in steady state and while one node creates a key, and the time until that key is held by
every node (rounds x gossip interval, plus the publish and merge ticks), at the same loss.
Bytes are the protobuf sizes of the real messages (`rpc.convert`). Usage:

    python -m bench.mesh_gossip_sim [--nodes 1000] [--loss 0.1] [--fanout 2] [--seed 1]
                                    [--keys 500] [--interval-ms 500]
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time

from meshnode.governance.gossip import encode_pages
from meshnode.governance.keys import KeyRecord, hash_secret
from meshnode.mesh.membership import Membership, MembershipSettings
from meshnode.mesh.state import GossipRecord, MemberStatus, MemberUpdate, NodeState
from meshnode.mesh.transport import GossipMessage
from meshnode.rpc import convert


def build(n: int, rng: random.Random) -> list[Membership]:
    clock = lambda: 0.0  # noqa: E731 - time does not pass in a round simulation
    settings = MembershipSettings(max_records_per_message=4096)
    tables = [
        Membership(
            f"n{i}",
            f"n{i}",
            settings,
            clock,
            random.Random(rng.random()),
            NodeState(f"n{i}", 1, f"n{i}"),
        )
        for i in range(n)
    ]
    # Start converged: everyone knows everyone (the join phase is not what is measured).
    records = [t.own_record() for t in tables]
    for t in tables:
        t.merge(records)
    return tables


Pending = list[tuple[Membership, list[GossipRecord]]]


def exchange(
    a: Membership, b: Membership, loss: float, rng: random.Random, pending: Pending
) -> None:
    """One push-pull as `MeshDriver._exchange` does it, each message lost with `loss`. Every
    message is computed from the state at the start of the round and delivered at its end, so a
    change moves at most one exchange per round (a fair synchronous round)."""
    if rng.random() < loss:
        return  # request lost
    digest = a.digest()
    pending.append((b, [GossipRecord(a.own_record().member, None)]))  # state only on request
    newer, wants = b.newer_than(digest), b.wants(digest)
    if rng.random() < loss:
        return  # answer lost
    pending.append((a, newer))
    if wants and rng.random() >= loss:
        pending.append((b, a.records_for(wants)))


def deliver(pending: Pending) -> None:
    for table, records in pending:
        table.merge(records)


def run(n: int, loss: float, fanout: int, seed: int, max_rounds: int = 50) -> int:
    rng = random.Random(seed)
    tables = build(n, rng)
    origin = tables[0]
    origin.publish(NodeState("n0", 0, "n0", http_address="changed"))
    target = origin.me.state_version
    by_id = {t.self_id: t for t in tables}
    ids = list(by_id)
    for rnd in range(1, max_rounds + 1):
        pending: Pending = []
        for t in tables:
            peers = [p for p in rng.sample(ids, fanout + 1) if p != t.self_id][:fanout]
            for peer in peers:
                exchange(t, by_id[peer], loss, rng, pending)
        deliver(pending)
        have = sum(1 for t in tables if (m := t.get("n0")) and m.state_version >= target)
        print(f"round {rnd:2d}: {have}/{n} nodes have the change", flush=True)
        if have == n:
            return rnd
    return -1


def rumour_rounds(n: int, loss: float, fanout: int, seed: int) -> int:
    """Same, for a liveness rumour (a node declared dead) carried by anti-entropy alone."""
    rng = random.Random(seed)
    tables = build(n, rng)
    tables[1].apply(MemberUpdate("n0", "n0", 0, MemberStatus.DEAD, "n1"))
    by_id = {t.self_id: t for t in tables}
    ids = [i for i in by_id if i != "n0"]
    live = [by_id[i] for i in ids]
    for rnd in range(1, 51):
        pending: Pending = []
        for t in live:
            peers = [p for p in rng.sample(ids, fanout + 1) if p != t.self_id][:fanout]
            for peer in peers:
                exchange(t, by_id[peer], loss, rng, pending)
        deliver(pending)
        if all(t.get("n0") is None or t.get("n0").status is MemberStatus.DEAD for t in live):
            return rnd
    return -1


SECRET = "bench-mesh-secret"


def _pages(node: str, keys: int) -> dict[str, bytes]:
    records = [
        KeyRecord(name=f"{node}.key-{j:04d}", key_sha256=hash_secret(f"sk-{node}-{j}"), rpm=600,
                  tpm=200_000, daily_limit=5.0, created_at=1.8e9, version=1_800_000_000_000 + j,
                  origin=node, authorized=True)
        for j in range(keys)
    ]
    return encode_pages(records, [], SECRET).blobs


class Meter:
    """Bytes of the gossip messages sent, as protobuf sizes of the real wire messages."""

    def __init__(self, n: int) -> None:
        sample = GossipMessage("n0", tuple(build_digest(n)), ())
        self.digest_bytes = convert.gossip_request_to_pb(sample).ByteSize()
        self._state_bytes: dict[tuple[str, int, tuple[str, ...]], int] = {}
        self.sent = 0

    def records(self, records: list[GossipRecord]) -> int:
        total = 0
        for r in records:
            total += convert.member_to_pb(r.member).ByteSize() + 4
            if r.state is not None:
                key = (r.state.node_id, r.state.version, r.state.elided)
                size = self._state_bytes.get(key)
                if size is None:
                    size = self._state_bytes[key] = convert.state_to_pb(r.state).ByteSize()
                total += size
        return total


def build_digest(n: int) -> list[object]:
    from meshnode.mesh.state import DigestEntry

    return [DigestEntry(f"n{i}", 0, MemberStatus.ALIVE, 1_800_000_000_000) for i in range(n)]


def metered_exchange(a: Membership, b: Membership, loss: float, rng: random.Random,
                     pending: Pending, meter: Meter) -> None:
    """`exchange`, counting the bytes of every message that is sent (lost ones too)."""
    digest = a.digest()
    own = [GossipRecord(a.own_record().member, None)]
    meter.sent += meter.digest_bytes + meter.records(own)
    if rng.random() < loss:
        return
    pending.append((b, own))
    newer, wants = b.newer_than(digest, a.self_id), b.wants(digest)
    meter.sent += meter.records(newer) + 16 * len(wants)
    if rng.random() < loss:
        return
    pending.append((a, newer))
    if wants:
        push = a.records_for(wants, b.held_versions(wants))
        meter.sent += meter.records(push) + 8 * len(wants)
        if rng.random() >= loss:
            pending.append((b, push))


def governance_run(n: int, keys: int, loss: float, fanout: int, seed: int,
                   interval_s: float, steady_rounds: int = 3,
                   busy_rounds: int = 3) -> dict[str, float]:
    rng = random.Random(seed)
    t0 = time.perf_counter()
    tables = build(n, rng)
    for i, t in enumerate(tables):  # everyone's own keys, already converged
        t.publish(NodeState(f"n{i}", 2, f"n{i}", blobs=_pages(f"n{i}", keys)))
    states = [t.own_record() for t in tables]
    for t in tables:
        t.merge([r for r in states if r.member.node_id != t.self_id])
    built_s = time.perf_counter() - t0
    meter = Meter(n)
    by_id = {t.self_id: t for t in tables}
    ids = list(by_id)

    def one_round() -> None:
        pending: Pending = []
        for t in tables:
            peers = [p for p in rng.sample(ids, fanout + 1) if p != t.self_id][:fanout]
            for peer in peers:
                metered_exchange(t, by_id[peer], loss, rng, pending, meter)
        deliver(pending)

    for _ in range(steady_rounds):
        one_round()
    steady = meter.sent / n / (steady_rounds * interval_s)
    # n0 creates one key: one of its pages changes, so its state gets a new version.
    origin = tables[0]
    state = origin.me.state
    assert state is not None
    origin.publish(dataclasses.replace(state, blobs=_pages("n0", keys + 1)))
    target = origin.me.state_version
    meter.sent = 0
    rounds = -1
    for rnd in range(1, 51):
        one_round()
        if all((m := t.get("n0")) and m.state_version >= target for t in tables):
            rounds = rnd
            break
    change = meter.sent / n / (max(rounds, 1) * interval_s)
    # Busy: every node's own spend changes every round (its spend page, not its key pages).
    meter.sent = 0
    for rnd in range(busy_rounds):
        for i, t in enumerate(tables):
            own = t.me.state
            assert own is not None
            spend = b"spend-%d-%d" % (i, rnd) * 8
            t.publish(dataclasses.replace(own, blobs={**own.blobs, "governance.spend": spend}))
        one_round()
    busy = meter.sent / n / (busy_rounds * interval_s)
    page_bytes = sum(len(b) for b in _pages("n0", keys).values())
    return {"built_s": built_s, "steady_Bps": steady, "change_Bps": change, "rounds": rounds,
            "busy_Bps": busy, "page_bytes": page_bytes,
            # publish tick at the origin + the rounds + the merge tick at the last node
            "key_everywhere_s": (rounds + 2) * interval_s if rounds > 0 else -1.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--loss", type=float, default=0.1)
    parser.add_argument("--fanout", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keys", type=int, default=500, help="API keys per node (0: skip)")
    parser.add_argument("--interval-ms", type=int, default=500, help="mesh.gossip_interval_ms")
    args = parser.parse_args(argv)
    state = run(args.nodes, args.loss, args.fanout, args.seed)
    dead = rumour_rounds(args.nodes, args.loss, args.fanout, args.seed)
    print(
        f"state change: every node in {state} rounds; death rumour: {dead} rounds "
        f"({args.nodes} nodes, loss {args.loss:.0%}, fanout {args.fanout}); SPEC: <= 12"
    )
    ok = 0 < state <= 12 and 0 < dead <= 12
    if args.keys > 0:
        g = governance_run(args.nodes, args.keys, args.loss, args.fanout, args.seed,
                           args.interval_ms / 1000.0)
        print(
            f"governance: {args.nodes} nodes x {args.keys} keys (each node's own pages "
            f"{g['page_bytes'] / 1024:.1f} KiB), loss {args.loss:.0%}: "
            f"{g['steady_Bps'] / 1024:.1f} KiB/s sent per node in steady state, "
            f"{g['change_Bps'] / 1024:.1f} KiB/s while one node creates a key, "
            f"{g['busy_Bps'] / 1024:.1f} KiB/s while every node spends every round; the key is "
            f"on every node after {g['rounds']} rounds = {g['key_everywhere_s']:.1f} s "
            f"(SPEC: within 10 s)"
        )
        ok = ok and 0 < g["key_everywhere_s"] <= 10.0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
