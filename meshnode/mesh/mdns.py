"""mDNS discovery (SPEC §1): announce this node as `_meshnode._tcp.local.` and browse for others,
with zeroconf's asyncio API, only on the interfaces SPEC §1 allows.

Interfaces: those in `mesh.mdns_interfaces` (names or IPv4 addresses), else the one that carries
`mesh.listen_addr` (only loopback when it is 127.0.0.1; for a wildcard bind, the advertised
address's). zeroconf is bound to those addresses (`interfaces=[...]`) and to IPv4, so it never
sends multicast anywhere else.

A discovered node is only a candidate: its address is handed to `join` (one authenticated gossip
exchange through the normal transport); it becomes a member only if that exchange succeeds. The
TXT record carries `id`, `grpc` (what to dial), `v` (protocol version) and `mesh`, a tag derived
from the mesh secret (or "open"), so nodes of other meshes on the same link are ignored before
any exchange. Two nodes announcing the same id are reported (`duplicates`, an error log), never
joined. No multicast on the interface (a container, loopback without the MULTICAST flag) is a
warning: seeds still form the mesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import ifaddr
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from meshnode.mesh.seeds import split_host_port
from meshnode.mesh.state import PROTOCOL_VERSION

log = logging.getLogger(__name__)

SERVICE_TYPE = "_meshnode._tcp.local."
RETRY_S = 10.0  # a discovered address that refused us is tried again after this long


def interface_addresses(names: Sequence[str], listen_addr: str, advertise_addr: str) -> list[str]:
    """The IPv4 addresses mDNS may use (SPEC §1). Empty: nothing allowed (mDNS stays off)."""
    if names:
        adapters = {a.nice_name: a for a in ifaddr.get_adapters()}
        out: list[str] = []
        for name in names:
            try:
                out.append(str(ipaddress.IPv4Address(name)))
                continue
            except ValueError:
                pass
            adapter = adapters.get(name)
            if adapter is None:
                log.warning("mesh: mdns interface %s does not exist; not used", name)
                continue
            out.extend(ip.ip for ip in adapter.ips if isinstance(ip.ip, str))
        return out
    host = split_host_port(listen_addr)[0]
    if host in ("", "0.0.0.0", "::"):
        host = split_host_port(advertise_addr)[0]
    if host == "localhost":
        host = "127.0.0.1"
    try:
        return [str(ipaddress.IPv4Address(host))]
    except ValueError:
        log.warning("mesh: mDNS needs an IPv4 listen or advertise address (got %s); off", host)
        return []


def _instance(node_id: str) -> str:
    """This process's instance name: the node id plus a random suffix. Two processes that share a
    node id (a copied data_dir, a hard-coded `node.id`) must not share the instance name: each
    would only ever resolve its own record under it and neither could report the other. The id
    that counts travels in TXT (`id`)."""
    label = re.sub(r"[^A-Za-z0-9_-]", "-", node_id)[:52] or "node"
    return f"{label}-{secrets.token_hex(3)}.{SERVICE_TYPE}"


class MdnsDiscovery:
    def __init__(
        self,
        node_id: str,
        advertise_address: str,
        interfaces: Sequence[str],
        join: Callable[[str], Awaitable[bool]],
        is_member: Callable[[str, str], bool],
        mesh_tag: str,
    ) -> None:
        self.node_id = node_id
        self.advertise_address = advertise_address
        self.interfaces = list(interfaces)
        self._join = join
        self._is_member = is_member
        self._tag = mesh_tag
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._tried: dict[str, float] = {}
        self._seen_ids: dict[str, str] = {}  # node id -> address it announced
        self.duplicates: set[str] = set()  # node ids announced from more than one address
        self.discovered: set[str] = set()  # addresses that passed the tag check
        self.running = False

    async def start(self) -> bool:
        """Announce and browse. False (with a warning) when multicast is not available."""
        if not self.interfaces:
            return False
        host, port = split_host_port(self.advertise_address)
        try:
            addresses = [socket.inet_aton(str(ipaddress.IPv4Address(host)))]
        except ValueError:
            addresses = [socket.inet_aton(self.interfaces[0])]
        self._info = AsyncServiceInfo(
            SERVICE_TYPE, _instance(self.node_id), addresses=addresses, port=port,
            properties={"id": self.node_id, "grpc": self.advertise_address,
                        "v": str(PROTOCOL_VERSION), "mesh": self._tag},
        )
        try:
            self._zc = AsyncZeroconf(interfaces=self.interfaces, ip_version=IPVersion.V4Only)
            # The instance name is unique per process; a twin with our node id is seen by the
            # browser below (TXT `id`) and reported.
            await (await self._zc.async_register_service(self._info, allow_name_change=True))
            self._browser = AsyncServiceBrowser(
                self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change]
            )
        except OSError as exc:
            log.warning("mesh: mDNS unavailable on %s (%s); peers are found through seeds only",
                        ", ".join(self.interfaces), exc)
            await self.close()
            return False
        self.running = True
        self._spawn(self._retry_loop())
        log.info("mesh: mDNS announcing %s on %s", self.advertise_address,
                 ", ".join(self.interfaces))
        return True

    async def close(self) -> None:
        self.running = False
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        zc, self._zc = self._zc, None
        if zc is None:
            return
        with contextlib.suppress(Exception):  # closing must not fail a shutdown
            if self._browser is not None:
                await self._browser.async_cancel()
            if self._info is not None:
                await zc.async_unregister_service(self._info)
        with contextlib.suppress(Exception):
            await zc.async_close()

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            return
        self._spawn(self._resolve(service_type, name))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _retry_loop(self) -> None:
        """Discovered nodes that are not (or no longer) members are tried again."""
        while True:
            await asyncio.sleep(RETRY_S)
            for node_id, address in list(self._seen_ids.items()):
                await self._try_join(node_id, address)

    async def _resolve(self, service_type: str, name: str) -> None:
        if self._zc is None:
            return
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._zc.zeroconf, 3000):
            return
        props = {k.decode(): (v or b"").decode("utf-8", "replace")
                 for k, v in info.properties.items() if isinstance(k, bytes)}
        node_id, address = props.get("id", ""), props.get("grpc", "")
        if not node_id or not address:
            return
        if props.get("mesh") != self._tag:
            return  # another mesh (another secret) on the same link
        if node_id == self.node_id:
            if address != self.advertise_address:
                self._duplicate(node_id, address, self.advertise_address)
            return
        known = self._seen_ids.get(node_id)
        if known is not None and known != address:
            self._duplicate(node_id, address, known)
            return
        self._seen_ids[node_id] = address
        self.discovered.add(address)
        await self._try_join(node_id, address)

    async def _try_join(self, node_id: str, address: str) -> None:
        if node_id in self.duplicates or self._is_member(node_id, address):
            return
        now = time.monotonic()
        if now - self._tried.get(address, -RETRY_S) < RETRY_S:
            return
        self._tried[address] = now
        if await self._join(address):
            log.info("mesh: joined %s (%s), found by mDNS", node_id, address)
        else:
            log.info("mesh: %s (%s) found by mDNS did not accept us", node_id, address)

    def _duplicate(self, node_id: str, address: str, other: str) -> None:
        if node_id not in self.duplicates:
            log.error("mesh: two nodes announce the id %s (%s and %s); give each a unique "
                      "node.id", node_id, other, address)
        self.duplicates.add(node_id)
