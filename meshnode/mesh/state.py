"""Mesh domain types: member liveness and the versioned state each node gossips about itself.

Two things are known about every member, and they are ordered differently:
- `MemberUpdate` is the SWIM liveness rumour (alive / suspect / dead / left). Anyone may spread
  one; they are ordered by (incarnation, status): a higher incarnation wins, and at the same
  incarnation suspect beats alive, dead beats suspect, left beats dead. Only the member itself
  raises its incarnation (to refute a suspicion or to rejoin).
- `NodeState` is what a node says about itself (addresses, models, capacity, latency). Only its
  owner writes it; `version` orders it. A node's first version is its boot time in milliseconds,
  so a restarted node's state is newer than whatever the mesh remembers of its previous life.

Wire types (protobuf) stay in `meshnode.rpc.convert`; these are what the mesh code passes around.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from meshnode.types import RequestKind

# The protocol version this code speaks (SPEC §5 messages carry it). 2: states may leave out
# blobs the receiver already holds (`NodeState.elided`).
PROTOCOL_VERSION = 2
# The oldest version this code reads; newer ones are read too (they only add fields).
MIN_PROTOCOL_VERSION = 1

# Incarnations stop here: a suspect/dead/left rumour must be below it, so the accused can always
# refute one higher (a forged "dead at 2**64 - 1" would otherwise be unanswerable on the wire).
MAX_INCARNATION = 2**62


class MemberStatus(enum.IntEnum):
    """Liveness; the integer order is the tie-break at equal incarnation."""

    ALIVE = 1
    SUSPECT = 2
    DEAD = 3
    LEFT = 4

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class MemberUpdate:
    """A liveness rumour about one member."""

    node_id: str
    address: str
    incarnation: int
    status: MemberStatus
    from_node: str = ""

    def supersedes(self, incarnation: int, status: MemberStatus) -> bool:
        """Whether this rumour is newer than a member known at (incarnation, status)."""
        return (self.incarnation, int(self.status)) > (incarnation, int(status))


@dataclass(frozen=True, slots=True)
class ModelAd:
    """One model a node offers, as gossip carries it (one per model and provider kind)."""

    name: str
    provider_kind: str
    kinds: frozenset[RequestKind] = frozenset({RequestKind.CHAT, RequestKind.COMPLETION})
    cost_per_1k_input: float = 0.0
    cost_per_1k_output: float = 0.0
    max_context_tokens: int | None = None
    # The owner's dearest price for this model over every provider it could fail over to (what
    # a caller reserves); None: not given (a node from before), the price above stands.
    max_cost_per_1k_input: float | None = None
    max_cost_per_1k_output: float | None = None


@dataclass(frozen=True, slots=True)
class CapacityAd:
    slots_total: int = 0
    slots_free: int = 0
    queue_depth: int = 0
    tokens_per_s: float = 0.0
    # The prompt prefixes the local worker holds (meshnode/routing/prefix.py), most recent first.
    prefix_scheme: int = 0
    prefix_names: tuple[bytes, ...] = ()
    # The local engine's measured prefill tokens/s and decode tokens/s per stream (0.0: not
    # measured): what cache_aware weighs a hit's saved prefill with.
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0


@dataclass(frozen=True, slots=True)
class LatencyAd:
    """A node's own measured latency for one model (milliseconds)."""

    model: str
    ewma_ms: float = 0.0
    p95_ms: float = 0.0
    ttft_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class NodeState:
    """Everything a node says about itself. Only the owner creates new versions."""

    node_id: str
    version: int
    grpc_address: str
    http_address: str = ""
    status: str = "alive"  # alive | draining | left: the owner's own word
    models: tuple[ModelAd, ...] = ()
    capacity: CapacityAd = field(default_factory=CapacityAd)
    latency: tuple[LatencyAd, ...] = ()
    counters: Mapping[str, float] = field(default_factory=dict)
    protocol_version: int = PROTOCOL_VERSION
    # Opaque payloads other components gossip through this state, by name (bounded in rpc).
    blobs: Mapping[str, bytes] = field(default_factory=dict)
    # Per blob, the version at which its content last changed (set by `Membership.publish`);
    # `elided`: blobs left out of this copy on the wire because the receiver holds them.
    blob_versions: Mapping[str, int] = field(default_factory=dict)
    elided: tuple[str, ...] = ()

    def without_blobs_held_at(self, version: int) -> NodeState:
        """This state for a receiver that holds our copy at `version`: blobs unchanged since
        then are left out (named in `elided`)."""
        held = tuple(n for n in self.blobs if 0 < self.blob_versions.get(n, 0) <= version)
        if not held:
            return self
        return replace(self, blobs={n: b for n, b in self.blobs.items() if n not in held},
                       elided=held)

    def with_blobs_from(self, base: NodeState | None) -> NodeState | None:
        """The whole state, elided blobs taken from `base` (our copy); None when `base` is too
        old to hold them (the sender will send them again)."""
        if not self.elided:
            return self
        if base is None or any(base.version < self.blob_versions.get(n, 1 << 63)
                               for n in self.elided):
            return None
        filled = {n: base.blobs[n] for n in self.elided if n in base.blobs}
        return replace(self, blobs={**filled, **self.blobs}, elided=())

    def wire_size(self) -> int:
        """About how many bytes this state takes in a gossip message (an upper estimate, for
        bounding messages; computed once per state)."""
        return _wire_size(self)

    def latency_for(self, model: str) -> LatencyAd | None:
        for entry in self.latency:
            if entry.model == model:
                return entry
        return None

    def same_content(self, other: NodeState) -> bool:
        """Equal but for the version: no new version needs to be published."""
        return (
            self.grpc_address == other.grpc_address
            and self.http_address == other.http_address
            and self.status == other.status
            and self.models == other.models
            and self.capacity == other.capacity
            and self.latency == other.latency
            and dict(self.counters) == dict(other.counters)
            and dict(self.blobs) == dict(other.blobs)
        )


@dataclass(frozen=True, slots=True)
class DigestEntry:
    node_id: str
    incarnation: int
    status: MemberStatus
    state_version: int  # 0: no state known


@dataclass(frozen=True, slots=True)
class GossipRecord:
    """A liveness rumour, with the owner's state when the receiver needs it."""

    member: MemberUpdate
    state: NodeState | None = None


def _wire_size(state: NodeState) -> int:
    return (
        256 + len(state.grpc_address) + len(state.http_address)
        + sum(96 + len(m.name) + len(m.provider_kind) for m in state.models)
        + sum(48 + len(la.model) for la in state.latency)
        + sum(16 + len(k) for k in state.counters)
        + sum(8 + len(k) + len(v) for k, v in state.blobs.items())
        + 8 + len(state.capacity.prefix_names) * 8
    )
