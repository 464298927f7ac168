"""Metrics, the history ring buffer and the last errors, through the real HTTP front end (a
real Router over scripted FakeProviders) and on their own."""

from __future__ import annotations

import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshnode.errors import UpstreamBadRequest, UpstreamUnavailable
from meshnode.observability.history import RequestHistory
from meshnode.observability.metrics import OTHER, BoundedLabels, Metrics
from meshnode.providers.fake import FakeProvider

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_failed_request_counts_its_attempts_by_outcome(
    api_client, caplog: pytest.LogCaptureFixture
) -> None:
    a = FakeProvider("a", models=["m"], cost_per_1k=0.01)
    b = FakeProvider("b", models=["m"], cost_per_1k=0.02)
    a.script(UpstreamUnavailable("down"))
    b.script(UpstreamBadRequest("upstream says no", param="messages"))
    client = await api_client([a, b], failover={"max_retries": 3})
    with caplog.at_level(logging.INFO, logger="meshnode.request"):
        resp = await client.post("/v1/chat/completions", json=CHAT,
                                 headers={"x-request-id": "req-failing-1"})
    assert resp.status == 400
    line = next(r for r in caplog.records if r.name == "meshnode.request")
    assert line.attempts == 2  # type: ignore[attr-defined]
    got = samples(await (await client.get("/metrics")).text())
    assert got[("meshnode_upstream_attempts_total",
                (("outcome", "retryable_error"), ("provider", "a")))] == 1
    assert got[("meshnode_upstream_attempts_total",
                (("outcome", "fatal_error"), ("provider", "b")))] == 1
    errors = (await (await client.get("/admin/history")).json())["errors"]
    assert errors[0]["request_id"] == "req-failing-1" and errors[0]["attempts"] == 2
    assert errors[0]["status"] == 400


async def test_breaker_opening_attempt_is_cooled_down(api_client) -> None:
    a = FakeProvider("a", models=["m"], cost_per_1k=0.01)
    b = FakeProvider("b", models=["m"], cost_per_1k=0.02)
    a.script(UpstreamUnavailable("down"))
    client = await api_client([a, b], failover={"cooldown": {"failures": 1}})
    assert (await client.post("/v1/chat/completions", json=CHAT)).status == 200
    got = samples(await (await client.get("/metrics")).text())
    assert got[("meshnode_upstream_attempts_total",
                (("outcome", "cooled_down"), ("provider", "a")))] == 1
    assert got[("meshnode_upstream_attempts_total", (("outcome", "ok"), ("provider", "b")))] == 1


async def test_history_counts_every_error(api_client) -> None:
    a = FakeProvider("a", models=["m"], cost_per_1k=0.01)
    a.script(*[UpstreamBadRequest("no")] * 5)
    client = await api_client([a])
    for _ in range(5):
        assert (await client.post("/v1/chat/completions", json=CHAT)).status == 400
    body = await (await client.get("/admin/history")).json()
    row = body["history"]["series"]["provider"]["a"]
    assert sum(row["requests"]) == 5 and sum(row["errors"]) == 5
    assert len(row["requests"]) == 90 and body["history"]["bucket_s"] == 10.0
    stats = (await (await client.get("/admin/stats")).json())["candidates"][0]
    # The dashboard shows errors / requests: 5 of 5 is 100 %, whatever the breaker counted.
    assert stats["requests"] == 5 and stats["errors"] == 5


def test_history_window_drops_old_buckets_and_computes_percentiles() -> None:
    h = RequestHistory(window_s=60, bucket_s=10)
    for i in range(10):
        h.record(provider="p", node="n1", error=i == 0, tokens=10, latency_ms=float(i + 1),
                 now=1000.0 + i)
    h.record(provider="p", node="n1", error=False, tokens=5, latency_ms=1.0, now=900.0)
    snap = h.snapshot(now=1009.5)
    row = snap["series"]["provider"]["p"]
    assert row["requests"][-1] == 10 and sum(row["requests"]) == 10  # t=900 is out of window
    assert row["errors"][-1] == 1
    assert row["p50_ms"][-1] in (5.0, 6.0) and row["p95_ms"][-1] == 10.0
    assert row["tokens_per_s"][-1] == pytest.approx(100 / 9.5, rel=1e-3)
    assert snap["series"]["node"]["n1"]["requests"][-1] == 10
    assert row["p50_ms"][0] is None


def test_label_values_are_bounded() -> None:
    bound = BoundedLabels(2)
    assert [bound(v) for v in ("a", "b", "c", "a")] == ["a", "b", OTHER, "a"]
    m = Metrics()
    for i in range(500):
        m.record_gossip(f"peer-{i}", 10, 20)
    peers = {s.labels["peer"] for f in text_string_to_metric_families(m.render().decode())
             if f.name == "meshnode_gossip_bytes" for s in f.samples}
    assert OTHER in peers and len(peers) <= 129


def test_budget_gauges_read_at_scrape_time() -> None:
    m = Metrics()
    state = {"enabled": True, "spent_today": 1.5, "spent_this_month": 3.0, "reserved": 0.25,
             "daily_limit": 5.0, "monthly_limit": None}
    m.budget_source = lambda: state
    got = samples(m.render().decode())
    assert got[("meshnode_budget_spent_usd", (("period", "day"),))] == 1.5
    assert got[("meshnode_budget_reserved_usd", ())] == 0.25
    assert got[("meshnode_budget_limit_usd", (("period", "day"),))] == 5.0
    assert ("meshnode_budget_limit_usd", (("period", "month"),)) not in got
    state["spent_today"] = 2.0
    assert samples(m.render().decode())[("meshnode_budget_spent_usd", (("period", "day"),))] == 2
