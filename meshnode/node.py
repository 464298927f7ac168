"""The node: builds every component from a `Config` and owns their start and stop order.

No business logic lives here. `Node(config)` builds the providers (`providers.registry`), the
`Router` and the HTTP app (`api.app.create_app`); `start()` brings them up, `stop()` takes them
down; `run_until_signal()` does both around SIGTERM/SIGINT and is what `meshnode run` calls.

Start order: the HTTP address is bound (not yet served) and the gRPC address probed, so a port
in use fails the start before any model loads → providers start → HTTP serves (port 0 allowed;
the real address is logged and printed as `MESHNODE_HTTP=http://HOST:PORT` on stdout) → extra
services start.
Stop order: services `leave()` (tell the mesh we go) → HTTP stops accepting and drains in-flight
requests for up to `server.shutdown_grace_s` → services `stop()` → providers close.

Extension hook (how the mesh plugs in): pass `services=[factory, ...]`; each factory is called
with the `Node` once its router exists, before the app is built, and returns a `NodeService`.
A service may register HTTP routes (`register_routes(app)`, e.g. `/admin/mesh`), and may add
providers to `node.router` in `start()`. `node.http_address` is set by the time `start()` runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from aiohttp import web

from meshnode.api.app import create_app
from meshnode.api.responses_http import RESPONSE_STORE
from meshnode.api.server import LimitedAppRunner
from meshnode.api.state import CACHE
from meshnode.cache.embedders import RouterEmbedder
from meshnode.cache.service import ResponseCache
from meshnode.config import Config, ResolvedProvider, node_id
from meshnode.errors import ConfigError
from meshnode.governance.service import Governance
from meshnode.mesh.seeds import split_host_port
from meshnode.observability import tracing
from meshnode.observability.metrics import Metrics
from meshnode.providers.base import Provider
from meshnode.providers.registry import ProviderContext, build_provider
from meshnode.responses_store import ResponseStore
from meshnode.routing.router import Router

log = logging.getLogger(__name__)

# The variables that switch cloud providers on in the embedded default (SPEC §2).
CLOUD_KEYS: dict[str, tuple[str, ...]] = {
    "openai": ("OPENAI_API_KEY",),
    "anthropic": ("ANTHROPIC_API_KEY",),
    "cloudflare": ("CLOUDFLARE_ACCOUNT_ID", "CLOUDFLARE_API_TOKEN"),
    "together": ("TOGETHER_API_KEY",),
}


@runtime_checkable
class NodeService(Protocol):
    """A component started after the HTTP server and stopped before the providers close.

    Optional methods, called when present:
    - `register_routes(app: web.Application) -> None`: before the app starts;
    - `async leave() -> None`: first thing at shutdown, before HTTP drains (announce we go).
    """

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


ServiceFactory = Callable[["Node"], NodeService]


class Node:
    """One meshnode process's components, built from one config."""

    def __init__(
        self,
        config: Config,
        *,
        services: Sequence[ServiceFactory] = (),
        embedded_default: bool = False,
        env: Mapping[str, str] | None = None,
        reset_ledger: bool = False,
    ) -> None:
        """`embedded_default`: the config came from no file (SPEC §2); then a provider whose
        adapter cannot be imported yet is skipped with a warning instead of stopping the node.
        Raises ConfigError when a provider cannot be built, StateFileError when a file in
        data_dir cannot be trusted (`reset_ledger`: start a new spend ledger instead)."""
        self.config = config
        self.embedded_default = embedded_default
        self._env = os.environ if env is None else env
        self.node_id = node_id(config)
        self.metrics = Metrics()
        ctx = ProviderContext(
            node_id=self.node_id,
            data_dir=config.node.data_dir,
            timeouts=config.routing.timeouts,
        )
        self.providers: list[Provider] = self._build_providers(ctx)
        # Keys, rate limits and the budget ledger (SQLite in data_dir); opened before the router
        # takes its budget gate.
        self.governance = Governance(
            config.auth, config.budget, config.node.data_dir, self.node_id,
            mesh_secret=config.mesh.secret,
        )
        self.governance.open(reset_ledger=reset_ledger)
        self.metrics.budget_source = self.governance.budget_summary  # read at scrape time
        self.governance.on_dropped = (
            lambda reason, n: self.metrics.gossip_dropped.labels(reason).inc(n)
        )
        self.router = Router(
            config.routing,
            config.fallback_chain(),
            self.providers,
            self.node_id,
            max_hops=config.mesh.max_hops,
            spend=self.governance.spend_gate,
        )
        # Installed even when disabled: it strips the `cache` request field before routing.
        semantic = config.cache.semantic
        self.cache = ResponseCache(
            config.cache,
            node_id=self.node_id,
            data_dir=config.node.data_dir,
            embedder=RouterEmbedder(self.router, semantic.model) if semantic.enabled else None,
            registry=self.metrics.registry,
        )
        factories = list(services)
        if config.mesh.enabled:
            from meshnode.mesh.service import mesh_service  # gRPC is imported only when used

            factories.append(mesh_service)
        self.services: list[NodeService] = [factory(self) for factory in factories]
        self.app = create_app(
            self.router,
            node_id=self.node_id,
            server=config.server,
            timeouts=config.routing.timeouts,
            metrics=self.metrics,
            extra_routes=[
                self.governance.install,  # auth + rate-limit middleware, /admin/keys
                *[s.register_routes for s in self.services if hasattr(s, "register_routes")],
            ],
            # The node closes providers itself, after services stopped (see the stop order).
            manage_providers=False,
        )
        self.app[CACHE] = self.cache
        # Responses API `store: true` (the app's default store is in memory).
        self.app[RESPONSE_STORE] = ResponseStore(
            config.node.data_dir,
            max_entries=config.server.responses_store.max_entries,
            max_age_s=config.server.responses_store.max_age_s,
        )
        self.http_address = ""  # host:port once bound
        self._runner: web.AppRunner | None = None
        self._started_providers: list[Provider] = []
        self._started_services: list[NodeService] = []

    # ------------------------------------------------------------------ building
    def _build_providers(self, ctx: ProviderContext) -> list[Provider]:
        providers: list[Provider] = []
        errors: list[str] = []
        for resolved in self.config.resolved_providers():
            try:
                providers.append(build_provider(resolved, ctx))
            except ConfigError as exc:
                errors.extend(exc.errors)
            except ImportError as exc:
                if not self.embedded_default:
                    errors.append(
                        f"providers.{resolved.name}: the {resolved.type} adapter cannot be "
                        f"loaded ({exc})"
                    )
                    continue
                log.warning(
                    "provider %s (%s) is not available in this build, skipped: %s",
                    resolved.name, resolved.type, exc,
                )
        if errors:
            raise ConfigError(errors)
        return providers

    @property
    def http_url(self) -> str:
        return f"http://{self.http_address}" if self.http_address else ""

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Bring everything up; on failure, take down what was started and re-raise."""
        sock: socket.socket | None = None
        try:
            # Off unless the OpenTelemetry variables ask for it (observability/tracing.py).
            tracing.configure(self.node_id)
            # Ports first: a port in use is reported before minutes of model loading, not after.
            sock = self._reserve_http()
            if self.config.mesh.enabled:
                _probe_bind(self.config.mesh.listen_addr, "gRPC",
                            "mesh.listen_addr or --grpc-listen")
            for provider in self.providers:
                await provider.start()
                self._started_providers.append(provider)
            await self.cache.start()
            await self._start_http(sock)
            sock = None  # the site owns it now
            for service in self.services:
                await service.start()
                self._started_services.append(service)
        except BaseException:
            if sock is not None:
                sock.close()
            await self.stop()
            raise
        self._log_serving()

    def _reserve_http(self) -> socket.socket:
        """Bind (not listen) the HTTP address: the port is ours, connections are refused until
        `_start_http` serves on it."""
        host, port = split_host_port(self.config.server.listen_addr)
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            family, _, _, _, sockaddr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot bind HTTP on {self.config.server.listen_addr}: "
                          f"{exc.strerror or exc}; set server.listen_addr or --listen") from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot bind HTTP on {self.config.server.listen_addr}: "
                          f"{exc.strerror or exc}; set server.listen_addr or --listen") from None
        return sock

    async def _start_http(self, sock: socket.socket) -> None:
        grace = self.config.server.shutdown_grace_s
        runner = LimitedAppRunner(
            self.app,
            # A client that disconnects cancels its handler, and so its upstream call.
            handler_cancellation=True,
            shutdown_timeout=grace,
            access_log=None,
        )
        await runner.setup()
        self._runner = runner
        site = web.SockSite(runner, sock, shutdown_timeout=grace)
        await site.start()
        bound = runner.addresses[0]
        bound_host, bound_port = bound[0], bound[1]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.http_address = f"{shown}:{bound_port}"
        log.info("HTTP API listening on %s", self.http_url, extra={"node": self.node_id})
        # Machine-readable, for scripts and tests that start nodes on port 0.
        print(f"MESHNODE_HTTP={self.http_url}", file=sys.stdout, flush=True)

    async def stop(self) -> None:
        """Leave, drain, stop services, close providers. Safe to call more than once."""
        for service in reversed(self._started_services):
            leave = getattr(service, "leave", None)
            if leave is not None:
                try:
                    await leave()
                except Exception:  # noqa: BLE001 - shutting down: report and go on
                    log.exception("service %s failed to leave", type(service).__name__)
        if self._runner is not None:
            runner, self._runner = self._runner, None
            # Stops accepting, waits up to shutdown_grace_s for in-flight requests.
            await runner.cleanup()
        while self._started_services:
            service = self._started_services.pop()
            try:
                await service.stop()
            except Exception:  # noqa: BLE001
                log.exception("service %s failed to stop", type(service).__name__)
        await self.cache.close()
        while self._started_providers:
            provider = self._started_providers.pop()
            try:
                await provider.close()
            except Exception:  # noqa: BLE001
                log.exception("provider %s failed to close", provider.name)
        self.governance.close()
        tracing.shutdown()

    async def run_until_signal(self) -> int:
        """Start, serve until SIGTERM/SIGINT, stop gracefully. Returns the exit status."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
            await stop.wait()
            log.info(
                "signal received: draining in-flight requests (up to %.1f s), then exiting",
                self.config.server.shutdown_grace_s,
            )
            await self.stop()
            log.info("node %s stopped", self.node_id)
            return 0
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    # ------------------------------------------------------------------ reporting
    def _log_serving(self) -> None:
        """Say clearly what this node serves (and, with no config, which keys were found)."""
        if self.embedded_default:
            found = [
                provider for provider, keys in CLOUD_KEYS.items()
                if all(self._env.get(k) for k in keys)
            ]
            missing = [
                "+".join(keys) for provider, keys in CLOUD_KEYS.items() if provider not in found
            ]
            log.info(
                "no config file: embedded default; cloud keys found for: %s; not set: %s",
                ", ".join(found) or "none",
                ", ".join(missing) or "none",
            )
        resolved = {r.name: r for r in self.config.resolved_providers()}
        for provider in self.router.providers:
            ok, why = provider.ready()
            models = ", ".join(
                f"{o.model}" + (f" ({o.upstream_model})" if o.upstream_model != o.model else "")
                for o in provider.offers()
            )
            log.info(
                "provider %s (%s)%s: %s%s",
                provider.name,
                provider.kind,
                _where(resolved.get(provider.name)),
                models or "no models",
                "" if ok else f" [NOT READY: {why}]",
            )
        if not self.router.providers:
            log.warning("this node serves no provider: every inference request will fail")
        config = self.config
        limits = [f"{name} ${value:g}" for name, value in (
            ("daily", config.budget.daily_limit), ("monthly", config.budget.monthly_limit))
            if value is not None]
        log.info(
            "auth %s; budget %s; cache %s; mesh %s",
            "on" if config.auth.enabled else "off (any client may call; see auth.enabled)",
            ", ".join(limits) if config.budget.enabled and limits else "unlimited",
            "on" if config.cache.enabled else "off",
            ("off" if not config.mesh.enabled else
             f"on (mDNS {'on' if config.mesh.mdns else 'off'}, "
             f"{len(config.mesh.seeds)} seed(s), "
             f"{'secret' if config.mesh.secret else 'mTLS' if config.mesh.tls.enabled else 'no'}"
             " peer authentication)"),
        )
        served = sorted({o.model for p in self.router.providers for o in p.offers()})
        log.info(
            "node %s serving %d model(s) at %s/v1: %s",
            self.node_id, len(served), self.http_url, ", ".join(served) or "none",
        )


def _probe_bind(addr: str, what: str, setting: str) -> None:
    """Fail now if `addr` cannot be bound (in use, not ours); the socket is closed at once, so
    the server that binds it later (gRPC) finds it free. Port 0 is always free."""
    host, port = split_host_port(addr)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(sockaddr)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot bind {what} on {addr}: {exc.strerror or exc}; set "
                      f"{setting}") from None


def _where(resolved: ResolvedProvider | None) -> str:
    if resolved is None or not resolved.base_url:
        return ""
    return f" at {resolved.base_url}"
