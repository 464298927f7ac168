"""`Governance`: keys, rate limits and budgets built from their config slices, and their lifetime.

The node builds one (`Governance(config.auth, config.budget, data_dir, node_id,
mesh_secret=config.mesh.secret)`), calls `open()` before building the router (the router takes
`governance.spend_gate`), passes `governance.install` to `create_app(extra_routes=[...])`, and
`close()` after the app is cleaned up. `install` also starts the one background task: re-reading
`keys.db` every `refresh_interval_s` when the CLI changed it.

Gossip (the mesh engineer's extension points), synchronous, fast (a few SQLite writes at most),
called from the event loop thread:
- spend, through the existing `NodeState.counters` map: put `gossip_counters()` (this node's
  own slots) in the state this node publishes, and call `merge_peer_counters(node_id,
  state.counters)` for every peer state received. A G-counter needs nothing more: each node
  carries only its own slots, every node takes the maximum per slot.
- key records and spend slots as signed pages in `NodeState.blobs`: `gossip_blobs()` (this
  node's own records, the ones it wrote, over stable pages, and its own slots in a spend page;
  see `governance.gossip`), `merge_gossip_blobs(peer, blobs)` for every member's state (a page
  unchanged since the last merge is skipped; spend slots are taken only in the owner's name).
  Spend elsewhere changes neither this node's pages nor its state version. Merging is
  last-writer-wins per name; records whose origin had auth off are refused, logged once per
  peer and counted (`dropped`, and `on_dropped` for the metric); so are pages that do not
  verify and records that do not fit in the pages. `export_gossip()` / `merge_gossip(blob)`
  are the same as one digest (what nodes from before pages send as `governance.keys`).

The mesh wires none of this on an unauthenticated mesh (docs/security.md).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from meshnode.config import AuthConfig, BudgetConfig
from meshnode.governance import http
from meshnode.governance.auth import Authenticator
from meshnode.governance.budget import BudgetLedger, SpendLimits
from meshnode.governance.counters import GLOBAL_SCOPE, CounterEntry
from meshnode.governance.gate import BudgetGate, CapOnlyGate, SpendGate
from meshnode.governance.gossip import (
    LEGACY_BLOB,
    GossipRejected,
    decode_digest,
    encode_digest,
    encode_pages,
)
from meshnode.governance.keys import KeyRecord, KeyStore
from meshnode.governance.ratelimit import RateLimiter

log = logging.getLogger(__name__)

KEYS_FILE = "keys.db"
SPEND_FILE = "spend.db"
COUNTER_PREFIX = "spend|"


class Governance:
    def __init__(
        self,
        auth: AuthConfig,
        budget: BudgetConfig,
        data_dir: Path,
        node_id: str,
        *,
        mesh_secret: str | None = None,
        refresh_interval_s: float = 1.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._auth_config = auth
        self._budget_config = budget
        self._mesh_secret = mesh_secret
        self._refresh_interval_s = refresh_interval_s
        self.node_id = node_id
        self.keys = KeyStore(data_dir / KEYS_FILE, auth.keys, node_id=node_id, clock=clock,
                             authorized=auth.enabled)
        self.ledger = BudgetLedger(budget, data_dir / SPEND_FILE, node_id, clock=clock)
        self.authenticator = Authenticator(self.keys)
        self.limiter = RateLimiter(monotonic)
        self._gate = BudgetGate(self.ledger, self._key_limits, budget.max_reservation)
        self._cap_only = CapOnlyGate(budget.max_reservation)
        self._opened = False
        # Gossip this node refused, by reason (meshnode_gossip_dropped_total through
        # `on_dropped`); peers already warned about, so a bad peer logs once.
        self.dropped: collections.Counter[str] = collections.Counter()
        self.on_dropped: Callable[[str, int], None] | None = None
        self._warned: set[tuple[str, str]] = set()
        # (peer, page name) -> hash of the page last merged: unchanged pages are skipped.
        self._seen_pages: dict[tuple[str, str], bytes] = {}

    def count_dropped(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n
        if self.on_dropped is not None:
            self.on_dropped(reason, n)

    @property
    def auth_enabled(self) -> bool:
        return self._auth_config.enabled

    @property
    def spend_gate(self) -> SpendGate:
        """What the router reserves budget through; with budgets off it only holds forwarded
        requests to what their entry node reserved."""
        return self._gate if self._budget_config.enabled else self._cap_only

    def _key_limits(self, name: str) -> SpendLimits | None:
        record = self.keys.get(name)
        if record is None or (record.daily_limit is None and record.monthly_limit is None):
            return None
        return SpendLimits(record.daily_limit, record.monthly_limit)

    # ------------------------------------------------------------------ lifetime
    def open(self, *, reset_ledger: bool = False) -> None:
        """Raises `StateFileError` (naming the file) when keys.db or spend.db cannot be
        trusted; `reset_ledger` starts a new spend ledger instead (`--reset-ledger`)."""
        if self._opened:
            return
        self.keys.open()
        self.keys.mark_node_auth(self._auth_config.enabled)
        try:
            self.ledger.open(reset=reset_ledger)
        except BaseException:
            self.keys.close()
            raise
        self._opened = True

    def close(self) -> None:
        self.keys.close()
        self.ledger.close()
        self._opened = False

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_interval_s)
            try:
                self.keys.refresh()
            except Exception:  # noqa: BLE001 - a locked or busy file: try again next tick
                log.warning("re-reading the key store failed; retrying", exc_info=True)

    async def _lifetime(self, app: web.Application) -> AsyncIterator[None]:
        self.open()
        task = asyncio.create_task(self._refresh_loop(), name="governance-refresh")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def install(self, app: web.Application) -> None:
        """A `create_app(extra_routes=...)` registrar: middleware, headers, /admin/keys,
        /admin/budget, and the key-store refresh task."""
        http.install(app, self)
        app.cleanup_ctx.append(self._lifetime)

    # ------------------------------------------------------------------ gossip
    def export_gossip(self) -> bytes:
        """Everything this node gossips as one digest (no paging)."""
        return encode_digest(self.keys.export_records(), self._own_counters(), self._mesh_secret)

    def _own_counters(self) -> list[CounterEntry]:
        own = [e for e in self.ledger.export_counters() if e.node == self.node_id]
        return sorted(own, key=lambda e: (e.scope != GLOBAL_SCOPE, e.scope, e.period))

    def gossip_blobs(self) -> dict[str, bytes]:
        """This node's own records and spend slots, as signed pages (NodeState.blobs)."""
        pages = encode_pages(self.keys.export_records(), self._own_counters(), self._mesh_secret)
        for reason, lost in (("key_overflow", len(pages.overflow_records)),
                             ("spend_overflow", len(pages.overflow_counters))):
            if lost:
                self._warn_once("", reason, "mesh: %d governance entr(ies) do not fit in the "
                                "gossip pages (%s) and are not gossiped", lost, reason)
                self.count_dropped(reason, lost)
        return pages.blobs

    def _warn_once(self, peer: str, reason: str, message: str, *args: object) -> None:
        first = (peer, reason) not in self._warned
        self._warned.add((peer, reason))
        log.log(logging.WARNING if first else logging.DEBUG, message, *args)

    def merge_gossip_blobs(self, peer: str, blobs: Mapping[str, bytes]) -> tuple[int, int]:
        """Merge the governance pages of `peer`'s state (its own: a state names its owner);
        returns (key records changed, counter slots raised). Unchanged pages cost nothing."""
        changed = raised = 0
        for name, blob in blobs.items():
            if not name.startswith("governance."):
                continue
            tag = hashlib.blake2b(blob, digest_size=16).digest()
            if self._seen_pages.get((peer, name)) == tag:
                continue
            try:
                c, r = self.merge_gossip(blob, peer, owner_only=name != LEGACY_BLOB)
            except GossipRejected as exc:
                self.count_dropped("bad_digest")
                self._warn_once(peer, "bad_digest",
                                "mesh: governance records from %s refused: %s", peer, exc)
                continue
            self._seen_pages[(peer, name)] = tag
            changed += c
            raised += r
        return changed, raised

    def merge_gossip(self, blob: bytes, peer: str = "", *,
                     owner_only: bool = False) -> tuple[int, int]:
        """Merge a peer's digest; returns (key records changed, counter slots raised).
        `owner_only`: take only the spend slots named after `peer`."""
        digest = decode_digest(blob, self._mesh_secret)
        refused: list[KeyRecord] = []
        changed = self.keys.merge_records(digest.records, refused)
        if refused:
            self.count_dropped("key_unauthorized", len(refused))
            if (peer, "key_unauthorized") not in self._warned:
                self._warned.add((peer, "key_unauthorized"))
                log.warning(
                    "mesh: %d key record(s) from %s refused: written by a node with auth off "
                    "(origin %s), which cannot create or revoke keys for the mesh",
                    len(refused), peer or "a peer",
                    ", ".join(sorted({r.origin for r in refused})),
                )
        counters = digest.counters
        if owner_only:
            counters = [c for c in counters if c.node == peer]
        return changed, self.ledger.merge_counters(counters) if counters else 0

    def gossip_counters(self, limit: int = 64) -> dict[str, float]:
        """This node's own spend slots of the current day and month, for the
        `NodeState.counters` map (`spend|SCOPE|PERIOD` -> USD). The global slots come first, so
        they survive the map's size cap (`limit`)."""
        own = [e for e in self.ledger.export_counters() if e.node == self.node_id]
        own.sort(key=lambda e: (e.scope != GLOBAL_SCOPE, e.scope, e.period))
        return {f"{COUNTER_PREFIX}{e.scope}|{e.period}": e.amount for e in own[:limit]}

    def merge_peer_counters(self, node_id: str, counters: Mapping[str, float]) -> int:
        """Merge the `spend|...` entries of a peer's `NodeState.counters` (its own slots);
        other entries are ignored. Returns how many slots grew."""
        if node_id == self.node_id:
            return 0
        entries = []
        for name, amount in counters.items():
            if not name.startswith(COUNTER_PREFIX):
                continue
            scope, sep, period = name[len(COUNTER_PREFIX):].rpartition("|")
            entry = CounterEntry.from_json([node_id, scope, period, amount]) if sep else None
            if entry is not None:
                entries.append(entry)
        return self.ledger.merge_counters(entries) if entries else 0

    # ------------------------------------------------------------------ reading
    def budget_summary(self) -> dict[str, Any]:
        """Budget spent and left (for /admin/stats and /admin/budget)."""
        out = self.ledger.summary()
        out["enabled"] = self._budget_config.enabled
        return out
