"""Counters and histograms that take no lock on the request path, exposed through
prometheus-client at scrape time.

prometheus-client's `Counter.inc` and `Histogram.observe` take a `threading.Lock` per value (a
histogram two: its bucket and its sum), about six per proxied request. Every request-path
update in meshnode runs on the event loop's thread, so a plain float in a slotted object is
enough. `LoopCounter`, `LoopHistogram` and `LoopGauge` are the drop-in spellings of
prometheus-client's `Counter`, `Histogram` and `Gauge` for that case: the same constructor
(name, documentation, label names, `buckets`, `registry`), `labels(*values)` for a child
(`inc`, `observe`, `set`), and the same exposition: each one registers itself on the registry
as a collector and, when scraped, yields the families and samples prometheus-client's own
metric would (names, label sets, types, HELP, the order of the series, `_created`), so
`/metrics` reads the same.

Concurrency rule: update only from the event loop's thread (two threads incrementing one value
could lose an update). A scrape may run anywhere: it reads a copy of the series table.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from typing import Generic, TypeVar

import prometheus_client.metrics as _prometheus_metrics
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

DEFAULT_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, math.inf,
)


V = TypeVar("V", "CounterValue", "HistogramValue", "GaugeValue")


def _use_created() -> bool:
    # prometheus-client's switch (PROMETHEUS_DISABLE_CREATED_SERIES, disable_created_metrics()),
    # read at scrape time as its own metrics read it.
    return bool(getattr(_prometheus_metrics, "_use_created", True))


class CounterValue:
    """One counter series."""

    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class HistogramValue:
    """One histogram series: a count per bucket (not cumulative) and the sum."""

    __slots__ = ("counts", "sum", "created", "_bounds")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        self.sum += amount
        if amount == amount:  # NaN falls in no bucket, as in prometheus-client
            self.counts[bisect_left(self._bounds, amount)] += 1


class GaugeValue:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = float(value)


class _Family(Collector, Generic[V]):
    """The series of one metric, by label values, in the order they were first seen."""

    _type = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: CollectorRegistry | None = None) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        # label values as given -> value; values given as non-strings are kept under both
        # spellings, so each series has one value whatever its caller passed.
        self._series: dict[tuple[object, ...], V] = {}
        self._ordered: list[tuple[tuple[str, ...], V]] = []
        self._single: V | None = None if self._labelnames else self._new()
        if registry is not None:
            registry.register(self)

    def _new(self) -> V:
        raise NotImplementedError

    def labels(self, *values: object) -> V:
        """The series for these label values (created on first use)."""
        found = self._series.get(values)
        if found is not None:
            return found
        if not self._labelnames:
            raise ValueError(f"{self._name} has no labels")
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name}: incorrect label count")
        labels = tuple(str(v) for v in values)
        found = self._series.get(labels)
        if found is None:
            found = self._series[labels] = self._new()
            self._ordered.append((labels, found))
        self._series[values] = found
        return found

    def describe(self) -> Iterable[Metric]:
        return [Metric(self._name, self._documentation, self._type)]

    def collect(self) -> Iterator[Metric]:
        metric = Metric(self._name, self._documentation, self._type)
        created = _use_created()
        if self._single is not None:
            self._samples(metric, {}, self._single, created)
        else:
            for labels, value in list(self._ordered):
                self._samples(metric, dict(zip(self._labelnames, labels, strict=True)), value,
                              created)
        yield metric

    def _samples(self, metric: Metric, labels: dict[str, str], value: V,
                 created: bool) -> None:
        raise NotImplementedError


class LoopCounter(_Family[CounterValue]):
    """prometheus-client's `Counter`, lock-free (see the module docstring)."""

    _type = "counter"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: CollectorRegistry | None = None) -> None:
        if name.endswith("_total"):  # as prometheus-client spells a counter's family
            name = name[: -len("_total")]
        super().__init__(name, documentation, labelnames, registry)

    def _new(self) -> CounterValue:
        return CounterValue()

    def inc(self, amount: float = 1) -> None:
        """For a counter without labels."""
        if self._single is None:
            raise ValueError(f"{self._name} has labels: use labels(...).inc()")
        self._single.inc(amount)

    def _samples(self, metric: Metric, labels: dict[str, str], value: CounterValue,
                 created: bool) -> None:
        metric.samples.append(Sample(self._name + "_total", labels, value.value, None, None))
        if created:
            metric.samples.append(Sample(self._name + "_created", labels, value.created, None,
                                         None))


class LoopHistogram(_Family[HistogramValue]):
    """prometheus-client's `Histogram`, lock-free."""

    _type = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 buckets: Sequence[float] = DEFAULT_BUCKETS,
                 registry: CollectorRegistry | None = None) -> None:
        bounds = [float(b) for b in buckets]
        if bounds and bounds[-1] != math.inf:
            bounds.append(math.inf)
        if bounds != sorted(bounds) or len(bounds) < 2:
            raise ValueError("buckets must be sorted and hold at least one finite bound")
        self._bounds = tuple(bounds)
        self._les = tuple(floatToGoString(b) for b in bounds)
        super().__init__(name, documentation, labelnames, registry)

    def _new(self) -> HistogramValue:
        return HistogramValue(self._bounds)

    def observe(self, amount: float) -> None:
        """For a histogram without labels."""
        if self._single is None:
            raise ValueError(f"{self._name} has labels: use labels(...).observe()")
        self._single.observe(amount)

    def _samples(self, metric: Metric, labels: dict[str, str], value: HistogramValue,
                 created: bool) -> None:
        out = metric.samples
        acc = 0.0
        bucket = self._name + "_bucket"
        for le, count in zip(self._les, list(value.counts), strict=True):
            acc += count
            out.append(Sample(bucket, {**labels, "le": le}, acc, None, None))
        out.append(Sample(self._name + "_count", labels, acc, None, None))
        if self._bounds[0] >= 0:  # a sum is exposed only where it cannot go down
            out.append(Sample(self._name + "_sum", labels, value.sum, None, None))
        if created:
            out.append(Sample(self._name + "_created", labels, value.created, None, None))


class LoopGauge(_Family[GaugeValue]):
    """prometheus-client's `Gauge` (`set`), lock-free."""

    _type = "gauge"

    def _new(self) -> GaugeValue:
        return GaugeValue()

    def set(self, value: float) -> None:
        """For a gauge without labels."""
        if self._single is None:
            raise ValueError(f"{self._name} has labels: use labels(...).set()")
        self._single.set(value)

    def _samples(self, metric: Metric, labels: dict[str, str], value: GaugeValue,
                 created: bool) -> None:
        metric.samples.append(Sample(self._name, labels, value.value, None, None))
