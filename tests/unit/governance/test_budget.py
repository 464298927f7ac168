import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from meshnode.config import BudgetConfig
from meshnode.errors import BudgetExceeded
from meshnode.governance.budget import BudgetLedger, SpendLimits
from meshnode.governance.counters import CounterEntry


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def ts(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


def ledger(tmp_path: Path, clock: Clock, node: str = "a", **cfg: object) -> BudgetLedger:
    led = BudgetLedger(BudgetConfig(**cfg), tmp_path / f"{node}.db", node, clock=clock)
    led.open()
    return led


def test_reservations_count_against_the_limit_until_settled(tmp_path: Path) -> None:
    led = ledger(tmp_path, Clock(ts(2025, 1, 10, 12)), daily_limit=1.0)
    holds = [led.reserve(0.25) for _ in range(4)]
    with pytest.raises(BudgetExceeded) as info:
        led.reserve(0.01)
    assert info.value.retry_after == 1.0  # only calls in flight block it
    assert "held by calls in flight" in info.value.message
    led.settle(holds[0], 0.05)  # a cheaper real cost frees the difference
    led.reserve(0.2)
    led.release(holds[1])
    led.reserve(0.25)
    assert led.spent() == pytest.approx(0.05)


def test_spent_budget_refuses_until_the_day_rolls_over(tmp_path: Path) -> None:
    clock = Clock(ts(2025, 1, 10, 23, 0))
    led = ledger(tmp_path, clock, daily_limit=1.0, monthly_limit=10.0)
    led.settle(led.reserve(1.0), 1.0)
    with pytest.raises(BudgetExceeded) as info:
        led.reserve(0.001)
    assert info.value.retry_after == pytest.approx(3600)
    assert info.value.code == "budget_exceeded"
    clock.t = ts(2025, 1, 11, 0, 0, 1)
    led.settle(led.reserve(0.5), 0.5)
    assert led.spent() == pytest.approx(0.5)
    assert led.spent(period="2025-01") == pytest.approx(1.5)


def test_monthly_limit_holds_across_days_and_resets_on_the_first(tmp_path: Path) -> None:
    clock = Clock(ts(2025, 1, 30, 10))
    led = ledger(tmp_path, clock, monthly_limit=2.0)
    led.settle(led.reserve(1.5), 1.5)
    clock.t = ts(2025, 1, 31, 10)
    with pytest.raises(BudgetExceeded) as info:
        led.reserve(0.6)
    assert info.value.retry_after == pytest.approx(14 * 3600)
    clock.t = ts(2025, 2, 1, 0, 0)
    led.reserve(1.9)


def test_key_limits_apply_besides_the_global_one(tmp_path: Path) -> None:
    led = ledger(tmp_path, Clock(ts(2025, 1, 10)), daily_limit=100.0)
    limits = SpendLimits(daily=1.0)
    led.settle(led.reserve(0.9, "ci", limits), 0.9)
    with pytest.raises(BudgetExceeded) as info:
        led.reserve(0.2, "ci", limits)
    assert "API key 'ci'" in info.value.message
    led.reserve(0.2, "other", SpendLimits(daily=1.0))  # another key has its own
    led.reserve(0.2)  # no key: only the global limit
    assert led.spent("*") == pytest.approx(0.9)


def test_no_limits_records_spend_but_never_refuses(tmp_path: Path) -> None:
    led = ledger(tmp_path, Clock(ts(2025, 1, 10)))
    for _ in range(3):
        led.settle(led.reserve(1000.0), 1000.0)
    assert led.spent() == pytest.approx(3000.0)


def test_settle_twice_or_after_release_charges_once(tmp_path: Path) -> None:
    led = ledger(tmp_path, Clock(ts(2025, 1, 10)), daily_limit=1.0)
    r = led.reserve(0.5)
    led.settle(r, 0.3)
    led.settle(r, 0.3)
    led.release(r)
    assert led.spent() == pytest.approx(0.3)
    assert led.reserved() == 0.0


def test_spend_survives_restart_and_open_reservations_are_charged_in_full(
    tmp_path: Path,
) -> None:
    clock = Clock(ts(2025, 1, 10, 23, 59))
    led = ledger(tmp_path, clock, daily_limit=1.0)
    led.settle(led.reserve(0.2), 0.2)
    led.reserve(0.3)
    led.reserve(0.1)
    # No close(): the process dies with two reservations open.
    clock.t = ts(2025, 1, 11, 0, 1)  # it restarts after midnight
    again = ledger(tmp_path, clock, daily_limit=1.0)
    assert again.recovered == 2
    assert again.spent(period="2025-01-10") == pytest.approx(0.6)  # charged where made
    assert again.spent(period="2025-01") == pytest.approx(0.6)
    assert again.spent() == 0.0  # the new day starts empty
    assert again.open_reservations == 0
    third = ledger(tmp_path, clock, daily_limit=1.0)
    assert third.recovered == 0  # charged exactly once
    assert third.spent(period="2025-01") == pytest.approx(0.6)


def test_ledger_is_sqlite_wal(tmp_path: Path) -> None:
    ledger(tmp_path, Clock(ts(2025, 1, 10)))
    mode = sqlite3.connect(tmp_path / "a.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_mesh_scope_counts_peers_spend_node_scope_does_not(tmp_path: Path) -> None:
    clock = Clock(ts(2025, 1, 10))
    a = ledger(tmp_path, clock, "a", daily_limit=1.0, scope="mesh")
    b = ledger(tmp_path, clock, "b", daily_limit=1.0, scope="mesh")
    n = ledger(tmp_path, clock, "n", daily_limit=1.0, scope="node")
    b.settle(b.reserve(0.7), 0.7)
    assert a.merge_counters(b.export_counters()) == 2  # day and month slots
    assert a.merge_counters(b.export_counters()) == 0
    assert a.spent() == pytest.approx(0.7)
    with pytest.raises(BudgetExceeded):
        a.reserve(0.5)
    n.merge_counters(b.export_counters())
    n.reserve(0.9)  # node scope: only its own spend counts
    # Learned slots persist: a restart does not forget the mesh total.
    a2 = ledger(tmp_path, clock, "a", daily_limit=1.0, scope="mesh")
    assert a2.spent() == pytest.approx(0.7)


def test_own_slot_coming_back_larger_is_adopted(tmp_path: Path) -> None:
    clock = Clock(ts(2025, 1, 10))
    a = ledger(tmp_path, clock, "a", scope="mesh")
    a.merge_counters([CounterEntry("a", "*", "2025-01-10", 5.0)])
    a.settle(a.reserve(1.0), 1.0)
    assert a.counters.own("*", "2025-01-10") == pytest.approx(6.0)


def test_merge_ignores_far_past_and_future_periods(tmp_path: Path) -> None:
    clock = Clock(ts(2025, 3, 10))
    a = ledger(tmp_path, clock, "a")
    assert a.merge_counters([
        CounterEntry("b", "*", "2024-01-01", 1.0),
        CounterEntry("b", "*", "2025-03-11", 1.0),
        CounterEntry("b", "*", "2025-02-27", 1.0),
    ]) == 1
