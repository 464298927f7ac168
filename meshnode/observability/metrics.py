"""Prometheus metrics, defined once, in their own registry (so tests and several apps in one
process never collide).

Per provider and model: requests (by status), errors (by code), latency and time-to-first-token
histograms, tokens (prompt/completion), cost in USD. Upstream attempts by outcome (`ok`,
`retryable_error`, `fatal_error`, `cooled_down`: a failure that opened the candidate's breaker),
counted for failed requests too. Per peer: requests forwarded to it (by attempt outcome) and
received from it, its RTT, gossip bytes each way. The mesh: members by status, suspicions
raised. The budget: spent, reserved and the limits. Per API key (its name, never the key):
requests, tokens and spend. Counters and histograms are `loopmetrics` ones: plain numbers the
event loop's thread updates without a lock (a dict lookup per series), folded into
prometheus-client's exposition at scrape time. Gauges that mirror state someone else owns
(membership, RTT, budget) are read at scrape time by a collector, so nothing is updated on the
hot path for them.

Label values are only ever provider names, public model names that this node serves, status
codes, error codes, peer node ids and API key names: never a key, a header, or a model name a
client made up (those are reported as `_unknown`). Peer ids and key names are bounded
(`BoundedLabels`: the first `MAX_PEERS` / `MAX_KEYS` seen keep their own series, later ones
share `_other`), so a mesh that churns or a node that mints keys cannot grow the exposition
without bound.

The same two record calls feed the dashboard's history (`history.RequestHistory`) and its last
errors (`history.RecentErrors`): one place where a request's outcome is recorded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshnode.observability.history import ErrorRecord, RecentErrors, RequestHistory
from meshnode.observability.loopmetrics import (
    CounterValue,
    HistogramValue,
    LoopCounter,
    LoopHistogram,
)
from meshnode.routing.outcome import Attempt, Served

UNKNOWN = "_unknown"
NONE = "_none"
OTHER = "_other"
REFUSED = "(no provider)"  # the history's series for requests refused before any provider
MAX_PEERS = 128
MAX_KEYS = 200
ATTEMPT_OUTCOMES = ("ok", "retryable_error", "fatal_error", "cooled_down")
MEMBER_STATUSES = ("alive", "suspect", "dead", "left")

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


class BoundedLabels:
    """The first `limit` distinct values keep their own label; later ones are `_other`."""

    __slots__ = ("_limit", "_seen")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return OTHER
        self._seen.add(value)
        return value


def attempt_outcome(attempt: Attempt) -> str:
    """The attempt's class for `meshnode_upstream_attempts_total` (its code stays in x_aiproxy)."""
    if attempt.outcome == "ok":
        return "ok"
    if attempt.cooled:
        return "cooled_down"
    return "retryable_error" if attempt.retryable else "fatal_error"


class MeshView:
    """What the mesh collector reads at scrape time (the mesh service provides it)."""

    def __init__(
        self,
        statuses: Callable[[], Iterable[tuple[str, str]]],
        rtt_ms: Mapping[str, float],
    ) -> None:
        self.statuses = statuses  # (node id, status label) of every member but this node
        self.rtt_ms = rtt_ms


class _StateCollector(Collector):
    """Gauges read from their owners at scrape time: membership, RTT, budget."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # collected only when scraped: the registry must not call collect() early

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        members = GaugeMetricFamily(
            "meshnode_mesh_members", "Mesh members this node knows, by status (itself included)",
            labels=("status",),
        )
        rtt = GaugeMetricFamily(
            "meshnode_peer_rtt_seconds", "Round-trip time of this node's probes to each peer",
            labels=("peer",),
        )
        counts = dict.fromkeys(MEMBER_STATUSES, 0)
        view = m.mesh_view
        if view is not None:
            counts["alive"] = 1  # this node
            for node_id, status in view.statuses():
                counts[status] = counts.get(status, 0) + 1
                value = view.rtt_ms.get(node_id)
                if value is not None:
                    rtt.add_metric((m.peer_label(node_id),), value / 1000.0)
        for status, n in counts.items():
            members.add_metric((status,), n)
        yield members
        yield rtt
        budget = m.budget_source() if m.budget_source is not None else None
        spent = GaugeMetricFamily(
            "meshnode_budget_spent_usd", "Settled spend in the current period", labels=("period",)
        )
        limit = GaugeMetricFamily(
            "meshnode_budget_limit_usd", "Budget limit of the period (absent: no limit)",
            labels=("period",),
        )
        reserved = GaugeMetricFamily(
            "meshnode_budget_reserved_usd", "Held by calls in flight (today)"
        )
        if budget is not None:
            spent.add_metric(("day",), float(budget.get("spent_today") or 0.0))
            spent.add_metric(("month",), float(budget.get("spent_this_month") or 0.0))
            reserved.add_metric((), float(budget.get("reserved") or 0.0))
            for period, key in (("day", "daily_limit"), ("month", "monthly_limit")):
                value = budget.get(key)
                if budget.get("enabled", True) and value is not None:
                    limit.add_metric((period,), float(value))
        yield spent
        yield reserved
        yield limit


# (provider, model, kind, status) series bundles kept at most (they are few: one per served
# model and status); past it they are looked up again.
MAX_SERVED_KEYS = 4096


class _Served:
    """The series one served request of a (provider, model, kind, status) updates, looked up
    in one dict instead of one `labels` call each. Those a request may not touch (tokens,
    cost, time to first token, the ok attempt) are looked up when first needed."""

    __slots__ = ("provider", "model", "requests", "latency", "ttft", "prompt", "completion",
                 "cost", "ok")

    def __init__(self, provider: str, model: str, requests: CounterValue,
                 latency: HistogramValue) -> None:
        self.provider = provider
        self.model = model
        self.requests = requests
        self.latency = latency
        self.ttft: HistogramValue | None = None
        self.prompt: CounterValue | None = None
        self.completion: CounterValue | None = None
        self.cost: CounterValue | None = None
        self.ok: CounterValue | None = None

    def make_ttft(self, m: Metrics) -> HistogramValue:
        self.ttft = m.ttft.labels(self.provider, self.model)
        return self.ttft

    def make_prompt(self, m: Metrics) -> CounterValue:
        self.prompt = m.tokens.labels(self.provider, self.model, "prompt")
        return self.prompt

    def make_completion(self, m: Metrics) -> CounterValue:
        self.completion = m.tokens.labels(self.provider, self.model, "completion")
        return self.completion

    def make_cost(self, m: Metrics) -> CounterValue:
        self.cost = m.cost.labels(self.provider, self.model)
        return self.cost

    def make_ok(self, m: Metrics) -> CounterValue:
        self.ok = m.attempts.labels(self.provider, "ok")
        return self.ok


class Metrics:
    """The node's metrics. One instance per node (per app in tests)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = LoopCounter(
            "meshnode_requests", "Inference requests answered",
            ("provider", "model", "kind", "status"), registry=r,
        )
        self.errors = LoopCounter(
            "meshnode_errors", "Inference requests that ended in an error",
            ("provider", "model", "code"), registry=r,
        )
        self.latency = LoopHistogram(
            "meshnode_request_latency_seconds", "Whole-request latency",
            ("provider", "model"), buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.ttft = LoopHistogram(
            "meshnode_time_to_first_token_seconds", "Time to the first streamed chunk",
            ("provider", "model"), buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.tokens = LoopCounter(
            "meshnode_tokens", "Tokens served", ("provider", "model", "direction"), registry=r,
        )
        self.cost = LoopCounter(
            "meshnode_cost_usd", "Cost of served requests in USD", ("provider", "model"),
            registry=r,
        )
        self.attempts = LoopCounter(
            "meshnode_upstream_attempts",
            "Upstream attempts by outcome: ok, retryable_error, fatal_error, cooled_down",
            ("provider", "outcome"), registry=r,
        )
        self.forwarded = LoopCounter(
            "meshnode_peer_forwarded_requests", "Attempts this node forwarded to a peer",
            ("peer", "outcome"), registry=r,
        )
        self.received = LoopCounter(
            "meshnode_peer_received_requests", "Requests a peer forwarded to this node",
            ("peer", "kind"), registry=r,
        )
        self.gossip_bytes = LoopCounter(
            "meshnode_gossip_bytes", "Gossip payload bytes exchanged with each peer",
            ("peer", "direction"), registry=r,
        )
        self.suspicions = LoopCounter(
            "meshnode_mesh_suspicions", "Times a peer was marked suspect", registry=r,
        )
        self.key_requests = LoopCounter(
            "meshnode_key_requests", "Inference requests per API key name",
            ("key", "status"), registry=r,
        )
        self.key_tokens = LoopCounter(
            "meshnode_key_tokens", "Tokens served per API key name", ("key", "direction"),
            registry=r,
        )
        self.key_cost = LoopCounter(
            "meshnode_key_cost_usd", "Spend per API key name in USD", ("key",), registry=r,
        )
        self._served: dict[tuple[str, str, str, int], _Served] = {}
        self.peer_label = BoundedLabels(MAX_PEERS)
        self.key_label = BoundedLabels(MAX_KEYS)
        # Read at scrape time; set by the mesh service and the node (None: not reported).
        self.mesh_view: MeshView | None = None
        self.budget_source: Callable[[], Mapping[str, Any]] | None = None
        r.register(_StateCollector(self))
        # The dashboard's history and last errors, fed by the same record calls.
        self.history = RequestHistory()
        self.recent_errors = RecentErrors()
        self.gossip_dropped = LoopCounter(
            "meshnode_gossip_dropped", "Gossiped records refused or dropped, by reason",
            ("reason",), registry=r,
        )
        # A plain counter read at scrape time: a Gauge's inc/dec take a lock twice per request.
        self.in_flight = Level()
        Gauge(
            "meshnode_in_flight_requests", "Inference requests being served now", registry=r,
        ).set_function(lambda: self.in_flight.value)

    def watch_provider_problems(self, source: Callable[[], Mapping[str, str]]) -> None:
        """Export `meshnode_provider_credentials_rejected{provider}` (1 while the provider's
        upstream rejects this node's credentials), read from `source` at scrape time."""
        self.registry.register(_ProviderProblems(source))

    def record_served(
        self,
        served: Served,
        *,
        kind: str,
        status: int,
        latency_s: float,
        ttft_s: float | None = None,
        error_code: str | None = None,
        key: str | None = None,
        request_id: str = "",
    ) -> None:
        """A request that reached a provider (its answer was delivered, or broke mid-stream)."""
        offer = served.offer
        provider = offer.provider
        model = offer.model
        # The series of this (provider, model, kind, status), looked up once per request: each
        # one is still made where the `labels` calls of a first request would make it (the
        # exposition lists series in the order they were first seen).
        found = self._served.get((provider, model, kind, status))
        if found is None:
            found = self._served_series(provider, model, kind, status)
        # (a count by one is bumped in place: no `inc` call, which checks for a negative amount)
        found.requests.value += 1
        found.latency.observe(latency_s)
        if ttft_s is not None:
            (found.ttft or found.make_ttft(self)).observe(ttft_s)
        usage = served.usage
        prompt, completion = usage.prompt_tokens, usage.completion_tokens
        if prompt:
            (found.prompt or found.make_prompt(self)).inc(prompt)
        if completion:
            (found.completion or found.make_completion(self)).inc(completion)
        cost = served.cost
        if cost:
            (found.cost or found.make_cost(self)).inc(cost)
        attempts = served.attempts
        only = attempts[0] if len(attempts) == 1 else None
        if only is not None and only.outcome == "ok" and only.peer is None \
                and only.provider == provider:
            (found.ok or found.make_ok(self)).value += 1  # the common case: one local attempt
        else:
            self.record_attempts(attempts)
        if error_code is not None:
            self.errors.labels(provider, model, error_code).inc()
        if key is not None:
            self._record_key(key, status, prompt, completion, cost)
        # 499: the client went away, nothing failed on our side.
        failed = status != 499 and (error_code is not None or status >= 400)
        self.history.record(  # the provider as the providers table names it (offer.key's)
            provider=provider if offer.node is None else f"{provider}:{offer.node}",
            node=served.node, error=failed,
            tokens=prompt + completion, latency_ms=latency_s * 1000.0,
        )
        if failed:
            self.recent_errors.add(ErrorRecord(
                time.time(), request_id, status, error_code or str(status), model, provider, key,
                len(attempts),
            ))

    def _served_series(self, provider: str, model: str, kind: str, status: int) -> _Served:
        if len(self._served) >= MAX_SERVED_KEYS:
            self._served.clear()
        found = self._served[(provider, model, kind, status)] = _Served(
            provider, model, self.requests.labels(provider, model, kind, status),
            self.latency.labels(provider, model))
        return found

    def record_attempts(self, attempts: Sequence[Attempt]) -> None:
        for attempt in attempts:
            outcome = "ok" if attempt.outcome == "ok" else attempt_outcome(attempt)
            self.attempts.labels(attempt.provider, outcome).inc()
            if attempt.peer is not None:
                self.forwarded.labels(self.peer_label(attempt.peer), outcome).inc()

    def _record_key(self, key: str, status: int, prompt: int, completion: int,
                    cost: float) -> None:
        label = self.key_label(key)
        self.key_requests.labels(label, status).inc()
        if prompt:
            self.key_tokens.labels(label, "prompt").inc(prompt)
        if completion:
            self.key_tokens.labels(label, "completion").inc(completion)
        if cost:
            self.key_cost.labels(label).inc(cost)

    # ------------------------------------------------------------------ mesh
    def record_received(self, peer: str, kind: str) -> None:
        """A peer forwarded a request to this node."""
        self.received.labels(self.peer_label(peer), kind).inc()

    def record_gossip(self, peer: str, sent: int, received: int) -> None:
        """One gossip exchange with `peer`: payload bytes each way."""
        label = self.peer_label(peer)
        if sent:
            self.gossip_bytes.labels(label, "sent").inc(sent)
        if received:
            self.gossip_bytes.labels(label, "received").inc(received)

    def record_failed(
        self, *, model: str | None, kind: str, status: int, code: str, provider: str | None = None,
        attempts: Sequence[Attempt] = (), key: str | None = None, request_id: str = "",
        latency_s: float = 0.0,
    ) -> None:
        """A request that ended in an error before any provider answered (`attempts`: what
        the router tried first). `model` must be a model this node serves, else None (it is
        reported as `_unknown`)."""
        model_label = model or UNKNOWN
        provider_label = provider or NONE
        self.requests.labels(provider_label, model_label, kind, status).inc()
        self.errors.labels(provider_label, model_label, code).inc()
        if attempts:
            self.record_attempts(attempts)
        if key is not None:
            self._record_key(key, status, 0, 0, 0.0)
        if status != 499:  # the client went away: nothing failed on our side
            # The history charts the provider that failed last, when one was tried.
            last = attempts[-1] if attempts else None
            tried = provider
            if last is not None:  # as the providers table names it: a peer is mesh:<node>
                tried = last.provider if last.peer is None else f"{last.provider}:{last.peer}"
            self.history.record(
                provider=tried or REFUSED, node=last.node if last is not None else None,
                error=True, tokens=0, latency_ms=latency_s * 1000.0,
            )
            self.recent_errors.add(ErrorRecord(
                time.time(), request_id, status, code, model, tried, key, len(attempts),
            ))

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


class _ProviderProblems(Collector):
    def __init__(self, source: Callable[[], Mapping[str, str]]) -> None:
        self._source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "meshnode_provider_credentials_rejected",
            "1 while a provider's upstream rejects this node's credentials (HTTP 401/403)",
            labels=["provider"],
        )
        for provider in sorted(self._source()):
            family.add_metric([provider], 1.0)
        yield family
