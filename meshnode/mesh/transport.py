"""The mesh transport interface, the messages it carries, and an in-memory `MockNetwork`.

The membership driver talks to peers only through `Transport`; the real one is
`meshnode.mesh.grpc_transport.GrpcTransport`, the test one is `MockNetwork.transport(...)`.
Incoming messages are delivered to a `MeshHandler` (the driver), whatever the transport.

Concurrency rules:
- Every `Transport` method is called from many tasks on one event loop; none may block the loop.
- A peer that does not answer in time, refuses, or sends garbage is a `TransportError`; nothing
  else may escape (the driver treats it as "no ack").
- `MeshHandler` methods must answer quickly: `on_probe` may await one indirect probe bounded by
  its `timeout_ms`, `on_gossip` must not await at all beyond bookkeeping.

An authentication hook (issue 6) wraps a transport or sits in the gRPC interceptor chain; the
messages carry `protocol_version` so a newer peer can be recognised.
"""

from __future__ import annotations

import abc
import asyncio
import random
from dataclasses import dataclass, field
from typing import Protocol

from meshnode.mesh.state import PROTOCOL_VERSION, DigestEntry, GossipRecord, MemberUpdate


class TransportError(Exception):
    """The peer could not be reached or did not answer in time (mesh-internal, never leaves
    the mesh package)."""


@dataclass(frozen=True, slots=True)
class Probe:
    """A direct probe, or with `target_node` an indirect one (ping-req)."""

    from_node: str
    seq: int
    target_node: str = ""
    target_address: str = ""
    timeout_ms: int = 0
    about_you: MemberUpdate | None = None
    protocol_version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Ack:
    node_id: str
    seq: int
    ok: bool
    incarnation: int
    protocol_version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class GossipMessage:
    from_node: str
    digest: tuple[DigestEntry, ...] = ()
    records: tuple[GossipRecord, ...] = ()
    join: bool = False
    protocol_version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class GossipReply:
    from_node: str
    records: tuple[GossipRecord, ...] = ()
    wants: tuple[str, ...] = ()
    protocol_version: int = PROTOCOL_VERSION
    want_versions: tuple[int, ...] = ()  # per want, the state version the sender holds


class MeshHandler(Protocol):
    """What a transport delivers incoming messages to (the membership driver)."""

    async def on_probe(self, probe: Probe) -> Ack: ...

    async def on_gossip(self, message: GossipMessage) -> GossipReply: ...


class Transport(abc.ABC):
    """Sends mesh messages to a peer address. Raises `TransportError` on any failure."""

    @abc.abstractmethod
    async def probe(self, address: str, probe: Probe, timeout: float) -> Ack: ...

    @abc.abstractmethod
    async def gossip(self, address: str, message: GossipMessage, timeout: float) -> GossipReply: ...

    async def close(self) -> None:  # noqa: B027 - optional hook, most transports own nothing
        """Release channels and sockets."""


# ------------------------------------------------------------------------------ test double
@dataclass
class MockNetwork:
    """An in-memory network of handlers keyed by address, with loss and partitions.

    `loss` drops that fraction of messages (each direction independently); `partitions` holds
    address pairs that cannot talk; `down` holds addresses whose node is gone.
    """

    loss: float = 0.0
    rng: random.Random = field(default_factory=random.Random)
    handlers: dict[str, MeshHandler] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    partitions: set[frozenset[str]] = field(default_factory=set)
    sent: int = 0

    def register(self, address: str, handler: MeshHandler) -> None:
        self.handlers[address] = handler
        self.down.discard(address)

    def transport(self, address: str) -> MockTransport:
        return MockTransport(self, address)

    def _reach(self, src: str, dst: str) -> MeshHandler:
        self.sent += 1
        handler = self.handlers.get(dst)
        if handler is None or dst in self.down or src in self.down:
            raise TransportError(f"{dst}: unreachable")
        if frozenset((src, dst)) in self.partitions:
            raise TransportError(f"{dst}: partitioned")
        if self.loss and self.rng.random() < self.loss:
            raise TransportError(f"{dst}: lost")
        return handler


class MockTransport(Transport):
    def __init__(self, network: MockNetwork, address: str) -> None:
        self._net = network
        self._address = address

    async def probe(self, address: str, probe: Probe, timeout: float) -> Ack:
        handler = self._net._reach(self._address, address)
        try:
            async with asyncio.timeout(timeout):
                ack = await handler.on_probe(probe)
        except TimeoutError as exc:
            raise TransportError(f"{address}: probe timed out") from exc
        self._net._reach(address, self._address)  # the answer can be lost too
        return ack

    async def gossip(self, address: str, message: GossipMessage, timeout: float) -> GossipReply:
        handler = self._net._reach(self._address, address)
        reply = await handler.on_gossip(message)
        self._net._reach(address, self._address)
        return reply
