"""Gossip convergence, simulated (SPEC §6: a change reaches every node of 1,000 in <= 12 rounds,
also at 10 % message loss).

It runs the real `Membership` tables (the pure state machine, no sockets) in synchronous rounds:
each round every node does the driver's anti-entropy exchange with `fanout` random peers (digest
-> newer records + wants -> pushed records), each message lost with probability `loss`. One node
publishes a new state; we count rounds until every node holds it. Usage:

    python -m bench.mesh_gossip_sim [--nodes 1000] [--loss 0.1] [--fanout 2] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import sys

from meshnode.mesh.membership import Membership, MembershipSettings
from meshnode.mesh.state import GossipRecord, MemberStatus, MemberUpdate, NodeState


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
    pending.append((b, [a.own_record()]))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--loss", type=float, default=0.1)
    parser.add_argument("--fanout", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    state = run(args.nodes, args.loss, args.fanout, args.seed)
    dead = rumour_rounds(args.nodes, args.loss, args.fanout, args.seed)
    print(
        f"state change: every node in {state} rounds; death rumour: {dead} rounds "
        f"({args.nodes} nodes, loss {args.loss:.0%}, fanout {args.fanout}); SPEC: <= 12"
    )
    return 0 if 0 < state <= 12 and 0 < dead <= 12 else 1


if __name__ == "__main__":
    sys.exit(main())
