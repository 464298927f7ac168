"""The SWIM driver: runs the probe and gossip loops over a `Transport` for a `Membership`.

It owns the timing and the I/O; every decision (whom to probe, when to suspect, what is newer)
belongs to the pure `Membership` table. It also answers incoming probes and gossip
(`MeshHandler`), whatever transport delivers them.

Lifeguard: probe interval and timeout come from the table (stretched by its local health
score); the driver raises that score when its own loop is late (a timer firing well after it was
due) and never accuses a peer when its probe's timeouts fired late, since the silence then says
more about this node than about the peer.

Spreading: anti-entropy every `gossip_interval` with `fanout` random live peers (digest first,
then only newer records, then the records the peer wants). A rumour that changed something here
(suspect, dead, left, a refutation, a new member) is "urgent": it triggers an immediate round to
`urgent_fanout` peers (the suspect itself included, so it can refute at once) and rides along in
the next `retransmits` rounds. Stale rumours change nothing and stop there, which ends the wave.

Healing partitions: every `reconnect_every` probe intervals the driver knocks on one member it
declared dead (a direct probe carrying the death rumour as `about_you`). Dead members are
neither probed nor gossiped with, and a side of a partition is never alone, so without the knock
two halves that declared each other dead would stay apart after the link came back. A live
target refutes in its ack (higher incarnation), the revival is spread like any rumour, and the
push-pull rounds that follow carry each side's refutations to the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections.abc import Callable

from meshnode.mesh.membership import Membership
from meshnode.mesh.state import GossipRecord, MemberStatus, MemberUpdate
from meshnode.mesh.transport import (
    Ack,
    GossipMessage,
    GossipReply,
    Probe,
    Transport,
    TransportError,
)

log = logging.getLogger(__name__)

ChangeListener = Callable[[MemberUpdate], None]


async def cancel_and_wait(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel tasks and wait until they are done, cancelling again if one swallowed it."""
    pending = [t for t in tasks if not t.done()]
    while pending:
        for task in pending:
            task.cancel()
        _, still = await asyncio.wait(pending, timeout=1.0)
        pending = list(still)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.error("mesh task %s failed: %r", task.get_name(), task.exception())


class MeshDriver:
    def __init__(
        self,
        membership: Membership,
        transport: Transport,
        *,
        gossip_interval_s: float,
        fanout: int = 2,
        urgent_fanout: int = 3,
        retransmits: int = 3,
        reconnect_every: float = 2.0,
        rng: random.Random | None = None,
        on_change: ChangeListener | None = None,
    ) -> None:
        self.membership = membership
        self.transport = transport
        self.gossip_interval_s = gossip_interval_s
        self.fanout = fanout
        self.urgent_fanout = urgent_fanout
        self.retransmits = retransmits
        self.reconnect_every = reconnect_every
        self._rng = rng or random.Random()
        self._on_change = on_change
        self._seq = itertools.count(1)
        # node id -> (rumour, rounds left); one pending rumour per node, the newest.
        self._urgent: dict[str, tuple[MemberUpdate, int]] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        # Round-trip time of direct probes per peer (EWMA, ms): feeds latency_optimized.
        self.rtt_ms: dict[str, float] = {}
        # The last failed join per address, for the seed joiner to say why (`seeds.diagnose`).
        self.join_failures: dict[str, str] = {}
        # Times our own event loop was found late (Lifeguard raised our awareness).
        self.lagged = 0

    @property
    def self_id(self) -> str:
        return self.membership.self_id

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._probe_loop(), name="mesh-probe"),
            asyncio.create_task(self._gossip_loop(), name="mesh-gossip"),
            asyncio.create_task(self._reconnect_loop(), name="mesh-reconnect"),
        ]

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        await cancel_and_wait(self._tasks)
        self._tasks = []

    async def join(self, address: str) -> bool:
        """One push-pull with `address` (a seed). True when it answered."""
        try:
            await self._exchange(address, join=True)
        except TransportError as exc:
            log.debug("join via %s failed: %s", address, exc)
            self.join_failures[address] = str(exc)
            return False
        self.join_failures.pop(address, None)
        return True

    async def leave(self, timeout: float) -> int:
        """Graceful leave: tell every live peer at once, wait for their acks up to `timeout`.
        Returns how many peers acknowledged."""
        rumour = self.membership.leave()
        record = self.membership.own_record()
        peers = self.membership.peers((MemberStatus.ALIVE, MemberStatus.SUSPECT))
        message = GossipMessage(self.self_id, records=(record,))
        del rumour  # the own record carries it, with the state that says "left"
        results = await asyncio.gather(
            *(self.transport.gossip(p.address, message, timeout) for p in peers),
            return_exceptions=True,
        )
        return sum(1 for r in results if isinstance(r, GossipReply))

    # ------------------------------------------------------------------ spreading
    def spread(self, update: MemberUpdate) -> None:
        """Queue a rumour that changed our table for fast dissemination."""
        self._urgent[update.node_id] = (update, self.retransmits)
        if self._on_change is not None:
            self._on_change(update)
        self._wake.set()

    def _spread_all(self, updates: list[MemberUpdate]) -> None:
        for update in updates:
            self.spread(update)

    def _urgent_records(self) -> tuple[GossipRecord, ...]:
        return tuple(GossipRecord(u) for u, _ in self._urgent.values())

    def _age_urgent(self) -> None:
        for node_id, (update, left) in list(self._urgent.items()):
            if left <= 1:
                del self._urgent[node_id]
            else:
                self._urgent[node_id] = (update, left - 1)

    # ------------------------------------------------------------------ loops
    async def _probe_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            started = loop.time()
            target = self.membership.next_probe_target()
            if target is not None:
                try:
                    await self._probe(target.node_id, target.address, target.status,
                                      target.incarnation)
                except Exception:  # noqa: BLE001 - a bug in one probe must not stop probing
                    log.exception("probe of %s failed unexpectedly", target.node_id)
            self._spread_all(self.membership.tick())
            # Lifeguard: the interval stretches with our own ill health.
            delay = max(0.0, self.membership.probe_interval() - (loop.time() - started))
            wake = loop.time() + delay
            await asyncio.sleep(delay)
            if loop.time() - wake > self._lag_threshold():
                self.membership.adjust_awareness(1)  # our event loop is late: we are slow
                self.lagged += 1

    def _lag_threshold(self) -> float:
        """How late a timer may fire before we blame our own event loop."""
        return max(0.05, self.membership.settings.probe_timeout_s / 2)

    async def _probe(
        self, node_id: str, address: str, status: MemberStatus, incarnation: int
    ) -> None:
        m = self.membership
        timeout = m.probe_timeout()
        about = None
        if status is MemberStatus.SUSPECT:
            about = MemberUpdate(node_id, address, incarnation, status, self.self_id)
        seq = next(self._seq)
        loop = asyncio.get_running_loop()
        sent = loop.time()
        expected = timeout
        try:
            ack = await self.transport.probe(address, Probe(self.self_id, seq, about_you=about),
                                             timeout)
            self._record_rtt(node_id, (loop.time() - sent) * 1000.0)
        except TransportError:
            ack = None
        if ack is None or not ack.ok:
            helpers = m.indirect_helpers(node_id)
            if helpers:
                expected += timeout * 2
                ask = Probe(self.self_id, seq, node_id, address, int(timeout * 1000))
                results = await asyncio.gather(
                    *(self.transport.probe(h.address, ask, timeout * 2) for h in helpers),
                    return_exceptions=True,
                )
                ack = next((r for r in results if isinstance(r, Ack) and r.ok), None)
                if ack is None and not any(isinstance(r, Ack) for r in results):
                    # No helper answered at all, not even "no": the trouble is likely ours.
                    m.adjust_awareness(1)
        if ack is not None and ack.ok:
            m.adjust_awareness(-1)
            spread = m.probe_succeeded(node_id, ack.incarnation)
        elif loop.time() - sent > expected + self._lag_threshold():
            # The timeouts fired late: our loop was starved, so the silence proves nothing
            # about the target. Do not accuse it; slow ourselves down instead.
            m.adjust_awareness(1)
            self.lagged += 1
            spread = None
        else:
            spread = m.probe_failed(node_id)
            if spread is not None:
                log.info("mesh: %s did not answer probes; suspect", node_id)
        if spread is not None:
            self.spread(spread)

    async def _reconnect_loop(self) -> None:
        while not self._stopping:
            # Lifeguard stretches this too: a slow node knocks less.
            await asyncio.sleep(self.membership.probe_interval() * self.reconnect_every)
            target = self.membership.reconnect_target()
            if target is not None:
                await self._knock(target.node_id, target.address, target.incarnation)

    async def _knock(self, node_id: str, address: str, incarnation: int) -> None:
        """Probe a dead member with its death: if it lives, its ack refutes it."""
        death = MemberUpdate(node_id, address, incarnation, MemberStatus.DEAD, self.self_id)
        probe = Probe(self.self_id, next(self._seq), about_you=death)
        try:
            ack = await self.transport.probe(address, probe, self.membership.probe_timeout())
        except TransportError:
            return  # still unreachable (or really gone): forgotten after dead_forget_s
        # Another node now at that address is not the one we buried.
        if not ack.ok or ack.node_id != node_id:
            return
        spread = self.membership.probe_succeeded(node_id, ack.incarnation)
        if spread is not None:
            log.info("mesh: %s answered after being declared dead; alive again", node_id)
            self.spread(spread)

    def _record_rtt(self, node_id: str, rtt_ms: float) -> None:
        previous = self.rtt_ms.get(node_id)
        self.rtt_ms[node_id] = rtt_ms if previous is None else 0.8 * previous + 0.2 * rtt_ms

    async def _gossip_loop(self) -> None:
        while not self._stopping:
            urgent = False
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # races with the event, and the loop would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.gossip_interval_s):
                    await self._wake.wait()
                urgent = True
            if self._stopping:
                return
            self._wake.clear()
            self._spread_all(self.membership.tick())
            await self._gossip_round(urgent)

    async def _gossip_round(self, urgent: bool) -> None:
        peers = self.membership.peers()
        if not peers:
            return
        count = self.urgent_fanout if urgent else self.fanout
        chosen = self._rng.sample(peers, min(count, len(peers)))
        if urgent:
            # The subject of a suspicion must hear it to refute it.
            for update, _ in self._urgent.values():
                if update.status is MemberStatus.SUSPECT and update.node_id != self.self_id:
                    subject = self.membership.get(update.node_id)
                    if subject is not None and all(p.node_id != subject.node_id for p in chosen):
                        chosen.append(subject)
        records = self._urgent_records()
        self._age_urgent()
        timeout = max(self.membership.probe_timeout(), self.gossip_interval_s)
        await asyncio.gather(
            *(self._exchange_quietly(p.address, records, timeout) for p in chosen)
        )

    async def _exchange_quietly(
        self, address: str, records: tuple[GossipRecord, ...], timeout: float
    ) -> None:
        try:
            await self._exchange(address, extra=records, timeout=timeout)
        except TransportError as exc:
            log.debug("gossip with %s failed: %s", address, exc)

    async def _exchange(
        self,
        address: str,
        *,
        join: bool = False,
        extra: tuple[GossipRecord, ...] = (),
        timeout: float | None = None,
    ) -> None:
        timeout = timeout or max(1.0, self.gossip_interval_s)
        m = self.membership
        # Our own state rides along only when joining: otherwise the digest carries our
        # version, and the callee asks for the state (`wants`) only when its copy is older, so
        # an unchanged state of governance pages costs nothing per round.
        own = m.own_record()
        if not join:
            own = GossipRecord(own.member, None)
        message = GossipMessage(self.self_id, tuple(m.digest()), (own, *extra), join=join)
        reply = await self.transport.gossip(address, message, timeout)
        m.heard_from(reply.from_node)
        self._spread_all(m.merge(reply.records))
        if reply.wants:
            push = GossipMessage(
                self.self_id, records=tuple(m.records_for(reply.wants, reply.want_versions)))
            await self.transport.gossip(address, push, timeout)

    # ------------------------------------------------------------------ MeshHandler
    async def on_probe(self, probe: Probe) -> Ack:
        m = self.membership
        m.heard_from(probe.from_node)
        if probe.about_you is not None:
            spread = m.apply(probe.about_you)
            if spread is not None:
                self.spread(spread)
        if not probe.target_node:
            return Ack(self.self_id, probe.seq, True, m.me.incarnation)
        # Indirect probe on the caller's behalf.
        timeout = max(probe.timeout_ms, 1) / 1000.0
        try:
            ack = await self.transport.probe(
                probe.target_address, Probe(self.self_id, probe.seq), timeout
            )
        except TransportError:
            return Ack(probe.target_node, probe.seq, False, 0)
        return Ack(probe.target_node, probe.seq, ack.ok, ack.incarnation)

    async def on_gossip(self, message: GossipMessage) -> GossipReply:
        m = self.membership
        m.heard_from(message.from_node)
        self._spread_all(m.merge(message.records))
        if not message.digest and not message.join:
            return GossipReply(self.self_id)  # a push: nothing to answer
        wants = m.wants(message.digest)
        return GossipReply(
            self.self_id, tuple(m.newer_than(message.digest, message.from_node)), tuple(wants),
            want_versions=tuple(m.held_versions(wants)),
        )
