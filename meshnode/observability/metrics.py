"""Prometheus metrics, defined once, in their own registry (so tests and several apps in one
process never collide).

Per provider and model: requests (by status), errors (by code), latency and time-to-first-token
histograms, tokens (prompt/completion), cost in USD, and upstream attempts by outcome. Labelled
children are cached so the hot path does one dict lookup per series, not prometheus-client's
label resolution.

Label values are only ever provider names, public model names that this node serves, status
codes and error codes: never a key, a header, or a model name a client made up (those are
reported as `_unknown`, which also bounds the cardinality).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from meshnode.routing.outcome import Served

UNKNOWN = "_unknown"
NONE = "_none"

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)


class Level:
    """An up-down count kept by the event loop's thread alone (no lock needed)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1


class Metrics:
    """The node's metrics. One instance per node (per app in tests)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "meshnode_requests", "Inference requests answered",
            ("provider", "model", "kind", "status"), registry=r,
        )
        self.errors = Counter(
            "meshnode_errors", "Inference requests that ended in an error",
            ("provider", "model", "code"), registry=r,
        )
        self.latency = Histogram(
            "meshnode_request_latency_seconds", "Whole-request latency",
            ("provider", "model"), buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "meshnode_time_to_first_token_seconds", "Time to the first streamed chunk",
            ("provider", "model"), buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.tokens = Counter(
            "meshnode_tokens", "Tokens served", ("provider", "model", "direction"), registry=r,
        )
        self.cost = Counter(
            "meshnode_cost_usd", "Cost of served requests in USD", ("provider", "model"),
            registry=r,
        )
        self.attempts = Counter(
            "meshnode_upstream_attempts", "Upstream attempts by outcome",
            ("provider", "outcome"), registry=r,
        )
        # A plain counter read at scrape time: a Gauge's inc/dec take a lock twice per request.
        self.in_flight = Level()
        Gauge(
            "meshnode_in_flight_requests", "Inference requests being served now", registry=r,
        ).set_function(lambda: self.in_flight.value)
        self._children: dict[tuple[str, ...], Any] = {}

    # Cached children: prometheus-client resolves labels with locks and validation each call.
    def _child(self, metric: Any, *labels: str) -> Any:
        key = (metric._name, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def record_served(
        self,
        served: Served,
        *,
        kind: str,
        status: int,
        latency_s: float,
        ttft_s: float | None = None,
        error_code: str | None = None,
    ) -> None:
        """A request that reached a provider (its answer was delivered, or broke mid-stream)."""
        provider = served.offer.provider
        model = served.offer.model
        self._child(self.requests, provider, model, kind, str(status)).inc()
        self._child(self.latency, provider, model).observe(latency_s)
        if ttft_s is not None:
            self._child(self.ttft, provider, model).observe(ttft_s)
        usage = served.usage
        if usage.prompt_tokens:
            self._child(self.tokens, provider, model, "prompt").inc(usage.prompt_tokens)
        if usage.completion_tokens:
            self._child(self.tokens, provider, model, "completion").inc(usage.completion_tokens)
        if served.cost:
            self._child(self.cost, provider, model).inc(served.cost)
        for attempt in served.attempts:
            self._child(self.attempts, attempt.provider, attempt.outcome).inc()
        if error_code is not None:
            self._child(self.errors, provider, model, error_code).inc()

    def record_failed(
        self, *, model: str | None, kind: str, status: int, code: str, provider: str | None = None
    ) -> None:
        """A request that ended in an error before any provider answered. `model` must be a
        model this node serves, else None (it is reported as `_unknown`)."""
        model_label = model or UNKNOWN
        provider_label = provider or NONE
        self._child(self.requests, provider_label, model_label, kind, str(status)).inc()
        self._child(self.errors, provider_label, model_label, code).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)
