from datetime import UTC, datetime

from meshnode.governance.periods import oldest_kept, periods_at


def ts(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


def test_day_and_month_ids_and_time_left() -> None:
    p = periods_at(ts(2025, 1, 31, 23, 59, 30))
    assert (p.day, p.month) == ("2025-01-31", "2025-01")
    assert p.day_left_s == 30
    assert p.month_left_s == 30


def test_rollover_at_utc_midnight_and_first_of_month() -> None:
    before = periods_at(ts(2025, 2, 28, 23, 59, 59))
    after = periods_at(ts(2025, 3, 1, 0, 0, 0))
    assert (before.day, before.month) == ("2025-02-28", "2025-02")
    assert (after.day, after.month) == ("2025-03-01", "2025-03")
    assert after.month_left_s == 31 * 86400


def test_december_rolls_into_next_year() -> None:
    p = periods_at(ts(2024, 12, 31, 12))
    assert p.month_left_s == 12 * 3600
    assert periods_at(ts(2025, 1, 1)).month == "2025-01"


def test_oldest_kept_keeps_previous_and_current_month() -> None:
    oldest = oldest_kept(ts(2025, 3, 15))
    assert oldest == "2025-02"
    assert "2025-02-01" >= oldest and "2025-02" >= oldest and "2025-03-15" >= oldest
    assert "2025-01-31" < oldest and "2025-01" < oldest
