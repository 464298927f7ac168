"""Per-candidate statistics and the cooldown breaker.

The router keeps one `CandidateStats` per (provider[:node], model). They feed the strategies
(latency, error rate, in-flight), `/admin/stats`, and gossip. The breaker cools a candidate down
after K consecutive failures (or at once on an upstream 429, for its Retry-After) and lets one
probe through when the cooldown ends; a failed probe doubles the cooldown up to a cap.

Everything takes the time as an argument (`now`, monotonic seconds): no clock is read here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from meshnode.config import CooldownConfig
from meshnode.types import Usage

EWMA_ALPHA = 0.2
SAMPLES = 512  # recent latencies kept for p50/p95
ERROR_WINDOW = 50  # recent outcomes kept for the error rate


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


@dataclass(slots=True)
class CandidateStats:
    provider: str
    model: str
    requests: int = 0
    errors: int = 0
    in_flight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    latency_ewma_ms: float | None = None
    ttft_ewma_ms: float | None = None
    consecutive_failures: int = 0
    cooldown_until: float = 0.0
    cooldown_s: float = 0.0
    last_error: str | None = None
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    ttfts: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    outcomes: deque[bool] = field(default_factory=lambda: deque(maxlen=ERROR_WINDOW))

    # ------------------------------------------------------------------ recording
    def record_success(self, latency_ms: float, usage: Usage, cost: float) -> None:
        self.requests += 1
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        self.cost += cost
        self.consecutive_failures = 0
        self.cooldown_s = 0.0
        self.cooldown_until = 0.0
        self.outcomes.append(True)
        self.latencies.append(latency_ms)
        self.latency_ewma_ms = (
            latency_ms
            if self.latency_ewma_ms is None
            else self.latency_ewma_ms + EWMA_ALPHA * (latency_ms - self.latency_ewma_ms)
        )

    def record_ttft(self, ttft_ms: float) -> None:
        self.ttfts.append(ttft_ms)
        self.ttft_ewma_ms = (
            ttft_ms
            if self.ttft_ewma_ms is None
            else self.ttft_ewma_ms + EWMA_ALPHA * (ttft_ms - self.ttft_ewma_ms)
        )

    def record_failure(
        self,
        code: str,
        now: float,
        policy: CooldownConfig,
        retry_after: float | None = None,
        counts_against: bool = True,
    ) -> None:
        """A failed attempt. `counts_against` is False for failures that say nothing about the
        candidate's health (the client's bad request, a full local queue)."""
        self.requests += 1
        self.errors += 1
        self.last_error = code
        if not counts_against:
            return
        self.outcomes.append(False)
        self.consecutive_failures += 1
        if retry_after is not None:
            self._cool(now, min(max(retry_after, 0.0), policy.max_retry_after_s))
        elif self.consecutive_failures >= policy.failures:
            nxt = policy.seconds if self.cooldown_s <= 0 else self.cooldown_s * 2
            self._cool(now, min(nxt, policy.max_seconds))

    def _cool(self, now: float, seconds: float) -> None:
        self.cooldown_s = seconds
        self.cooldown_until = max(self.cooldown_until, now + seconds)

    # ------------------------------------------------------------------ reading
    def cooled_down(self, now: float) -> bool:
        return now < self.cooldown_until

    @property
    def error_rate(self) -> float:
        if not self.outcomes:
            return 0.0
        return self.outcomes.count(False) / len(self.outcomes)

    def snapshot(self, now: float) -> dict[str, Any]:
        lat = sorted(self.latencies)
        ttft = sorted(self.ttfts)
        return {
            "provider": self.provider,
            "model": self.model,
            "requests": self.requests,
            "errors": self.errors,
            "in_flight": self.in_flight,
            "latency_ms": {
                "p50": round(_percentile(lat, 0.5), 3),
                "p95": round(_percentile(lat, 0.95), 3),
                "ewma": None if self.latency_ewma_ms is None else round(self.latency_ewma_ms, 3),
            },
            "ttft_ms": {
                "p50": round(_percentile(ttft, 0.5), 3),
                "p95": round(_percentile(ttft, 0.95), 3),
                "ewma": None if self.ttft_ewma_ms is None else round(self.ttft_ewma_ms, 3),
            },
            "tokens": {
                "prompt": self.prompt_tokens,
                "completion": self.completion_tokens,
                "total": self.prompt_tokens + self.completion_tokens,
            },
            "cost": round(self.cost, 8),
            "error_rate": round(self.error_rate, 4),
            "consecutive_failures": self.consecutive_failures,
            "cooldown_s_left": round(max(0.0, self.cooldown_until - now), 3),
            "last_error": self.last_error,
        }
