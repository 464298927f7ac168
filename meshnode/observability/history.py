"""The node's recent history for the dashboard: a ring buffer of the last 15 minutes and the
last errors.

`RequestHistory` keeps one bucket per `bucket_s` seconds (90 of 10 s by default), each holding,
per provider and per serving node: requests, errors, tokens and a bounded sample of latencies
(for p50/p95). A bucket older than the window is reused for the current one, so memory is fixed
whatever the traffic. `RecentErrors` keeps the last 20 failed requests with their request ids.

Both are fed from the same two calls that feed Prometheus (`Metrics.record_served` and
`record_failed`) and read by `GET /admin/history` (the dashboard's charts). They take the time
as an argument; nothing here reads a clock except the defaults of the record calls.

Series names are provider names and node ids the node itself resolved (never client input), and
at most `MAX_SERIES` of each are kept per bucket (the rest fold into `_other`).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from meshnode.routing.stats import _percentile

WINDOW_S = 900.0  # 15 minutes
BUCKET_S = 10.0
LATENCY_SAMPLES = 256  # per series per bucket: enough for a p95, bounded under load
MAX_SERIES = 64
OTHER = "_other"
RECENT_ERRORS = 20


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The router's percentile (one definition), None for an empty bucket."""
    return _percentile(sorted_values, q) if sorted_values else None


@dataclass(slots=True)
class _Series:
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def add(self, error: bool, tokens: int, latency_ms: float) -> None:
        self.requests += 1
        self.errors += error
        self.tokens += tokens
        if len(self.latencies_ms) < LATENCY_SAMPLES:
            self.latencies_ms.append(latency_ms)
        else:
            # Keep the sample spread over the bucket: overwrite round-robin.
            self.latencies_ms[self.requests % LATENCY_SAMPLES] = latency_ms


@dataclass(slots=True)
class _Bucket:
    start: float  # wall-clock seconds, a multiple of bucket_s
    by: dict[str, dict[str, _Series]] = field(
        default_factory=lambda: {"provider": {}, "node": {}}
    )


class RequestHistory:
    """Requests, errors, latency and tokens per provider and per node, in fixed buckets."""

    def __init__(self, window_s: float = WINDOW_S, bucket_s: float = BUCKET_S) -> None:
        self.bucket_s = bucket_s
        self.size = max(1, int(round(window_s / bucket_s)))
        self._ring: list[_Bucket | None] = [None] * self.size
        # The bucket being filled and when it ends: the per-request path checks one float.
        self._current: _Bucket | None = None
        self._current_end = float("-inf")

    def _bucket(self, now: float) -> _Bucket:
        current = self._current
        if current is not None and current.start <= now < self._current_end:
            return current
        start = now - now % self.bucket_s
        index = int(start // self.bucket_s) % self.size
        bucket = self._ring[index]
        if bucket is None or bucket.start != start:
            bucket = self._ring[index] = _Bucket(start)
        if now >= self._current_end:  # never step back to an older bucket (a test's clock)
            self._current, self._current_end = bucket, start + self.bucket_s
        return bucket

    def record(
        self, *, provider: str, node: str | None, error: bool, tokens: int, latency_ms: float,
        now: float | None = None,
    ) -> None:
        if now is None:
            now = time.time()
        by = self._bucket(now).by
        table = by["provider"]
        series = table.get(provider)
        if series is None:
            series = self._new_series(table, provider)
        series.add(error, tokens, latency_ms)
        if node is not None:
            table = by["node"]
            series = table.get(node)
            if series is None:
                series = self._new_series(table, node)
            series.add(error, tokens, latency_ms)

    @staticmethod
    def _new_series(table: dict[str, _Series], name: str) -> _Series:
        if len(table) >= MAX_SERIES:
            name = OTHER
        found = table.get(name)
        if found is None:
            found = table[name] = _Series()
        return found

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """`{"bucket_s", "window_s", "buckets": [start, ...], "series": {"provider": {name:
        {"requests": [...], "errors": [...], "p50_ms": [...], "p95_ms": [...],
        "tokens_per_s": [...]}}, "node": {...}}}`, oldest bucket first, one value per bucket
        (latency None where a bucket had no request)."""
        now = time.time() if now is None else now
        current = now - now % self.bucket_s
        starts = [current - self.bucket_s * i for i in range(self.size - 1, -1, -1)]
        live: dict[float, _Bucket] = {
            b.start: b for b in self._ring if b is not None and b.start >= starts[0]
        }
        names: dict[str, set[str]] = {"provider": set(), "node": set()}
        for b in live.values():
            for dimension, table in b.by.items():
                names[dimension].update(table)
        series: dict[str, dict[str, dict[str, list[Any]]]] = {"provider": {}, "node": {}}
        for dimension, found in names.items():
            for name in sorted(found):
                row: dict[str, list[Any]] = {
                    "requests": [], "errors": [], "p50_ms": [], "p95_ms": [], "tokens_per_s": [],
                }
                for start in starts:
                    bucket = live.get(start)
                    found_s = bucket.by[dimension].get(name) if bucket is not None else None
                    s = found_s if found_s is not None else _Series()
                    lat = sorted(s.latencies_ms)
                    # The bucket in progress has lasted less than bucket_s.
                    span = max(1.0, now - start) if start == current else self.bucket_s
                    row["requests"].append(s.requests)
                    row["errors"].append(s.errors)
                    p50, p95 = percentile(lat, 0.5), percentile(lat, 0.95)
                    row["p50_ms"].append(None if p50 is None else round(p50, 3))
                    row["p95_ms"].append(None if p95 is None else round(p95, 3))
                    row["tokens_per_s"].append(round(s.tokens / span, 3))
                series[dimension][name] = row
        return {
            "bucket_s": self.bucket_s,
            "window_s": self.bucket_s * self.size,
            "buckets": [round(s, 3) for s in starts],
            "series": series,
        }


@dataclass(frozen=True, slots=True)
class ErrorRecord:
    at: float  # wall clock
    request_id: str
    status: int
    code: str
    model: str | None
    provider: str | None
    key: str | None
    attempts: int

    def to_json(self) -> dict[str, Any]:
        return {
            "at": round(self.at, 3), "request_id": self.request_id, "status": self.status,
            "code": self.code, "model": self.model, "provider": self.provider, "key": self.key,
            "attempts": self.attempts,
        }


class RecentErrors:
    """The last `size` failed requests, newest first when read."""

    def __init__(self, size: int = RECENT_ERRORS) -> None:
        self._items: deque[ErrorRecord] = deque(maxlen=size)

    def add(self, record: ErrorRecord) -> None:
        self._items.append(record)

    def to_json(self) -> list[dict[str, Any]]:
        return [r.to_json() for r in reversed(self._items)]
