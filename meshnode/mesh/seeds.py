"""Seeds: turn `mesh.seeds` into peer addresses and join through them, retrying with backoff.

A seed is `host:port`; a DNS name may resolve to several addresses (a Kubernetes headless
Service) and each is tried. The joiner keeps trying, with exponential backoff and jitter, until
one answers; afterwards it watches and re-joins whenever this node finds itself alone (the seed
restarted, or a partition healed), so a mesh never stays split by an unlucky start order; and
every `recontact_interval_s` it knocks on the seeds that are not live members, so two halves
that forgot each other after a long partition find each other again.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)


def split_host_port(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve_seed(seed: str) -> list[str]:
    """Every address a seed names (an IP literal is itself). Empty when DNS fails."""
    host, port = split_host_port(seed)
    try:
        ipaddress.ip_address(host)
        return [join_host_port(host, port)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        log.debug("seed %s does not resolve: %s", seed, exc)
        return []
    out: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        addr = join_host_port(str(sockaddr[0]), port)
        if addr not in out:
            out.append(addr)
    return out


@dataclass(frozen=True, slots=True)
class Backoff:
    initial_s: float = 0.2
    max_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def delay(self, attempt: int, rng: random.Random) -> float:
        base = min(self.max_s, self.initial_s * self.multiplier**attempt)
        return base * (1.0 + self.jitter * (2.0 * rng.random() - 1.0))


def diagnose(address: str, failure: str | None) -> str:
    """Why a seed did not let us join, from the transport's failure text, in words that name
    the likely mistake."""
    text = failure or ""
    if "UNAUTHENTICATED" in text or "authentication failed" in text:
        return (f"{address} answered but refused us: mesh authentication failed (its "
                "mesh.secret differs from ours, or the clocks are more than 30 s apart)")
    if "PERMISSION_DENIED" in text:
        return f"{address} answered but refused us: {text.split(': ', 2)[-1]}"
    if "http1.x" in text or "HTTP/1" in text:
        return (f"{address} speaks HTTP/1.1, not gRPC: it is an HTTP port (a node's "
                "server.listen_addr?); a seed is a peer's gRPC address (mesh.listen_addr, port "
                "50051 by default)")
    if "DEADLINE_EXCEEDED" in text:
        return f"{address} did not answer in time"
    if "UNAVAILABLE" in text:
        return (f"nothing answers gRPC at {address} (node down, wrong host or port; a seed is "
                "a peer's mesh.listen_addr, port 50051 by default)")
    return f"{address}: {text}" if text else f"{address} did not answer"


class SeedJoiner:
    """Joins through the seeds and re-joins when alone. `join(address) -> answered`."""

    def __init__(
        self,
        seeds: Sequence[str],
        join: Callable[[str], Awaitable[bool]],
        alone: Callable[[], bool],
        own_addresses: Sequence[str] = (),
        backoff: Backoff | None = None,
        resolve: Callable[[str], Awaitable[list[str]]] = resolve_seed,
        rng: random.Random | None = None,
        check_interval_s: float = 5.0,
        live_addresses: Callable[[], set[str]] | None = None,
        recontact_interval_s: float = 30.0,
        failure_of: Callable[[str], str | None] | None = None,
    ) -> None:
        self._seeds = list(seeds)
        # The last join failure of an address (the driver keeps them), for the warning.
        self._failure_of = failure_of
        self._tried: list[str] = []
        self._join = join
        self._alone = alone
        self._live = live_addresses
        self._recontact_interval_s = recontact_interval_s
        self._own = set(own_addresses)
        self._backoff = backoff or Backoff()
        self._resolve = resolve
        self._rng = rng or random.Random()
        self._check_interval_s = check_interval_s
        self.joined = asyncio.Event()

    async def try_once(self) -> bool:
        """Resolve every seed and try each address until one answers."""
        self._tried = []
        for seed in self._seeds:
            for address in await self._resolve(seed):
                if address in self._own:
                    continue
                self._tried.append(address)
                if await self._join(address):
                    log.info("mesh: joined through seed %s (%s)", seed, address)
                    return True
        return False

    def _why(self) -> str:
        if not self._tried:
            return "no seed address resolves"
        failure_of = self._failure_of or (lambda address: None)
        return "; ".join(diagnose(a, failure_of(a)) for a in self._tried)

    async def recontact(self) -> int:
        """Knock on every seed address that is not a live member now. Reconnect probes of dead
        members stop once they are forgotten (`dead_forget_s`), so a partition that outlived
        that heals here, as long as a seed sits on the other side. Returns how many answered."""
        if self._live is None:
            return 0
        live = self._live()
        answered = 0
        for seed in self._seeds:
            for address in await self._resolve(seed):
                if address in self._own or address in live:
                    continue
                if await self._join(address):
                    log.info("mesh: seed %s (%s) answered again; merged its view", seed, address)
                    answered += 1
        return answered

    async def run(self) -> None:
        if not self._seeds:
            self.joined.set()
            return
        attempt = 0
        loop = asyncio.get_running_loop()
        next_recontact = loop.time() + self._recontact_interval_s
        while True:
            if self._alone():
                if await self.try_once():
                    self.joined.set()
                    attempt = 0
                else:
                    delay = self._backoff.delay(attempt, self._rng)
                    attempt += 1
                    if attempt == 1 or attempt % 10 == 0:
                        log.warning("mesh: could not join through the seeds (%s); retrying: %s",
                                    ", ".join(self._seeds), self._why())
                    await asyncio.sleep(delay)
                    continue
            else:
                self.joined.set()
                if loop.time() >= next_recontact:
                    next_recontact = loop.time() + self._recontact_interval_s
                    await self.recontact()
            await asyncio.sleep(self._check_interval_s)
