"""`Governance`: keys, rate limits and budgets built from their config slices, and their lifetime.

The node builds one (`Governance(config.auth, config.budget, data_dir, node_id,
mesh_secret=config.mesh.secret)`), calls `open()` before building the router (the router takes
`governance.spend_gate`), passes `governance.install` to `create_app(extra_routes=[...])`, and
`close()` after the app is cleaned up. `install` also starts the one background task: re-reading
`keys.db` every `refresh_interval_s` when the CLI changed it.

Gossip (the mesh engineer's extension point): `export_gossip() -> bytes` is this node's signed
governance digest (its key records and the spend counters of the current day and month);
`merge_gossip(blob)` merges a peer's digest (or raises `GossipRejected`). Both are synchronous,
fast (a few SQLite writes at most) and must be called from the event loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from meshnode.config import AuthConfig, BudgetConfig
from meshnode.governance import http
from meshnode.governance.auth import Authenticator
from meshnode.governance.budget import BudgetLedger, SpendLimits
from meshnode.governance.gate import BudgetGate, SpendGate
from meshnode.governance.gossip import decode_digest, encode_digest
from meshnode.governance.keys import KeyStore
from meshnode.governance.ratelimit import RateLimiter

log = logging.getLogger(__name__)

KEYS_FILE = "keys.db"
SPEND_FILE = "spend.db"


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
        self.keys = KeyStore(data_dir / KEYS_FILE, auth.keys, node_id=node_id, clock=clock)
        self.ledger = BudgetLedger(budget, data_dir / SPEND_FILE, node_id, clock=clock)
        self.authenticator = Authenticator(self.keys)
        self.limiter = RateLimiter(monotonic)
        self._gate = BudgetGate(self.ledger, self._key_limits, budget.max_reservation)
        self._opened = False

    @property
    def auth_enabled(self) -> bool:
        return self._auth_config.enabled

    @property
    def spend_gate(self) -> SpendGate | None:
        """What the router reserves budget through; None when budgets are off."""
        return self._gate if self._budget_config.enabled else None

    def _key_limits(self, name: str) -> SpendLimits | None:
        record = self.keys.get(name)
        if record is None or (record.daily_limit is None and record.monthly_limit is None):
            return None
        return SpendLimits(record.daily_limit, record.monthly_limit)

    # ------------------------------------------------------------------ lifetime
    def open(self) -> None:
        if self._opened:
            return
        self.keys.open()
        self.ledger.open()
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
        return encode_digest(
            self.keys.export_records(), self.ledger.export_counters(), self._mesh_secret
        )

    def merge_gossip(self, blob: bytes) -> tuple[int, int]:
        """Merge a peer's digest; returns (key records changed, counter slots raised)."""
        digest = decode_digest(blob, self._mesh_secret)
        return self.keys.merge_records(digest.records), self.ledger.merge_counters(
            digest.counters
        )

    # ------------------------------------------------------------------ reading
    def budget_summary(self) -> dict[str, Any]:
        """Budget spent and left (for /admin/stats and /admin/budget)."""
        out = self.ledger.summary()
        out["enabled"] = self._budget_config.enabled
        return out
