import pytest

from meshnode.governance.ratelimit import RateLimiter, TokenBucket, format_reset


class Clock:
    t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_bucket_bursts_capacity_then_refills_at_rate() -> None:
    b = TokenBucket(60, 60, now=0.0)
    assert all(b.try_take(1, 0.0) for _ in range(60))
    assert not b.try_take(1, 0.0)
    assert b.seconds_until(1, 0.0) == pytest.approx(1.0)
    assert b.try_take(1, 1.0)
    assert b.level(1000.0) == 60  # never above capacity


def test_rpm_limit_admits_exactly_the_burst_and_refills() -> None:
    clock = Clock()
    rl = RateLimiter(clock)
    decisions = [rl.acquire("ci", 10, None) for _ in range(20)]
    assert sum(d.allowed for d in decisions) == 10
    refused = decisions[-1]
    assert not refused.allowed and refused.limited_by == "requests"
    assert refused.retry_after_s == pytest.approx(6.0)
    assert refused.headers() == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1m0s",
    }
    assert decisions[0].headers()["x-ratelimit-remaining-requests"] == "9"
    clock.t += 6.0
    assert rl.acquire("ci", 10, None).allowed
    assert not rl.acquire("ci", 10, None).allowed
    assert rl.acquire("other", 10, None).allowed  # per key


def test_tokens_are_charged_after_the_fact_and_block_when_in_debt() -> None:
    clock = Clock()
    rl = RateLimiter(clock)
    first = rl.acquire("ci", None, 600)
    assert first.allowed and first.headers()["x-ratelimit-remaining-tokens"] == "600"
    rl.charge_tokens("ci", 600, 900)  # one big answer: 300 in debt
    refused = rl.acquire("ci", None, 600)
    assert not refused.allowed and refused.limited_by == "tokens"
    assert refused.retry_after_s == pytest.approx(301 / 10)
    assert refused.headers()["x-ratelimit-remaining-tokens"] == "0"
    clock.t += 31
    assert rl.acquire("ci", None, 600).allowed


def test_token_refusal_does_not_spend_a_request() -> None:
    clock = Clock()
    rl = RateLimiter(clock)
    rl.charge_tokens("ci", 100, 101)
    assert not rl.acquire("ci", 5, 100).allowed
    clock.t += 6.0
    assert rl.acquire("ci", 5, 100).headers()["x-ratelimit-remaining-requests"] == "4"


def test_zero_limit_refuses_with_a_bounded_retry_after() -> None:
    d = RateLimiter(Clock()).acquire("off", 0, None)
    assert not d.allowed and d.retry_after_s == 60.0


def test_unlimited_key_has_no_headers() -> None:
    d = RateLimiter(Clock()).acquire("x", None, None)
    assert d.allowed and d.headers() == {}


def test_reset_format_is_openais() -> None:
    assert format_reset(0) == "0s"
    assert format_reset(0.02) == "20ms"
    assert format_reset(1.5) == "1.5s"
    assert format_reset(360) == "6m0s"
    assert format_reset(3725) == "1h2m5s"
