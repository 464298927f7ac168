"""`GET /admin/spend`: what each API key and each node spent today and this month.

A read-only view over the spend counters the ledger already keeps (`counters.SpendCounters`:
one slot per node, scope and period, merged over gossip), so with `scope: mesh` it shows every
node's share; with `scope: node` only the slots this node knows. Shape (docs/governance.md,
read by `meshctl spend` and the dashboard):

    {"node", "day", "month",
     "total": {"today", "this_month"},
     "nodes": [{"node", "today", "this_month"}],                       # global scope per node
     "keys": [{"key", "today", "this_month", "daily_limit", "monthly_limit",
               "left_today", "nodes": {node: {"today", "this_month"}}}]}

Amounts are USD rounded to 1e-8. It must not charge, reserve or merge anything.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from meshnode.governance.counters import GLOBAL_SCOPE, CounterEntry
from meshnode.governance.keys import KeyRecord

KEY_PREFIX = "key:"


def _r(value: float) -> float:
    return round(value, 8)


def spend_report(
    node_id: str, day: str, month: str, entries: Iterable[CounterEntry],
    keys: Iterable[KeyRecord],
) -> dict[str, Any]:
    nodes: dict[str, dict[str, float]] = {}
    per_key: dict[str, dict[str, dict[str, float]]] = {}
    for e in entries:
        field = "today" if e.period == day else "this_month" if e.period == month else None
        if field is None:
            continue
        if e.scope == GLOBAL_SCOPE:
            slot = nodes.setdefault(e.node, {"today": 0.0, "this_month": 0.0})
        elif e.scope.startswith(KEY_PREFIX):
            by_node = per_key.setdefault(e.scope[len(KEY_PREFIX):], {})
            slot = by_node.setdefault(e.node, {"today": 0.0, "this_month": 0.0})
        else:
            continue
        slot[field] += e.amount
    records = {r.name: r for r in keys}
    rows = []
    for name in sorted(set(per_key) | {n for n, r in records.items() if not r.revoked}):
        by_node = per_key.get(name, {})
        today = sum(v["today"] for v in by_node.values())
        month_total = sum(v["this_month"] for v in by_node.values())
        record = records.get(name)
        daily = record.daily_limit if record is not None else None
        rows.append({
            "key": name,
            "today": _r(today),
            "this_month": _r(month_total),
            "daily_limit": daily,
            "monthly_limit": record.monthly_limit if record is not None else None,
            "left_today": None if daily is None else _r(max(0.0, daily - today)),
            "nodes": {n: {"today": _r(v["today"]), "this_month": _r(v["this_month"])}
                      for n, v in sorted(by_node.items())},
        })
    node_rows: list[dict[str, Any]] = [
        {"node": n, "today": _r(v["today"]), "this_month": _r(v["this_month"])}
        for n, v in sorted(nodes.items())
    ]
    return {
        "node": node_id,
        "day": day,
        "month": month,
        "total": {"today": _r(sum(v["today"] for v in nodes.values())),
                  "this_month": _r(sum(v["this_month"] for v in nodes.values()))},
        "nodes": node_rows,
        "keys": rows,
    }
