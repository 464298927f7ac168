"""The membership table: SWIM with suspicion, as a pure state machine (no sockets, no sleeps).

It owns who is in the mesh and in what state, and decides every transition; the async driver
(`meshnode.mesh.service`) only performs the I/O the table asks for and feeds the results back.
Time comes from an injected clock and randomness from an injected `random.Random`, so every
decision is reproducible in tests.

Rules (as hashicorp/memberlist's `state.go`):
- Each interval the driver probes `next_probe_target()` (round-robin over a shuffled list, so
  every member is probed once per round). No ack within the probe timeout, and none through
  `indirect_helpers()` either: `probe_failed()` marks it suspect.
- A suspect becomes dead when its suspicion timeout passes
  (`suspicion_mult * max(1, log10(n)) * probe_interval`), unless it refutes first.
- Only a member raises its own incarnation: when it hears a suspect/dead/left rumour about itself
  at its incarnation or above, it refutes with `alive` at that incarnation + 1.
- Rumours order by (incarnation, status); at equal incarnation suspect > alive, dead > suspect,
  left > dead. Stale rumours are dropped and not spread further, which ends every epidemic.
- Dead and left members are forgotten `dead_forget_s` after the transition; a rumour that they
  are dead is not accepted for a member we do not know (it would resurrect forgotten ones).
- Partitions: until it is forgotten, a dead member is knocked on now and then
  (`reconnect_target()`): the knock tells it it was declared dead and a live one refutes with a
  higher incarnation, which revives it here and, spread, everywhere (serf's "reconnect").

Lifeguard (as memberlist's `awareness.go` and `suspicion.go`):
- Local health: `awareness` (0..`max_awareness`) rises when this node looks like the slow one
  (its event loop lagged through a probe, no helper answered an indirect probe, it had to refute
  a suspicion of itself) and falls with each successful probe. Probe interval, probe timeout and
  new suspicion timeouts are multiplied by `awareness + 1`, so a starved node stops accusing
  healthy peers instead of spreading false suspicions.
- Suspicion confirmations: a suspicion starts at `suspicion_max_mult` times the base timeout and
  shrinks toward the base as independent members confirm it (their own failed probes),
  `max - (max - min) * log(C + 1) / log(K + 1)` for C confirmations of K expected.

Hostile rumours: a forged "X is dead" reaches X through anti-entropy and X refutes it like any
suspicion; incarnations are bounded (`MAX_INCARNATION`) so a refutation always fits the wire.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from meshnode.config import MeshConfig
from meshnode.mesh.state import (
    MAX_INCARNATION,
    DigestEntry,
    GossipRecord,
    MemberStatus,
    MemberUpdate,
    NodeState,
)

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class MembershipSettings:
    """The timing knobs, in seconds; built once from `MeshConfig`."""

    probe_interval_s: float = 0.5
    probe_timeout_s: float = 0.3
    indirect_probes: int = 3
    suspicion_mult: float = 4.0
    dead_forget_s: float = 60.0
    max_members: int = 4096
    max_records_per_message: int = 256
    # And by size: states carry governance pages (up to ~900 KB each), a message must stay
    # under the gossip cap (rpc.options.MAX_GOSSIP_BYTES, 8 MiB) whatever the member count.
    max_bytes_per_message: int = 4 * 1024 * 1024
    # Lifeguard: a lone suspicion waits this many times the base timeout; confirmations shrink it.
    suspicion_max_mult: float = 3.0
    max_awareness: int = 8

    @classmethod
    def from_config(cls, mesh: MeshConfig) -> MembershipSettings:
        return cls(
            probe_interval_s=mesh.probe_interval_ms / 1000.0,
            probe_timeout_s=mesh.probe_timeout_ms / 1000.0,
            indirect_probes=mesh.indirect_probes,
            suspicion_mult=mesh.suspicion_mult,
            dead_forget_s=mesh.dead_forget_s,
        )

    def suspicion_timeout(self, members: int) -> float:
        """memberlist's formula: grows with log10 of the mesh size so rumours can spread."""
        return self.suspicion_mult * max(1.0, math.log10(max(members, 1))) * self.probe_interval_s


@dataclass(slots=True)
class MemberInfo:
    """One member as this node sees it (mutable inside the table; callers get copies)."""

    node_id: str
    address: str
    incarnation: int
    status: MemberStatus
    status_since: float
    last_heard: float
    state: NodeState | None = None
    suspect_deadline: float | None = None
    suspectors: frozenset[str] = field(default_factory=frozenset)
    suspicion_base: float = 0.0

    def rumour(self, from_node: str = "") -> MemberUpdate:
        return MemberUpdate(self.node_id, self.address, self.incarnation, self.status, from_node)

    @property
    def state_version(self) -> int:
        return self.state.version if self.state is not None else 0

    def snapshot(self) -> MemberInfo:
        return replace(self)


LIVE = (MemberStatus.ALIVE, MemberStatus.SUSPECT)


class Membership:
    """The table. Every method is synchronous and cheap; nothing here awaits."""

    def __init__(
        self,
        self_id: str,
        address: str,
        settings: MembershipSettings,
        clock: Clock,
        rng: random.Random | None = None,
        initial_state: NodeState | None = None,
    ) -> None:
        self.self_id = self_id
        self.settings = settings
        self._clock = clock
        self._rng = rng or random.Random()
        now = clock()
        self._members: dict[str, MemberInfo] = {
            self_id: MemberInfo(
                self_id, address, 0, MemberStatus.ALIVE, now, now, state=initial_state
            )
        }
        self._probe_order: list[str] = []
        self._leaving = False
        # Lifeguard's local health score: 0 is healthy; timeouts scale by awareness + 1.
        self.awareness = 0
        # Bumped on every change a reader may care about (offers are cached per generation).
        self.generation = 0

    # ------------------------------------------------------------------ reading
    @property
    def me(self) -> MemberInfo:
        return self._members[self.self_id]

    def get(self, node_id: str) -> MemberInfo | None:
        member = self._members.get(node_id)
        return member.snapshot() if member is not None else None

    def members(self) -> list[MemberInfo]:
        """Every member, self included, as copies."""
        return [m.snapshot() for m in self._members.values()]

    def peers(self, statuses: Sequence[MemberStatus] = LIVE) -> list[MemberInfo]:
        return [
            m.snapshot()
            for m in self._members.values()
            if m.node_id != self.self_id and m.status in statuses
        ]

    def live_count(self) -> int:
        return sum(1 for m in self._members.values() if m.status in LIVE)

    # ------------------------------------------------------------------ local health
    @property
    def health_multiplier(self) -> int:
        return self.awareness + 1

    def adjust_awareness(self, delta: int) -> None:
        self.awareness = max(0, min(self.settings.max_awareness, self.awareness + delta))

    def probe_interval(self) -> float:
        return self.settings.probe_interval_s * self.health_multiplier

    def probe_timeout(self) -> float:
        return self.settings.probe_timeout_s * self.health_multiplier

    # ------------------------------------------------------------------ own state
    def publish(self, state: NodeState) -> bool:
        """Set this node's own state; a new version only when the content changed."""
        me = self.me
        if me.state is not None and me.state.same_content(state):
            return False
        version = max(state.version, me.state_version + 1)
        prev = me.state
        blob_versions = {
            name: prev.blob_versions.get(name, version)
            if prev is not None and prev.blobs.get(name) == blob else version
            for name, blob in state.blobs.items()
        }
        me.state = replace(state, node_id=self.self_id, version=version,
                           blob_versions=blob_versions, elided=())
        self.generation += 1
        if state.grpc_address and state.grpc_address != me.address:
            me.address = state.grpc_address
        return True

    def leave(self) -> MemberUpdate:
        """Graceful leave: we are `left` at our incarnation; spread this to everyone."""
        self._leaving = True
        self.generation += 1
        me = self.me
        me.status = MemberStatus.LEFT
        me.status_since = self._clock()
        if me.state is not None:
            me.state = replace(me.state, status="left", version=me.state.version + 1)
        return me.rumour(self.self_id)

    # ------------------------------------------------------------------ rumours
    def apply(self, update: MemberUpdate) -> MemberUpdate | None:
        """Take in one liveness rumour. Returns the rumour to spread further (the accepted one,
        or our own refutation), or None when it was stale or irrelevant."""
        if update.incarnation > MAX_INCARNATION or (
            update.incarnation == MAX_INCARNATION and update.status is not MemberStatus.ALIVE
        ):
            return None  # nobody could refute it: a forgery or a broken peer
        if update.node_id == self.self_id:
            return self._about_me(update)
        now = self._clock()
        member = self._members.get(update.node_id)
        if member is None:
            if update.status not in LIVE or len(self._members) >= self.settings.max_members:
                return None
            member = MemberInfo(
                update.node_id, update.address, update.incarnation, update.status, now, now
            )
            self._members[update.node_id] = member
            self._probe_order.append(update.node_id)  # probed in this round too
            self.generation += 1
            if update.status is MemberStatus.SUSPECT:
                self._start_suspicion(member, update.from_node)
            return update
        if not update.supersedes(member.incarnation, member.status):
            if (
                update.status is MemberStatus.SUSPECT
                and member.status is MemberStatus.SUSPECT
                and update.incarnation == member.incarnation
                and update.from_node
            ):
                self._confirm(member, update.from_node)
            return None
        was = member.status
        self.generation += 1
        member.incarnation = update.incarnation
        member.status = update.status
        if update.address:
            member.address = update.address
        if update.status is not was:
            member.status_since = now
        if update.status is MemberStatus.SUSPECT:
            if was is not MemberStatus.SUSPECT:
                self._start_suspicion(member, update.from_node)
        else:
            member.suspect_deadline = None
            member.suspectors = frozenset()
        if update.status is MemberStatus.ALIVE:
            member.last_heard = now
        return update

    def _about_me(self, update: MemberUpdate) -> MemberUpdate | None:
        me = self.me
        if self._leaving:
            # We are leaving: answer any other rumour about us with `left`, above it.
            if update.status is not MemberStatus.LEFT and update.incarnation >= me.incarnation:
                me.incarnation = update.incarnation + 1
                return me.rumour(self.self_id)
            return None
        if update.status is MemberStatus.ALIVE and update.incarnation <= me.incarnation:
            return None
        if update.status is not MemberStatus.ALIVE and update.incarnation < me.incarnation:
            return None
        # Suspect/dead/left at or above our incarnation, or an alive from a past life: refute.
        if update.status is not MemberStatus.ALIVE:
            self.adjust_awareness(1)  # others could not reach us: maybe we are the slow one
        me.incarnation = update.incarnation + 1
        return me.rumour(self.self_id)

    def _start_suspicion(self, member: MemberInfo, from_node: str) -> None:
        member.status_since = self._clock()
        member.suspectors = frozenset({from_node}) if from_node else frozenset()
        # Fixed at the start: a later change of our health does not move a running timer.
        member.suspicion_base = (
            self.settings.suspicion_timeout(self.live_count()) * self.health_multiplier
        )
        member.suspect_deadline = member.status_since + self._suspicion_timeout(member)

    def _confirm(self, member: MemberInfo, from_node: str) -> bool:
        """An independent suspicion of a suspect: the deadline moves closer."""
        if from_node in member.suspectors:
            return False
        member.suspectors = member.suspectors | {from_node}
        member.suspect_deadline = member.status_since + self._suspicion_timeout(member)
        return True

    def _suspicion_timeout(self, member: MemberInfo) -> float:
        base = member.suspicion_base
        expected = min(self.settings.indirect_probes, self.live_count() - 2)
        if expected < 1:
            return base
        high = base * self.settings.suspicion_max_mult
        confirmations = max(0, len(member.suspectors) - 1)
        shrink = min(1.0, math.log(confirmations + 1) / math.log(expected + 1))
        return max(base, high - (high - base) * shrink)

    # ------------------------------------------------------------------ probing
    def next_probe_target(self) -> MemberInfo | None:
        """The next member to probe: round-robin over a shuffled list, reshuffled each round."""
        for _ in range(2):
            while self._probe_order:
                node_id = self._probe_order.pop()
                member = self._members.get(node_id)
                if member is not None and member.status in LIVE and node_id != self.self_id:
                    return member.snapshot()
            self._probe_order = [
                m.node_id
                for m in self._members.values()
                if m.node_id != self.self_id and m.status in LIVE
            ]
            self._rng.shuffle(self._probe_order)
        return None

    def reconnect_target(self) -> MemberInfo | None:
        """A random member we declared dead (not one that left), to knock on: after a
        partition heals, neither side gossips with the other any more (dead members are
        neither probed nor gossiped with), and neither is alone, so the seeds do not bridge
        it. A knock carries the death rumour; a live target refutes it in the ack."""
        dead = [
            m for m in self._members.values()
            if m.node_id != self.self_id and m.status is MemberStatus.DEAD
        ]
        return self._rng.choice(dead).snapshot() if dead else None

    def indirect_helpers(self, target_id: str, k: int | None = None) -> list[MemberInfo]:
        """Up to k alive members (not the target) to ask for an indirect probe."""
        k = self.settings.indirect_probes if k is None else k
        pool = [
            m
            for m in self._members.values()
            if m.node_id not in (self.self_id, target_id) and m.status is MemberStatus.ALIVE
        ]
        picked = self._rng.sample(pool, min(k, len(pool)))
        return [m.snapshot() for m in picked]

    def probe_succeeded(self, target_id: str, incarnation: int) -> MemberUpdate | None:
        """An ack (direct or indirect). A higher incarnation in it is the target's refutation."""
        member = self._members.get(target_id)
        if member is None:
            return None
        member.last_heard = self._clock()
        if incarnation > member.incarnation:
            return self.apply(
                MemberUpdate(target_id, member.address, incarnation, MemberStatus.ALIVE, target_id)
            )
        return None

    def probe_failed(self, target_id: str) -> MemberUpdate | None:
        """No ack, direct or indirect: suspect it, or confirm a suspicion others started (the
        returned rumour must be spread; a confirmation shortens everyone's timer)."""
        member = self._members.get(target_id)
        if member is None:
            return None
        if member.status is MemberStatus.SUSPECT:
            if self._confirm(member, self.self_id):
                return MemberUpdate(target_id, member.address, member.incarnation,
                                    MemberStatus.SUSPECT, self.self_id)
            return None
        if member.status is not MemberStatus.ALIVE:
            return None
        return self.apply(
            MemberUpdate(
                target_id, member.address, member.incarnation, MemberStatus.SUSPECT, self.self_id
            )
        )

    def heard_from(self, node_id: str) -> None:
        member = self._members.get(node_id)
        if member is not None:
            member.last_heard = self._clock()

    def tick(self) -> list[MemberUpdate]:
        """Expire suspicions (-> dead, to spread) and forget long-dead members."""
        now = self._clock()
        out: list[MemberUpdate] = []
        forget: list[str] = []
        for member in self._members.values():
            if member.node_id == self.self_id:
                continue
            if (
                member.status is MemberStatus.SUSPECT
                and member.suspect_deadline is not None
                and now >= member.suspect_deadline
            ):
                update = MemberUpdate(
                    member.node_id,
                    member.address,
                    member.incarnation,
                    MemberStatus.DEAD,
                    self.self_id,
                )
                member.status = MemberStatus.DEAD
                member.status_since = now
                member.suspect_deadline = None
                out.append(update)
            elif (
                member.status in (MemberStatus.DEAD, MemberStatus.LEFT)
                and now - member.status_since >= self.settings.dead_forget_s
            ):
                forget.append(member.node_id)
        for node_id in forget:
            del self._members[node_id]
        if out or forget:
            self.generation += 1
        return out

    # ------------------------------------------------------------------ gossip
    def digest(self) -> list[DigestEntry]:
        return [
            DigestEntry(m.node_id, m.incarnation, m.status, m.state_version)
            for m in self._members.values()
        ]

    def own_record(self) -> GossipRecord:
        me = self.me
        return GossipRecord(me.rumour(self.self_id), me.state)

    def newer_than(self, digest: Iterable[DigestEntry], to: str = "") -> list[GossipRecord]:
        """Records the digest's sender lacks: rumours it has older, states it has older.
        Bounded by `max_records_per_message` and `max_bytes_per_message`; the rest follow in
        later rounds. When the sender (`to`) speaks protocol 2, a state leaves out the blobs
        the sender's copy already holds."""
        theirs = {d.node_id: d for d in digest}
        peer = self._members.get(to) if to else None
        elide = peer is not None and peer.state is not None and peer.state.protocol_version >= 2
        out: list[GossipRecord] = []
        budget = self.settings.max_bytes_per_message
        members = list(self._members.values())
        self._rng.shuffle(members)  # a bounded answer must not always starve the same ones
        for member in members:
            known = theirs.get(member.node_id)
            record: GossipRecord | None = None
            if known is None:
                if member.status in LIVE:
                    record = GossipRecord(member.rumour(), member.state)
            else:
                rumour_newer = (member.incarnation, int(member.status)) > (
                    known.incarnation,
                    int(known.status),
                )
                state_newer = member.state_version > known.state_version
                if rumour_newer or state_newer:
                    state = member.state if state_newer else None
                    if state is not None and elide and known.state_version > 0:
                        state = state.without_blobs_held_at(known.state_version)
                    record = GossipRecord(member.rumour(), state)
            if record is None:
                continue
            size = record.state.wire_size() if record.state is not None else 0
            if out and size > budget:
                # Over the size bound: a rumour alone still fits; the state follows later.
                record = GossipRecord(record.member, None)
                size = 0
            budget -= size
            out.append(record)
            if len(out) >= self.settings.max_records_per_message:
                break
        return out

    def wants(self, digest: Iterable[DigestEntry]) -> list[str]:
        """Ids whose digest entry is newer than ours: ask the sender to push them."""
        out: list[str] = []
        for entry in digest:
            member = self._members.get(entry.node_id)
            if member is None:
                if entry.status in LIVE:
                    out.append(entry.node_id)
            elif (entry.incarnation, int(entry.status)) > (
                member.incarnation,
                int(member.status),
            ) or entry.state_version > member.state_version:
                out.append(entry.node_id)
            if len(out) >= self.settings.max_records_per_message:
                break
        return out

    def held_versions(self, node_ids: Iterable[str]) -> list[int]:
        """The state version held for each id (0: none), sent with `wants` (protocol 2)."""
        return [m.state_version if (m := self._members.get(i)) is not None else 0
                for i in node_ids]

    def records_for(self, node_ids: Iterable[str],
                    held: Sequence[int] = ()) -> list[GossipRecord]:
        """Records to push; with `held` (the receiver's versions, one per id) each state leaves
        out the blobs the receiver already holds."""
        out: list[GossipRecord] = []
        budget = self.settings.max_bytes_per_message
        ids = list(node_ids)
        held = list(held) if len(held) == len(ids) else [0] * len(ids)
        for node_id, have in zip(ids, held, strict=True):
            member = self._members.get(node_id)
            if member is not None:
                state = member.state
                if state is not None and have > 0:
                    state = state.without_blobs_held_at(have)
                size = state.wire_size() if state is not None else 0
                if out and size > budget:
                    break  # over the size bound: asked again next round
                budget -= size
                out.append(GossipRecord(member.rumour(), state))
            if len(out) >= self.settings.max_records_per_message:
                break
        return out

    def merge(self, records: Iterable[GossipRecord]) -> list[MemberUpdate]:
        """Take in gossip records. Returns the rumours that changed something (to spread on)."""
        changed: list[MemberUpdate] = []
        for record in records:
            spread = self.apply(record.member)
            if spread is not None:
                changed.append(spread)
            if record.state is not None:
                self._merge_state(record.state)
        return changed

    def _merge_state(self, state: NodeState) -> None:
        member = self._members.get(state.node_id)
        if member is None:
            return
        if state.node_id == self.self_id:
            # A state of ours from a past life that is newer than our own: jump past it.
            me = self.me
            if me.state is not None and state.version >= me.state.version:
                me.state = replace(me.state, version=state.version + 1)
            return
        if state.version > member.state_version:
            whole = state.with_blobs_from(member.state)
            if whole is None:
                return  # elided blobs we do not hold: the sender sends them next round
            member.state = whole
            self.generation += 1
