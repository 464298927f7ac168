"""Per-key rate limits: token buckets for requests per minute and tokens per minute.

A bucket of capacity `L` refills at `L / 60` per second and starts full: a key may burst `L`
requests at once, then goes on at `L` per minute. So over any window of `w` seconds this node
admits at most `L + L * w / 60` requests of one key (at most `2 L` in any one minute, `L` in a
burst). Limits are per node; docs/governance.md says what that means over N nodes.

Requests are taken when admitted. Tokens are not known until the answer: a request is admitted
while the key's token bucket is not empty, and its real usage (prompt + completion) is taken
after the answer (`charge_tokens`), which may drive the bucket below zero, so later requests
wait until it has refilled. The overshoot is at most one request's tokens per request in flight.

The decision carries the values of OpenAI's headers: `x-ratelimit-limit-requests`,
`-remaining-requests`, `-reset-requests` (time until the bucket is full again) and the `-tokens`
trio. Pure logic with an injected monotonic clock; nothing here knows about HTTP.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

# A key whose limit is 0 is refused; tell it to come back in a minute, not never.
MAX_RETRY_AFTER_S = 60.0


class TokenBucket:
    __slots__ = ("capacity", "rate", "_level", "_at")

    def __init__(self, capacity: float, per_minute: float, now: float) -> None:
        self.capacity = capacity
        self.rate = per_minute / 60.0  # per second
        self._level = capacity
        self._at = now

    def level(self, now: float) -> float:
        if now > self._at:
            self._level = min(self.capacity, self._level + (now - self._at) * self.rate)
            self._at = now
        return self._level

    def try_take(self, amount: float, now: float) -> bool:
        if self.level(now) >= amount:
            self._level -= amount
            return True
        return False

    def take(self, amount: float, now: float) -> None:
        """Take even into debt (usage known only after the fact)."""
        self.level(now)
        self._level -= amount

    def seconds_until(self, amount: float, now: float) -> float:
        missing = amount - self.level(now)
        if missing <= 0:
            return 0.0
        if self.rate <= 0 or amount > self.capacity:
            return MAX_RETRY_AFTER_S
        return missing / self.rate

    def seconds_to_full(self, now: float) -> float:
        return self.seconds_until(self.capacity, now)


def format_reset(seconds: float) -> str:
    """OpenAI's duration style: `20ms`, `1.5s`, `6m0s`."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 1000) / 1000:g}s"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    if minutes >= 60:
        hours, minutes = divmod(minutes, 60)
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s"


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    retry_after_s: float = 0.0
    limited_by: str | None = None  # "requests" or "tokens" when refused
    limit_requests: int | None = None
    remaining_requests: int = 0
    reset_requests_s: float = 0.0
    limit_tokens: int | None = None
    remaining_tokens: int = 0
    reset_tokens_s: float = 0.0

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.limit_requests is not None:
            out["x-ratelimit-limit-requests"] = str(self.limit_requests)
            out["x-ratelimit-remaining-requests"] = str(self.remaining_requests)
            out["x-ratelimit-reset-requests"] = format_reset(self.reset_requests_s)
        if self.limit_tokens is not None:
            out["x-ratelimit-limit-tokens"] = str(self.limit_tokens)
            out["x-ratelimit-remaining-tokens"] = str(self.remaining_tokens)
            out["x-ratelimit-reset-tokens"] = format_reset(self.reset_tokens_s)
        return out


UNLIMITED = RateDecision(allowed=True)


class RateLimiter:
    """The buckets of every key seen on this node, by key name."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}

    def _bucket(self, table: dict[str, TokenBucket], key: str, limit: int,
                now: float) -> TokenBucket:
        bucket = table.get(key)
        if bucket is None or bucket.capacity != limit:
            # New key, or its limit changed: start a bucket at the new size, full.
            bucket = table[key] = TokenBucket(limit, limit, now)
        return bucket

    def acquire(self, key: str, rpm: int | None, tpm: int | None) -> RateDecision:
        """Admit one request of `key` now, or say why not and for how long."""
        if rpm is None and tpm is None:
            return UNLIMITED
        now = self._clock()
        req = self._bucket(self._requests, key, rpm, now) if rpm is not None else None
        tok = self._bucket(self._tokens, key, tpm, now) if tpm is not None else None
        limited_by: str | None = None
        retry = 0.0
        if tok is not None and tok.level(now) < 1.0:
            limited_by, retry = "tokens", tok.seconds_until(1.0, now)
        elif req is not None and not req.try_take(1.0, now):
            limited_by, retry = "requests", req.seconds_until(1.0, now)
        return RateDecision(
            allowed=limited_by is None,
            retry_after_s=min(retry, MAX_RETRY_AFTER_S),
            limited_by=limited_by,
            limit_requests=rpm,
            remaining_requests=max(0, math.floor(req.level(now))) if req else 0,
            reset_requests_s=req.seconds_to_full(now) if req else 0.0,
            limit_tokens=tpm,
            remaining_tokens=max(0, math.floor(tok.level(now))) if tok else 0,
            reset_tokens_s=tok.seconds_to_full(now) if tok else 0.0,
        )

    def charge_tokens(self, key: str, tpm: int | None, tokens: int) -> None:
        """Take a finished request's real usage from the key's token bucket."""
        if tpm is None or tokens <= 0:
            return
        now = self._clock()
        self._bucket(self._tokens, key, tpm, now).take(tokens, now)

    def forget(self, key: str) -> None:
        self._requests.pop(key, None)
        self._tokens.pop(key, None)
