"""The lock-free metrics read exactly as prometheus-client's own would: the same operations on
a `LoopCounter` / `LoopHistogram` / `LoopGauge` and on prometheus-client's `Counter` /
`Histogram` / `Gauge` give the same exposition (only `_created` timestamps differ)."""

from __future__ import annotations

import math
import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from meshnode.observability.loopmetrics import LoopCounter, LoopGauge, LoopHistogram

CREATED = re.compile(r"(?m)^(\w+_created(?:\{[^}]*\})?) \S+$")
BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0)


def exposition(registry: CollectorRegistry) -> str:
    return CREATED.sub(r"\1 T", generate_latest(registry).decode())


def exercise(counter: type, histogram: type, gauge: type, registry: CollectorRegistry) -> None:
    requests = counter("t_requests", "Requests answered", ("provider", "status"),
                       registry=registry)
    plain = counter("t_plain_total", "A counter without labels", registry=registry)
    latency = histogram("t_latency_seconds", "Latency", ("provider",), buckets=BUCKETS,
                        registry=registry)
    bare = histogram("t_bare_seconds", "A histogram without labels", registry=registry)
    entries = gauge("t_entries", "Entries kept", registry=registry)
    counter("t_unused", "Labelled, never touched", ("x",), registry=registry)
    requests.labels("b", "200").inc()
    requests.labels("a", "500").inc(2)
    requests.labels("b", "200").inc(0.5)
    plain.inc()
    for value in (0.0, 0.001, 0.0010001, 0.05, 3.0, 10.0, 11.0, math.inf):
        latency.labels("a").observe(value)
    latency.labels("b").observe(0.2)
    bare.observe(0.3)
    entries.set(7)


def test_exposition_matches_prometheus_client() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    exercise(LoopCounter, LoopHistogram, LoopGauge, ours)
    exercise(Counter, Histogram, Gauge, theirs)
    assert exposition(ours) == exposition(theirs)
    assert 't_requests_total{provider="b",status="200"} 1.5' in exposition(ours)


def test_a_label_given_as_a_number_is_the_same_series_as_its_string() -> None:
    registry = CollectorRegistry()
    requests = LoopCounter("t_requests", "Requests", ("status",), registry=registry)
    requests.labels(200).inc()
    requests.labels("200").inc()
    assert requests.labels(200) is requests.labels("200")
    assert exposition(registry).count("t_requests_total{") == 1
    assert 't_requests_total{status="200"} 2.0' in exposition(registry)


def test_misuse_is_refused_as_prometheus_client_refuses_it() -> None:
    registry = CollectorRegistry()
    requests = LoopCounter("t_requests", "Requests", ("a", "b"), registry=registry)
    with pytest.raises(ValueError):
        requests.labels("only-one")
    with pytest.raises(ValueError):
        requests.labels("x", "y").inc(-1)
    with pytest.raises(ValueError):
        requests.inc()
    with pytest.raises(ValueError):  # the registry sees the name taken
        Counter("t_requests", "again", registry=registry)


def test_nan_counts_in_no_bucket() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    LoopHistogram("t_h", "h", buckets=BUCKETS, registry=ours).observe(math.nan)
    Histogram("t_h", "h", buckets=BUCKETS, registry=theirs).observe(math.nan)
    assert exposition(ours) == exposition(theirs)
