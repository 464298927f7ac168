"""RSS samples of the soak's node processes, read from /proc (no psutil).

A node's samples are kept per process (a restarted node is a new series). "Grew without bound"
is judged on a series long enough to have a steady state: after the first fifth (start-up,
caches and pools filling), the median of the last quarter may not exceed the median of the
second fifth by more than `GROWTH_FACTOR` and `GROWTH_SLACK_MIB` together.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

GROWTH_FACTOR = 1.3
GROWTH_SLACK_MIB = 32.0
MIN_SAMPLES = 10


def rss_mib(pid: int) -> float | None:
    """Resident set of one process in MiB, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        return None
    return None


@dataclass
class Series:
    node: str
    pid: int
    samples: list[tuple[float, float]] = field(default_factory=list)  # (t, MiB)

    def verdict(self) -> tuple[float, float, float, bool | None]:
        """(first MiB, steady MiB, last-quarter MiB, bounded?); bounded is None when the
        series is too short to judge."""
        values = [v for _, v in self.samples]
        if len(values) < MIN_SAMPLES:
            first = values[0] if values else 0.0
            last = values[-1] if values else 0.0
            return first, first, last, None
        n = len(values)
        steady = statistics.median(values[n // 5: 2 * n // 5] or values)
        tail = statistics.median(values[3 * n // 4:])
        return values[0], steady, tail, tail <= steady * GROWTH_FACTOR + GROWTH_SLACK_MIB


class RssSampler:
    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.series: list[Series] = []
        self._current: dict[str, Series] = {}
        self._t0 = time.monotonic()

    def sample(self, pids: dict[str, int]) -> None:
        now = round(time.monotonic() - self._t0, 1)
        for node, pid in pids.items():
            series = self._current.get(node)
            if series is None or series.pid != pid:
                series = Series(node, pid)
                self._current[node] = series
                self.series.append(series)
            mib = rss_mib(pid)
            if mib is not None:
                series.samples.append((now, mib))

    async def run(self, pids: Callable[[], dict[str, int]], stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.sample(pids())
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
            except TimeoutError:
                pass
