"""`MeshService`: the mesh as one component the node starts and stops.

It owns the gRPC server, the peer channels, the membership table and its driver, the seed
joiner, the `mesh` provider it adds to the router, and the publisher that turns this node's local
offers, capacity and latency into its gossiped `NodeState`. It does no routing and no HTTP
beyond the `/admin/mesh` handler it exposes.

Start order: bind gRPC (port 0 allowed; the real port is advertised and printed as
`MESHNODE_GRPC=host:port`), publish the first state, add the provider, start the loops, join the
seeds in the background. Stop: `leave()` tells every peer we go (they stop routing to us at
once) while in-flight forwarded calls may still finish; `stop()` then closes the server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson
from aiohttp import web

from meshnode.config import MeshConfig
from meshnode.errors import UpstreamUnavailable
from meshnode.governance.forwarded import ForwardedAdmission
from meshnode.governance.gossip import LEGACY_BLOB
from meshnode.mesh.admin import mesh_json
from meshnode.mesh.driver import MeshDriver, cancel_and_wait
from meshnode.mesh.grpc_transport import GrpcTransport
from meshnode.mesh.mdns import MdnsDiscovery, interface_addresses
from meshnode.mesh.membership import LIVE, Membership, MembershipSettings
from meshnode.mesh.seeds import SeedJoiner, join_host_port, split_host_port
from meshnode.mesh.state import (
    CapacityAd,
    LatencyAd,
    MemberStatus,
    MemberUpdate,
    ModelAd,
    NodeState,
)
from meshnode.mesh.transport import Ack, GossipMessage, GossipReply, Probe
from meshnode.observability.metrics import MeshView, Metrics
from meshnode.providers.base import Provider
from meshnode.providers.peer import MeshProvider
from meshnode.routing import prefix
from meshnode.rpc import convert
from meshnode.rpc.caller import CallerAuthority
from meshnode.rpc.client import PeerChannels
from meshnode.rpc.security import MeshSecurity
from meshnode.rpc.server import Admission, InferBackend, MeshServicer, start_server
from meshnode.types import mean_rate

log = logging.getLogger(__name__)

GOVERNANCE_BLOB = LEGACY_BLOB  # one NodeState.blobs digest, from nodes before pages


class MeshService:
    def __init__(
        self,
        config: MeshConfig,
        node_id: str,
        router: Any,
        *,
        http_address: str | Callable[[], str] = "",
        clock: Callable[[], float] = time.monotonic,
        announce: bool = True,
        grace_s: float = 5.0,
        counters: Callable[[], Mapping[str, float]] | None = None,
        on_peer_counters: Callable[[str, Mapping[str, float]], object] | None = None,
        blobs: Callable[[], Mapping[str, bytes]] | None = None,
        on_peer_blobs: Callable[[str, Mapping[str, bytes]], object] | None = None,
        security: MeshSecurity | None = None,
        metrics: Metrics | None = None,
        admission: Admission | None = None,
        key_models: Callable[[str], tuple[str, ...] | None] | None = None,
        on_dropped: Callable[[str, int], object] | None = None,
    ) -> None:
        self.config = config
        # Per-peer traffic and membership gauges (observability.metrics); None in bare tests.
        self._metrics = metrics
        # The serving side's checks on forwarded requests (governance.forwarded), and the key
        # scope the entry side asserts (docs/security.md).
        self._admission = admission
        self._key_models = key_models
        # Gossip cut while decoding peers' states (rpc.convert.DROPPED), reported as deltas.
        self._on_dropped = on_dropped
        self._dropped_seen: dict[str, int] = {}
        # Extra counters this node gossips in its state (governance: its own spend slots), and
        # who merges the counters of every member's state (governance: the G-counter merge).
        self._counters = counters
        self._on_peer_counters = on_peer_counters
        # Opaque payloads gossiped the same way (governance: signed key records); a member's
        # blobs are handed over once per new state version of that member.
        self._blobs = blobs
        self._on_peer_blobs = on_peer_blobs
        self._blob_versions: dict[str, int] = {}
        self.node_id = node_id
        self.router = router
        # The node binds HTTP before it starts services: read the address when we start.
        self._http_address = http_address
        self.http_address = ""
        self._grace_s = grace_s
        self._clock = clock
        self._announce = announce
        self.settings = MembershipSettings.from_config(config)
        # Refuses (ConfigError) an unauthenticated mesh beyond loopback; reads the TLS files.
        self.security = security or MeshSecurity.from_config(config)
        self.guard = self.security.guard(node_id)
        self.callers = CallerAuthority(node_id, self.security.auth, self.security.authenticated)
        self.channels = PeerChannels(
            credentials=self.security.channel_credentials, node_id=node_id,
            auth=self.security.auth,
        )
        self.membership: Membership | None = None
        self.driver: MeshDriver | None = None
        self.provider: MeshProvider | None = None
        self.joiner: SeedJoiner | None = None
        self.mdns: MdnsDiscovery | None = None
        self.advertise_address = ""
        self.port = 0
        self._server: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._left = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        rng = random.Random()
        address = self._http_address
        self.http_address = address() if callable(address) else address
        # The servicer needs the driver and the driver needs the bound address: bind first,
        # then hand the servicer its handler.
        servicer = MeshServicer(self.node_id, _Pending(), backend=self.router,
                                metrics=self._metrics, callers=self.callers,
                                admission=self._admission)
        self._server, self.port = await start_server(
            self.config.listen_addr, servicer,
            interceptors=[self.guard],
            credentials=self.security.server_credentials,
        )
        self.advertise_address = self._advertise(self.port)
        boot_version = int(time.time() * 1000)
        self.membership = Membership(
            self.node_id,
            self.advertise_address,
            self.settings,
            self._clock,
            rng,
            initial_state=self._local_state(boot_version),
        )
        self.driver = MeshDriver(
            self.membership,
            GrpcTransport(
                self.channels,
                on_gossip=self._metrics.record_gossip if self._metrics is not None else None,
            ),
            gossip_interval_s=self.config.gossip_interval_ms / 1000.0,
            rng=rng,
            on_change=self._log_change,
        )
        servicer.set_handler(self.driver)
        if self._metrics is not None:
            membership, self_id = self.membership, self.node_id
            self._metrics.mesh_view = MeshView(
                lambda: [(m.node_id, m.status.label) for m in membership.members()
                         if m.node_id != self_id],
                self.driver.rtt_ms,
            )
        self.provider = MeshProvider(
            self.node_id, self.membership, self.channels, rtt_ms=self.driver.rtt_ms.get,
            callers=self.callers,
            **({"key_models": self._key_models} if self._key_models is not None else {}),
        )
        self.router.add_provider(self.provider)
        self.driver.start()
        own = {self.advertise_address, self.config.listen_addr}
        self.joiner = SeedJoiner(
            self.config.seeds,
            self.driver.join,
            alone=lambda: not self.membership.peers(),  # type: ignore[union-attr]
            own_addresses=sorted(own),
            rng=rng,
            live_addresses=lambda: {
                m.address for m in self.membership.peers()  # type: ignore[union-attr]
            },
            failure_of=self.driver.join_failures.get,
        )
        self._tasks = [
            asyncio.create_task(self.joiner.run(), name="mesh-seeds"),
            asyncio.create_task(self._publish_loop(), name="mesh-publish"),
        ]
        if self.config.mdns:
            await self._start_mdns()
        if self._announce:
            print(f"MESHNODE_GRPC={self.advertise_address}", file=sys.stdout, flush=True)
        log.info("mesh: node %s serving gRPC on %s (authentication: %s)", self.node_id,
                 self.advertise_address, self.security.mode)

    async def _start_mdns(self) -> None:
        assert self.driver is not None and self.membership is not None
        membership = self.membership

        def is_member(node_id: str, address: str) -> bool:
            member = membership.get(node_id)
            return member is not None and member.status in LIVE and member.address == address

        auth = self.security.auth
        self.mdns = MdnsDiscovery(
            self.node_id, self.advertise_address,
            interface_addresses(self.config.mdns_interfaces, self.config.listen_addr,
                                self.advertise_address),
            self.driver.join, is_member, auth.mesh_tag() if auth is not None else "open",
        )
        await self.mdns.start()

    async def leave(self, timeout: float = 1.0) -> None:
        """Graceful leave: stop the loops and tell every peer at once. In-flight forwarded
        calls keep running until `stop()`."""
        if self._left or self.driver is None:
            return
        self._left = True
        await self._close_mdns()
        await self._cancel_tasks()
        await self.driver.stop()
        acked = await self.driver.leave(timeout)
        log.info("mesh: left the mesh (%d peers acknowledged)", acked)

    async def stop(self, graceful: bool = True, grace_s: float | None = None) -> None:
        """Close everything; `graceful` leaves first (if not yet) and lets in-flight forwarded
        calls finish for up to `grace_s`."""
        grace_s = self._grace_s if grace_s is None else grace_s
        if graceful:
            await self.leave()
        else:
            await self._close_mdns()
            await self._cancel_tasks()
            if self.driver is not None:
                await self.driver.stop()
        if self._server is not None:
            await self._server.stop(grace_s if graceful else None)
            self._server = None
        await self.channels.close()

    async def _close_mdns(self) -> None:
        if self.mdns is not None:
            await self.mdns.close()
            self.mdns = None

    async def _cancel_tasks(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks = []

    # ------------------------------------------------------------------ own state
    def _advertise(self, port: int) -> str:
        if self.config.advertise_addr:
            return self.config.advertise_addr
        host, _ = split_host_port(self.config.listen_addr)
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostbyname(socket.gethostname())
            if host.startswith("127."):
                # Debian and Ubuntu map the hostname to 127.0.1.1: peers elsewhere would be
                # told to dial an address that is only ours.
                log.warning(
                    "mesh: listening on %s but this host's name resolves to %s, which peers on "
                    "other machines cannot reach; set mesh.advertise_addr to this node's "
                    "reachable HOST:PORT",
                    self.config.listen_addr, host,
                )
        return join_host_port(host, port)

    def _local_providers(self) -> Sequence[Provider]:
        return [p for p in self.router.providers if p.kind != "mesh"]

    def _local_state(self, version: int = 0) -> NodeState:
        ads: dict[tuple[str, str], ModelAd] = {}
        # Per model, the dearest price of any local provider: a caller reserves against it,
        # since this node may fail over to that provider (docs/security.md).
        worst: dict[str, tuple[float, float]] = {}
        slots_total = slots_free = queue = 0
        tokens_per_s = 0.0
        reported: list[tuple[bytes, ...]] = []
        prefill_rates: list[float] = []
        decode_rates: list[float] = []
        for provider in self._local_providers():
            for offer in provider.offers():
                key = (offer.model, offer.provider_kind)
                ad = ModelAd(
                    offer.model, offer.provider_kind, offer.kinds, offer.cost_per_1k_input,
                    offer.cost_per_1k_output, offer.max_context_tokens,
                )
                w_in, w_out = worst.get(offer.model, (0.0, 0.0))
                worst[offer.model] = (max(w_in, offer.cost_per_1k_input),
                                      max(w_out, offer.cost_per_1k_output))
                known = ads.get(key)
                if known is None or (ad.cost_per_1k_input + ad.cost_per_1k_output) < (
                    known.cost_per_1k_input + known.cost_per_1k_output
                ):
                    ads[key] = ad
            capacity = provider.capacity()
            if capacity is not None:
                slots_total += capacity.slots_total
                slots_free += capacity.slots_free
                queue += capacity.queue_depth
                tokens_per_s += capacity.tokens_per_s
                prefill_rates.append(capacity.prefill_tokens_per_s)
                decode_rates.append(capacity.decode_tokens_per_s)
                if capacity.prefix_recent is not None:
                    reported.append(capacity.prefix_recent)
        ads = {k: dataclasses.replace(ad, max_cost_per_1k_input=worst[ad.name][0],
                                      max_cost_per_1k_output=worst[ad.name][1])
               for k, ad in ads.items()}
        # What the local engines hold (a worker reports it and drops what its engine evicts),
        # then what the router saw served by local providers that cannot tell.
        index = getattr(self.router, "prefix_index", None)
        held = [*(n for names in reported for n in names),
                *(index.names() if index is not None else ())]
        names = tuple(dict.fromkeys(held))[:prefix.MAX_NAMES]
        latency: list[LatencyAd] = []
        snapshot = getattr(self.router, "latency_snapshot", None)
        if snapshot is not None:
            for model, values in sorted(snapshot().items()):
                latency.append(
                    LatencyAd(
                        model,
                        round(values.get("ewma_ms") or 0.0, 3),
                        round(values.get("p95_ms") or 0.0, 3),
                        round(values.get("ttft_ms") or 0.0, 3),
                    )
                )
        return NodeState(
            node_id=self.node_id,
            version=version,
            grpc_address=self.advertise_address,
            http_address=self.http_address,
            status="left" if self._left else "alive",
            models=tuple(sorted(ads.values(), key=lambda a: (a.name, a.provider_kind))),
            capacity=CapacityAd(slots_total, slots_free, queue, round(tokens_per_s, 1),
                                prefix_scheme=prefix.SCHEME if names else 0,
                                prefix_names=names,
                                prefill_tokens_per_s=round(mean_rate(prefill_rates), 1),
                                decode_tokens_per_s=round(mean_rate(decode_rates), 2)),
            latency=tuple(latency),
            counters=self._counters() if self._counters is not None else {},
            blobs=self._blobs() if self._blobs is not None else {},
        )

    async def _publish_loop(self) -> None:
        interval = self.config.gossip_interval_ms / 1000.0
        while True:
            await asyncio.sleep(interval)
            assert self.membership is not None
            try:
                self.membership.publish(self._local_state())
            except Exception:  # noqa: BLE001 - a provider's bad report must not stop gossip
                log.exception("mesh: could not build this node's state")
            if self._on_peer_counters is not None:
                # Dead and left members too: what they spent stays spent.
                for member in self.membership.members():
                    if member.node_id != self.node_id and member.state is not None:
                        try:
                            self._on_peer_counters(member.node_id, member.state.counters)
                        except Exception:  # noqa: BLE001 - a bad peer must not stop gossip
                            log.exception("mesh: could not merge counters of a peer")
            if self._on_peer_blobs is not None:
                self._merge_peer_blobs()
            self._report_dropped()

    def _report_dropped(self) -> None:
        if self._on_dropped is None:
            return
        for reason, total in list(convert.DROPPED.items()):
            delta = total - self._dropped_seen.get(reason, 0)
            if delta > 0:
                self._dropped_seen[reason] = total
                self._on_dropped(reason, delta)

    def _merge_peer_blobs(self) -> None:
        assert self.membership is not None and self._on_peer_blobs is not None
        for member in self.membership.members():
            state = member.state
            if member.node_id == self.node_id or state is None or not state.blobs:
                continue
            if self._blob_versions.get(member.node_id) == state.version:
                continue
            self._blob_versions[member.node_id] = state.version
            try:
                self._on_peer_blobs(member.node_id, state.blobs)
            except Exception:  # noqa: BLE001 - a bad peer must not stop gossip
                log.exception("mesh: could not merge blobs of a peer")

    def _log_change(self, update: MemberUpdate) -> None:
        if update.status is MemberStatus.SUSPECT and self._metrics is not None:
            self._metrics.suspicions.inc()
        if update.node_id == self.node_id:
            if update.status is MemberStatus.ALIVE:
                log.info("mesh: refuted a rumour about us (incarnation %d)", update.incarnation)
            return
        what = {"left": "left the mesh", "dead": "is dead", "suspect": "is suspected dead",
                "alive": "is alive"}.get(update.status.label, f"is {update.status.label}")
        source = f", reported by {update.from_node}" if update.from_node else ""
        log.info("mesh: %s %s (incarnation %d%s)", update.node_id, what, update.incarnation,
                 source)

    # ------------------------------------------------------------------ admin
    def register_routes(self, app: web.Application) -> None:
        app.router.add_get("/admin/mesh", self.admin_handler)

    def snapshot(self) -> dict[str, Any]:
        assert self.membership is not None and self.driver is not None
        return mesh_json(
            self.membership.members(), self.node_id, self._clock(), self.driver.rtt_ms
        )

    async def admin_handler(self, request: web.Request) -> web.Response:
        """GET /admin/mesh (the node puts it behind admin auth)."""
        return web.Response(body=orjson.dumps(self.snapshot()), content_type="application/json")


def mesh_service(node: Any) -> MeshService:
    """The `Node` service factory: `Node(config, services=[mesh_service])` when mesh.enabled.

    Governance (key records, spend counters) is wired into gossip only on an authenticated mesh
    (docs/security.md): on a mesh anyone can join, nothing received can be attributed, so
    nothing is sent or merged."""
    config = node.config
    # Refuses (ConfigError) an unauthenticated mesh beyond loopback, or under auth.enabled.
    security = MeshSecurity.from_config(config.mesh, auth_enabled=config.auth.enabled)
    governance = getattr(node, "governance", None)
    reporter = governance  # counts gossip drops (the metric) on any mesh
    admission = ForwardedAdmission(node.node_id, governance)
    key_models = None
    if governance is not None:
        keys = governance.keys

        def key_models(name: str) -> tuple[str, ...] | None:
            record = keys.get(name)
            return record.models if record is not None else None
    if governance is not None and not security.authenticated:
        log.info("mesh: unauthenticated (no mesh.secret, no mesh.tls): key records and spend "
                 "counters are neither sent nor merged; budgets and keys stay per node")
        governance = None
    blobs = on_peer_blobs = None
    if governance is not None:
        # Key records and spend slots travel as signed pages in the owner's state; a page
        # that fails the check is refused, logged and counted (Governance.merge_gossip_blobs).
        blobs = governance.gossip_blobs

        def on_peer_blobs(peer: str, peer_blobs: Mapping[str, bytes]) -> None:
            governance.merge_gossip_blobs(peer, peer_blobs)

    return MeshService(
        config.mesh,
        node.node_id,
        node.router,
        http_address=lambda: str(node.http_address),
        grace_s=config.server.shutdown_grace_s,
        counters=governance.gossip_counters if governance is not None else None,
        on_peer_counters=governance.merge_peer_counters if governance is not None else None,
        blobs=blobs,
        on_peer_blobs=on_peer_blobs,
        metrics=getattr(node, "metrics", None),
        security=security,
        admission=admission,
        key_models=key_models,
        on_dropped=reporter.count_dropped if reporter is not None else None,
    )


class _Pending:
    """Answers mesh traffic that arrives in the instant between bind and wiring: the caller
    sees a failed call, as if we were not there yet."""

    async def on_probe(self, probe: Probe) -> Ack:
        raise UpstreamUnavailable("mesh not started")

    async def on_gossip(self, message: GossipMessage) -> GossipReply:
        raise UpstreamUnavailable("mesh not started")


__all__ = ["InferBackend", "MeshService", "mesh_service"]
