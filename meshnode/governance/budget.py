"""The spend ledger: reservations before a call, settlement after it, limits, crash recovery.

Owns `spend.db` in data_dir (SQLite, WAL). The invariant it keeps, for every limit that applies
(global and the caller's key; daily and monthly):

    settled spend + open reservations + the new reservation <= limit

checked and recorded in one synchronous step on the event loop, so concurrent requests cannot
both pass a check that only one of them fits (no await between check and reserve). A call
reserves its worst case before it starts, and settles to its real cost (or releases, when it
failed) after. Open reservations are rows in SQLite too: after a SIGKILL the next start finds
them and charges each at its full reserved amount, in the period it was made in (conservative:
the call may have been billed upstream). With `synchronous=NORMAL` a WAL commit survives the
process dying at any point (not a power loss of the whole machine).

With `scope: mesh` the settled spend is the mesh-wide total from `counters.SpendCounters`, which
gossip keeps merging (`export_counters` / `merge_counters`); with `scope: node` it is this
node's own slot. Open reservations are always this node's own: other nodes' in-flight calls are
invisible until they settle and gossip (docs/governance.md states the resulting bound).

Served spend (docs/security.md): a reservation made for a request a peer forwarded
(`reserve(..., served=True)`) is checked against the same limits but charged to the `served:`
twins of its scopes (`served:*`, `served:key:NAME`). Mesh totals never sum them (the entry node
charged the same call to its own `*` slot), but what this node's own providers spent always
counts against its own limits: `scope: node` reads `own(S) + own(served:S)`, `scope: mesh` reads
`max(total(S), own(S) + own(served:S))`, so a peer (even one without a budget, which charges
nothing) cannot make this node spend past its limit.

A data_dir remembers that it has a ledger: the first open writes a random ledger id into
`spend.db` and beside it (`spend.ledger_id`). From then on a missing or empty `spend.db`, one with
another id, or one that fails its checks (`meshnode.state_files`: a damaged write-ahead log,
a failed integrity check) refuses to start with a `StateFileError` naming the file and
`--reset-ledger`, instead of starting silently at $0 spent. `open(reset=True)` sets the old
files aside (`spend.db.broken-*`) and starts a new ledger. A clean close checkpoints the log
into the database, so only a crash leaves one to check.

It must not know about HTTP, routing or pricing: amounts arrive in USD.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshnode.config import BudgetConfig
from meshnode.errors import BudgetExceeded, StateFileError
from meshnode.governance.counters import GLOBAL_SCOPE, CounterEntry, SpendCounters, key_scope
from meshnode.governance.periods import Periods, oldest_kept, periods_at
from meshnode.state_files import open_checked, set_aside

log = logging.getLogger(__name__)

# Float sums of prices: a reservation that fits to the last nano-dollar is allowed.
EPSILON = 1e-9
# A refusal caused only by reservations in flight: they settle within a call's lifetime.
IN_FLIGHT_RETRY_S = 1.0
SERVED_PREFIX = "served:"


def served_scope(scope: str) -> str:
    return SERVED_PREFIX + scope


# Beside spend.db: the id of the ledger this data_dir has (`spend.ledger_id`; see the module
# docstring). Not `spend.db.*`, so that removing the database's files leaves it.
LEDGER_ID_SUFFIX = ".ledger_id"
RESET_HINT = ("to start a new ledger at $0 spent (the old files are kept as *.broken-*), run "
              "`meshnode run --reset-ledger`")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spend (
    node TEXT NOT NULL, scope TEXT NOT NULL, period TEXT NOT NULL, amount REAL NOT NULL,
    PRIMARY KEY (node, scope, period)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reservations (
    id INTEGER PRIMARY KEY, key TEXT, amount REAL NOT NULL,
    day TEXT NOT NULL, month TEXT NOT NULL, created REAL NOT NULL,
    served INTEGER NOT NULL DEFAULT 0
);
"""


@dataclass(frozen=True, slots=True)
class SpendLimits:
    """Daily and monthly limits in USD; None: no limit."""

    daily: float | None = None
    monthly: float | None = None


@dataclass(slots=True)
class Reservation:
    """An open hold on the budget, for one call."""

    id: int
    amount: float
    key: str | None
    day: str
    month: str
    served: bool = False  # for a peer's forwarded request: charged to the served: slots
    done: bool = field(default=False)


@dataclass(frozen=True, slots=True)
class LimitStatus:
    scope: str  # "*" or "key:NAME"
    period: str
    limit: float
    spent: float
    reserved: float

    @property
    def left(self) -> float:
        return max(0.0, self.limit - self.spent - self.reserved)


class BudgetLedger:
    def __init__(
        self,
        config: BudgetConfig,
        path: Path,
        node_id: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._path = path
        self._clock = clock
        self.node_id = node_id
        self.counters = SpendCounters(node_id)
        self._held: dict[tuple[str, str], float] = {}  # (scope, period) -> open reservations
        self._open: dict[int, Reservation] = {}
        self._db: sqlite3.Connection | None = None
        self._pruned_for: str | None = None
        self.recovered = 0  # reservations found open at start and charged in full

    # ------------------------------------------------------------------ lifetime
    def open(self, *, reset: bool = False) -> None:
        """Open (or create) the ledger and settle what a crash left open. Raises
        `StateFileError` when this data_dir had a ledger that is now missing, empty, another
        one or damaged; `reset` sets such files aside and starts a new ledger instead."""
        marker = self._path.with_name(self._path.stem + LEDGER_ID_SUFFIX)
        if reset:
            moved = set_aside(self._path)
            marker.unlink(missing_ok=True)
            if moved:
                log.warning("budget: --reset-ledger: the old ledger is kept as %s; spend "
                            "starts at $0", ", ".join(p.name for p in moved))
        expected = marker.read_text(encoding="utf-8").strip() if marker.exists() else None
        if self._path.exists() and self._path.stat().st_size == 0:
            raise StateFileError(self._path, "is empty (0 bytes): what was spent is gone",
                                 RESET_HINT)
        if expected is not None and not self._path.exists():
            raise StateFileError(
                self._path, f"is missing, but this data_dir had a ledger ({marker.name}: "
                f"{expected}): starting would forget what was spent", RESET_HINT)
        try:
            db = open_checked(self._path)
        except StateFileError as exc:
            raise StateFileError(exc.path, exc.problem, RESET_HINT) from None
        try:
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(reservations)")}
            if "served" not in columns:  # a spend.db from before served spend
                db.execute(
                    "ALTER TABLE reservations ADD COLUMN served INTEGER NOT NULL DEFAULT 0")
            row = db.execute("SELECT value FROM meta WHERE key = 'ledger_id'").fetchone()
        except sqlite3.DatabaseError as exc:
            db.close()
            raise StateFileError(self._path, f"cannot be read ({exc})", RESET_HINT) from None
        stored = row[0] if row else None
        if expected is not None and stored != expected:
            db.close()
            raise StateFileError(
                self._path, f"is not this data_dir's ledger (its id is {stored or 'missing'}, "
                f"{marker.name} says {expected})", RESET_HINT)
        if stored is None:
            stored = uuid.uuid4().hex
            db.execute("INSERT INTO meta (key, value) VALUES ('ledger_id', ?)", (stored,))
        if expected is None:
            _write_atomically(marker, stored + "\n")
        self._db = db
        rows = db.execute("SELECT node, scope, period, amount FROM spend").fetchall()
        self.counters.merge(CounterEntry(n, s, p, float(a)) for n, s, p, a in rows)
        self._recover()
        self._maybe_prune(periods_at(self._clock()))

    def close(self) -> None:
        if self._db is not None:
            # Fold the log into the database: after a clean stop there is no log to damage.
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()
            self._db = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the budget ledger is not open")
        return self._db

    def _recover(self) -> None:
        db = self._conn()
        rows = db.execute(
            "SELECT id, key, amount, day, month, served FROM reservations").fetchall()
        if not rows:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            for rid, key, amount, day, month, served in rows:
                self._charge(key, float(amount), day, month, bool(served))
                db.execute("DELETE FROM reservations WHERE id = ?", (rid,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.recovered = len(rows)
        log.warning(
            "budget: %d reservation(s) were open when the node stopped; charged in full",
            len(rows),
        )

    # ------------------------------------------------------------------ limits
    def _committed(self, scope: str, period: str) -> float:
        mine = self.counters.own(scope, period) + self.counters.own(served_scope(scope), period)
        if self._config.scope == "mesh":
            return max(self.counters.total(scope, period), mine)
        return mine

    def _checks(
        self, key: str | None, key_limits: SpendLimits | None, p: Periods
    ) -> list[tuple[str, str, float, float]]:
        """(scope, period, limit, seconds left in the period) for every limit that applies."""
        out: list[tuple[str, str, float, float]] = []
        c = self._config
        if c.daily_limit is not None:
            out.append((GLOBAL_SCOPE, p.day, c.daily_limit, p.day_left_s))
        if c.monthly_limit is not None:
            out.append((GLOBAL_SCOPE, p.month, c.monthly_limit, p.month_left_s))
        if key is not None and key_limits is not None:
            scope = key_scope(key)
            if key_limits.daily is not None:
                out.append((scope, p.day, key_limits.daily, p.day_left_s))
            if key_limits.monthly is not None:
                out.append((scope, p.month, key_limits.monthly, p.month_left_s))
        return out

    def reserve(
        self, amount: float, key: str | None = None, key_limits: SpendLimits | None = None,
        *, served: bool = False,
    ) -> Reservation:
        """Hold `amount` USD against every applicable limit, or raise `BudgetExceeded`.
        `served`: for a peer's forwarded request (charged to the served: slots).

        Synchronous on purpose: the check and the hold happen with no await in between.
        """
        if not amount >= 0:
            raise ValueError("a reservation must be >= 0")
        p = periods_at(self._clock())
        self._maybe_prune(p)
        for scope, period, limit, left_s in self._checks(key, key_limits, p):
            committed = self._committed(scope, period)
            held = self._held.get((scope, period), 0.0)
            if committed + held + amount > limit + EPSILON:
                raise _exceeded(scope, period, limit, committed, held, left_s)
        cur = self._conn().execute(
            "INSERT INTO reservations (key, amount, day, month, created, served) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (key, amount, p.day, p.month, self._clock(), int(served)),
        )
        rid = cur.lastrowid
        assert rid is not None
        res = Reservation(rid, amount, key, p.day, p.month, served)
        self._open[rid] = res
        self._hold(res, +1.0)
        return res

    def _hold(self, res: Reservation, sign: float) -> None:
        for scope in self._scopes(res.key):
            for period in (res.day, res.month):
                k = (scope, period)
                value = self._held.get(k, 0.0) + sign * res.amount
                if value <= EPSILON:
                    self._held.pop(k, None)
                else:
                    self._held[k] = value

    @staticmethod
    def _scopes(key: str | None) -> tuple[str, ...]:
        return (GLOBAL_SCOPE,) if key is None else (GLOBAL_SCOPE, key_scope(key))

    def settle(self, res: Reservation, cost: float) -> None:
        """Replace the hold by the real cost (which may be below or, rarely, above it)."""
        if res.done:
            return
        cost = max(0.0, cost) if cost == cost else res.amount  # NaN: charge the hold
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM reservations WHERE id = ?", (res.id,))
            self._charge(res.key, cost, res.day, res.month, res.served)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._finish(res)

    def release(self, res: Reservation) -> None:
        """Drop the hold: the call failed and cost nothing."""
        if res.done:
            return
        self._conn().execute("DELETE FROM reservations WHERE id = ?", (res.id,))
        self._finish(res)

    def _finish(self, res: Reservation) -> None:
        res.done = True
        self._open.pop(res.id, None)
        self._hold(res, -1.0)

    def _charge(self, key: str | None, cost: float, day: str, month: str,
                served: bool = False) -> None:
        """Grow this node's slots and persist them (inside the caller's transaction)."""
        if cost <= 0:
            return
        rows = []
        for limit_scope in self._scopes(key):
            scope = served_scope(limit_scope) if served else limit_scope
            for period in (day, month):
                entry = self.counters.add(scope, period, cost)
                rows.append((entry.node, entry.scope, entry.period, entry.amount))
        self._conn().executemany(
            "INSERT INTO spend (node, scope, period, amount) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (node, scope, period) DO UPDATE SET amount = excluded.amount",
            rows,
        )

    # ------------------------------------------------------------------ gossip
    def export_counters(self) -> list[CounterEntry]:
        """Every slot of the current day and month (own and learned), for gossip."""
        p = periods_at(self._clock())
        return self.counters.entries((p.day, p.month))

    def merge_counters(self, entries: Iterable[CounterEntry]) -> int:
        """Merge gossiped slots (slot-wise max) and persist the ones that grew; returns how many
        grew. A slot of this node's own that comes back larger (data_dir was wiped) is adopted:
        the next charges grow from it."""
        p = periods_at(self._clock())
        oldest = oldest_kept(self._clock())
        fresh = [e for e in entries if e.period >= oldest and e.period <= p.day]
        raised = self.counters.merge(fresh)
        if raised:
            self._conn().executemany(
                "INSERT INTO spend (node, scope, period, amount) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (node, scope, period) DO UPDATE SET amount = "
                "MAX(spend.amount, excluded.amount)",
                [(e.node, e.scope, e.period, e.amount) for e in raised],
            )
        return len(raised)

    # ------------------------------------------------------------------ reading
    def spent(self, scope: str = GLOBAL_SCOPE, period: str | None = None) -> float:
        """Settled spend of a scope in a period (today when None), as limits see it."""
        return self._committed(scope, period or periods_at(self._clock()).day)

    def reserved(self, scope: str = GLOBAL_SCOPE, period: str | None = None) -> float:
        return self._held.get((scope, period or periods_at(self._clock()).day), 0.0)

    @property
    def open_reservations(self) -> int:
        return len(self._open)

    def status(self, key: str | None = None, key_limits: SpendLimits | None = None) -> list[LimitStatus]:
        p = periods_at(self._clock())
        return [
            LimitStatus(scope, period, limit, self._committed(scope, period),
                        self._held.get((scope, period), 0.0))
            for scope, period, limit, _ in self._checks(key, key_limits, p)
        ]

    def summary(self) -> dict[str, Any]:
        """For /admin/stats: today's and this month's spend, limits and what is left."""
        p = periods_at(self._clock())
        day_spent = self._committed(GLOBAL_SCOPE, p.day)
        month_spent = self._committed(GLOBAL_SCOPE, p.month)
        c = self._config
        return {
            "scope": c.scope,
            "day": p.day,
            "month": p.month,
            "daily_limit": c.daily_limit,
            "monthly_limit": c.monthly_limit,
            "spent_today": round(day_spent, 8),
            "spent_this_month": round(month_spent, 8),
            "spent_today_this_node": round(self.counters.own(GLOBAL_SCOPE, p.day), 8),
            # What this node's providers spent today on requests peers forwarded to it.
            "served_today_this_node": round(
                self.counters.own(served_scope(GLOBAL_SCOPE), p.day), 8),
            "reserved": round(self._held.get((GLOBAL_SCOPE, p.day), 0.0), 8),
            "open_reservations": len(self._open),
            "left_today": None if c.daily_limit is None
            else round(max(0.0, c.daily_limit - day_spent), 8),
            "left_this_month": None if c.monthly_limit is None
            else round(max(0.0, c.monthly_limit - month_spent), 8),
        }

    def _maybe_prune(self, p: Periods) -> None:
        if self._pruned_for == p.day:
            return
        self._pruned_for = p.day
        oldest = oldest_kept(self._clock())
        self.counters.prune(oldest)
        self._conn().execute("DELETE FROM spend WHERE period < ?", (oldest,))


def _exceeded(
    scope: str, period: str, limit: float, committed: float, held: float, left_s: float
) -> BudgetExceeded:
    kind = "daily" if len(period) == 10 else "monthly"
    what = f"the {kind} budget" if scope == GLOBAL_SCOPE else f"the {kind} budget of API key '{scope[4:]}'"
    if committed + EPSILON >= limit:
        why = f"{what} of ${limit:.2f} is spent (${committed:.6f})"
    else:
        why = (
            f"{what} of ${limit:.2f} cannot cover this call's worst case "
            f"(${committed:.6f} spent, ${held:.6f} held by calls in flight)"
        )
    # Calls in flight may settle below their hold within a call's lifetime; otherwise nothing
    # frees up before the period rolls over.
    retry = IN_FLIGHT_RETRY_S if held > EPSILON and committed + EPSILON < limit else left_s
    return BudgetExceeded(
        f"Budget exceeded: {why}; only free providers may serve now", retry_after=retry
    )


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
