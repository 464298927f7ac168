"""`spend_report`: per key and per node, today and this month, from the ledger's counters."""

from __future__ import annotations

from meshnode.governance.counters import GLOBAL_SCOPE, CounterEntry, key_scope
from meshnode.governance.keys import KeyRecord
from meshnode.governance.spend_report import spend_report

DAY, MONTH = "2026-12-01", "2026-12"


def test_groups_by_key_and_node_and_leaves_other_periods_out() -> None:
    entries = [
        CounterEntry("a", GLOBAL_SCOPE, DAY, 1.0), CounterEntry("a", GLOBAL_SCOPE, MONTH, 3.0),
        CounterEntry("b", GLOBAL_SCOPE, DAY, 0.5), CounterEntry("b", GLOBAL_SCOPE, MONTH, 0.5),
        CounterEntry("a", key_scope("ci"), DAY, 0.75), CounterEntry("b", key_scope("ci"), DAY, 0.25),
        CounterEntry("a", key_scope("ci"), MONTH, 2.0),
        CounterEntry("a", GLOBAL_SCOPE, "2026-11-30", 9.0),  # yesterday: not shown
    ]
    keys = [KeyRecord(name="ci", key_sha256="0" * 64, daily_limit=2.0),
            KeyRecord(name="idle", key_sha256="1" * 64)]
    report = spend_report("a", DAY, MONTH, entries, keys)
    assert report["total"] == {"today": 1.5, "this_month": 3.5}
    assert report["nodes"] == [{"node": "a", "today": 1.0, "this_month": 3.0},
                               {"node": "b", "today": 0.5, "this_month": 0.5}]
    ci, idle = report["keys"]
    assert ci["key"] == "ci" and ci["today"] == 1.0 and ci["this_month"] == 2.0
    assert ci["left_today"] == 1.0 and ci["daily_limit"] == 2.0
    assert ci["nodes"] == {"a": {"today": 0.75, "this_month": 2.0},
                           "b": {"today": 0.25, "this_month": 0.0}}
    assert idle == {"key": "idle", "today": 0.0, "this_month": 0.0, "daily_limit": None,
                    "monthly_limit": None, "left_today": None, "nodes": {}}
