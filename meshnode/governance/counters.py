"""Mesh-wide spend as a grow-only counter CRDT (a G-counter), one per scope and period.

Each node owns one slot per (scope, period): only that node increments it, every node keeps the
largest value it has seen for every slot, and the total of a counter is the sum of its slots.
Merging is taking the slot-wise maximum, which is commutative, associative and idempotent, so
gossip may deliver entries late, twice or in any order and every node still converges on the
same totals. A scope is `*` (the global budget) or `key:NAME` (one API key's budget); a period
is a day (`2025-01-31`) or a month (`2025-01`).

Amounts are USD as floats; a slot only ever grows, so `max` is exact.
This module is pure: persistence is the ledger's business (`budget.py`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

GLOBAL_SCOPE = "*"


def key_scope(key_name: str) -> str:
    return "key:" + key_name


@dataclass(frozen=True, slots=True)
class CounterEntry:
    """One slot of one counter: what `node` has spent in `scope` during `period`."""

    node: str
    scope: str
    period: str
    amount: float

    def to_json(self) -> list[object]:
        return [self.node, self.scope, self.period, self.amount]

    @classmethod
    def from_json(cls, item: object) -> CounterEntry | None:
        """Parse one gossiped entry; None when it is malformed (a bad peer must not crash us)."""
        if not isinstance(item, (list, tuple)) or len(item) != 4:
            return None
        node, scope, period, amount = item
        if not (isinstance(node, str) and isinstance(scope, str) and isinstance(period, str)):
            return None
        if isinstance(amount, bool) or not isinstance(amount, (int, float)):
            return None
        if not amount >= 0 or amount == float("inf"):
            return None
        return cls(node, scope, period, float(amount))


class SpendCounters:
    """The slots this node knows, its own and its peers'."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._slots: dict[tuple[str, str, str], float] = {}
        # (scope, period) -> sum over nodes, kept incrementally: totals are read per request.
        self._totals: dict[tuple[str, str], float] = {}

    def add(self, scope: str, period: str, amount: float) -> CounterEntry:
        """Grow this node's own slot; returns the new slot value."""
        if amount < 0:
            raise ValueError("a grow-only counter cannot decrease")
        key = (self.node_id, scope, period)
        value = self._slots.get(key, 0.0) + amount
        self._slots[key] = value
        self._totals[(scope, period)] = self._totals.get((scope, period), 0.0) + amount
        return CounterEntry(self.node_id, scope, period, value)

    def merge(self, entries: Iterable[CounterEntry]) -> list[CounterEntry]:
        """Slot-wise maximum. Returns the entries that raised a slot (to persist them)."""
        raised: list[CounterEntry] = []
        for e in entries:
            key = (e.node, e.scope, e.period)
            old = self._slots.get(key, 0.0)
            if e.amount > old:
                self._slots[key] = e.amount
                tkey = (e.scope, e.period)
                self._totals[tkey] = self._totals.get(tkey, 0.0) + (e.amount - old)
                raised.append(e)
        return raised

    def total(self, scope: str, period: str) -> float:
        """Mesh-wide spend of a scope in a period (every node's slot)."""
        return self._totals.get((scope, period), 0.0)

    def own(self, scope: str, period: str) -> float:
        """This node's own slot."""
        return self._slots.get((self.node_id, scope, period), 0.0)

    def entries(self, periods: Iterable[str] | None = None) -> list[CounterEntry]:
        """Every slot (of the given periods only, when given)."""
        wanted = set(periods) if periods is not None else None
        return [
            CounterEntry(n, s, p, v)
            for (n, s, p), v in self._slots.items()
            if wanted is None or p in wanted
        ]

    def prune(self, oldest: str) -> None:
        """Forget periods that sort before `oldest` (see `periods.oldest_kept`)."""
        for key in [k for k in self._slots if k[2] < oldest]:
            del self._slots[key]
        for tkey in [k for k in self._totals if k[1] < oldest]:
            del self._totals[tkey]
