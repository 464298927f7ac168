"""Budget periods: the UTC day and the UTC month a moment belongs to, and when each ends.

Periods are named by strings that sort in time order (`2025-01-31`, `2025-01`), so a period id
is a stable key in the ledger, in gossip and across restarts. Pure functions of a UNIX time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta


@dataclass(frozen=True, slots=True)
class Periods:
    """The day and month a moment falls in, and the seconds left in each."""

    day: str
    month: str
    day_left_s: float
    month_left_s: float


def periods_at(now: float) -> Periods:
    t = datetime.fromtimestamp(now, tz=UTC)
    day_start = t.replace(hour=0, minute=0, second=0, microsecond=0)
    next_day = day_start + timedelta(days=1)
    month_start = day_start.replace(day=1)
    next_month = (month_start + timedelta(days=32)).replace(day=1)
    return Periods(
        day=day_start.strftime("%Y-%m-%d"),
        month=month_start.strftime("%Y-%m"),
        day_left_s=next_day.timestamp() - now,
        month_left_s=next_month.timestamp() - now,
    )


def is_day(period: str) -> bool:
    return len(period) == 10


def oldest_kept(now: float) -> str:
    """Periods older than this id (the first day of the previous month) may be pruned: the
    current month and day always sort after it."""
    t = datetime.fromtimestamp(now, tz=UTC).replace(day=1)
    previous = (t - timedelta(days=1)).replace(day=1)
    return previous.strftime("%Y-%m")
