"""The results of one benchmark run: typed records, the SPEC §6 checks, the table, JSON and markdown.

It owns turning raw samples into numbers (percentiles, added latency, ratios) and rendering them.
It measures nothing itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# The targets. SPEC §6 sets added p50 <= 1 ms and CPU <= 400 µs per request with goals of 0.4 ms
# and 150 µs; issue 20 (newer) makes the goals the targets and adds the streaming and per-core ones.
TARGET_ADDED_P50_MS = 0.4  # issue 20
SPEC_ADDED_P99_MS = 2.0
SPEC_ADDED_TTFT_MS = 2.0
SPEC_RPS_RATIO = 25.0
TARGET_CPU_US_PER_REQUEST = 150.0  # issue 20
TARGET_CPU_US_PER_STREAM = 250.0  # issue 20
TARGET_RPS_PER_CORE = 6000.0  # issue 20
NOW = "meshnode"  # today's node; a baseline node is "meshnode@<rev>"
RELAY = "relay"  # bench.relay: a byte relay, the floor of a proxy on this placement


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted samples; NaN when there are none."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True)
class LatencyStats:
    n: int
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float

    # The target's process tree per request during this phase (schedstat; sequential probes
    # only): time on a CPU, and time runnable but waiting for one (a busy box's share of the tail).
    cpu_us_per_request: float | None = None
    runqueue_wait_us_per_request: float | None = None

    @classmethod
    def from_seconds(
        cls,
        samples: Sequence[float],
        errors: int,
        on_cpu_s: float | None = None,
        runqueue_wait_s: float | None = None,
    ) -> LatencyStats:
        ms = [s * 1e3 for s in samples]
        n = len(ms)
        mean = sum(ms) / n if ms else math.nan

        def per_request(total: float | None) -> float | None:
            return total * 1e6 / n if n and total is not None else None

        return cls(
            n=n,
            errors=errors,
            p50_ms=percentile(ms, 50),
            p90_ms=percentile(ms, 90),
            p99_ms=percentile(ms, 99),
            mean_ms=mean,
            cpu_us_per_request=per_request(on_cpu_s),
            runqueue_wait_us_per_request=per_request(runqueue_wait_s),
        )


@dataclass(frozen=True)
class ThroughputStats:
    tool: str
    connections: int
    requests: int
    errors: int
    duration_s: float
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_s: float  # CPU of the target's process tree during the run
    cpu_us_per_request: float
    # CPU seconds per wall second: below ~0.95 on a saturated proxy means neighbours took
    # part of its core, which lowers req/s but not CPU µs per request.
    cores_used: float
    # CPU µs per request of each interleaved segment: the run's own spread for this number.
    segment_cpu_us: tuple[float, ...] = ()

    @property
    def rps_per_core(self) -> float:
        """What one whole core would serve at this CPU cost per request."""
        return 1e6 / self.cpu_us_per_request if self.cpu_us_per_request > 0 else 0.0


@dataclass(frozen=True)
class SlowStreamStats:
    """A stream whose backend waits `chunk_delay_ms` between chunks: buffered or relayed?"""

    n: int
    errors: int
    chunk_delay_ms: float
    ttft_p50_ms: float
    total_p50_ms: float

    @property
    def relayed_incrementally(self) -> bool:
        # A buffering proxy delivers the first token only when the whole stream is in.
        return self.ttft_p50_ms < self.total_p50_ms - 2 * self.chunk_delay_ms


@dataclass
class TargetResult:
    name: str
    base_url: str = ""
    error: str | None = None
    latency: LatencyStats | None = None
    throughput: ThroughputStats | None = None
    ttft: LatencyStats | None = None
    slow_stream: SlowStreamStats | None = None
    # 32 clients posting `stream: true`; a whole streamed answer counts as one request.
    stream_throughput: ThroughputStats | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Check:
    metric: str
    value: float
    target: str
    passed: bool
    source: str = "SPEC §6"  # or "issue 20", where it sets a stricter or a new target


@dataclass(frozen=True)
class Comparison:
    """One number before (the baseline revision) and after (today's node), in the same run."""

    metric: str
    before: float
    after: float
    # > 1 is better: before ÷ after for costs (µs, ms), after ÷ before for rates (req/s).
    factor: float
    higher_is_better: bool
    # (lowest, highest) over the interleaved segments, where the number has segments.
    before_range: tuple[float, float] | None = None
    after_range: tuple[float, float] | None = None

    @property
    def within_spread(self) -> bool | None:
        """True when the segments of before and after overlap: a difference this run cannot tell
        from the box's noise. None without segments."""
        if self.before_range is None or self.after_range is None:
            return None
        return (
            self.before_range[0] <= self.after_range[1]
            and self.after_range[0] <= self.before_range[1]
        )


@dataclass
class Report:
    machine: dict[str, Any]
    settings: dict[str, Any]
    targets: dict[str, TargetResult] = field(default_factory=dict)
    baseline: str | None = None  # the name of the baseline target ("meshnode@0c3eb37")

    # ----------------------------------------------------------------- derived numbers
    def added(self, name: str) -> dict[str, float]:
        """Latency a proxy adds over calling the backend directly (ms)."""
        direct, via = self.targets.get("direct"), self.targets.get(name)
        out: dict[str, float] = {}
        if direct is None or via is None:
            return out
        if direct.latency and via.latency:
            out["p50_ms"] = via.latency.p50_ms - direct.latency.p50_ms
            out["p99_ms"] = via.latency.p99_ms - direct.latency.p99_ms
        if direct.ttft and via.ttft:
            out["ttft_p50_ms"] = via.ttft.p50_ms - direct.ttft.p50_ms
            out["ttft_p99_ms"] = via.ttft.p99_ms - direct.ttft.p99_ms
        return out

    def above_relay(self) -> dict[str, float]:
        """Per proxy, its 1-client p50 minus the byte relay's (`bench.relay`, ms): the latency of
        its own work, without what any process in the middle costs on this placement."""
        relay = self.targets.get(RELAY)
        if relay is None or relay.latency is None:
            return {}
        return {
            name: result.latency.p50_ms - relay.latency.p50_ms
            for name, result in self.targets.items()
            if name not in ("direct", RELAY) and result.latency is not None
        }

    def ratios(self) -> dict[str, float]:
        node, litellm = self.targets.get(NOW), self.targets.get("litellm")
        out: dict[str, float] = {}
        if node and litellm and node.throughput and litellm.throughput:
            if litellm.throughput.rps > 0:
                out["rps_meshnode_over_litellm"] = node.throughput.rps / litellm.throughput.rps
            if node.throughput.cpu_us_per_request > 0:
                out["cpu_per_request_litellm_over_meshnode"] = (
                    litellm.throughput.cpu_us_per_request / node.throughput.cpu_us_per_request
                )
        if node and litellm and node.latency and litellm.latency and node.latency.p50_ms > 0:
            out["p50_litellm_over_meshnode"] = litellm.latency.p50_ms / node.latency.p50_ms
        return out

    def before_after(self) -> list[Comparison]:
        """The baseline revision against today's node, every number from this one run."""
        before = self.targets.get(self.baseline) if self.baseline else None
        after = self.targets.get(NOW)
        if before is None or after is None or not before.ok or not after.ok:
            return []
        Range = tuple[float, float] | None
        rows: list[tuple[str, float | None, float | None, bool, Range, Range]] = []

        def throughput(result: TargetResult, stream: bool) -> ThroughputStats | None:
            return result.stream_throughput if stream else result.throughput

        def spread(stats: ThroughputStats | None, per_core: bool = False) -> Range:
            if stats is None or len(stats.segment_cpu_us) < 2:
                return None
            values = [1e6 / v if per_core else v for v in stats.segment_cpu_us if v > 0]
            return (min(values), max(values)) if len(values) >= 2 else None

        for stream, label in ((False, ""), (True, ", stream")):
            b, a = throughput(before, stream), throughput(after, stream)
            rows.append((f"CPU µs per request (32 clients{label})",
                         b.cpu_us_per_request if b else None,
                         a.cpu_us_per_request if a else None, False, spread(b), spread(a)))  # fmt: skip
            rows.append((f"req/s per core (32 clients{label})",
                         b.rps_per_core if b else None, a.rps_per_core if a else None, True,
                         spread(b, per_core=True), spread(a, per_core=True)))  # fmt: skip
            rows.append((f"req/s (32 clients{label})", b.rps if b else None,
                         a.rps if a else None, True, None, None))  # fmt: skip
        added_b, added_a = self.added(before.name), self.added(NOW)
        for key, label in (("p50_ms", "added p50 ms (1 client)"),
                           ("p99_ms", "added p99 ms (1 client)"),
                           ("ttft_p50_ms", "added TTFT p50 ms (stream)")):  # fmt: skip
            rows.append((label, added_b.get(key), added_a.get(key), False, None, None))
        b_lat, a_lat = before.latency, after.latency
        rows.append(("CPU µs per request (1 client)",
                     b_lat.cpu_us_per_request if b_lat else None,
                     a_lat.cpu_us_per_request if a_lat else None, False, None, None))  # fmt: skip
        out = []
        for metric, b_value, a_value, higher, b_range, a_range in rows:
            if b_value is None or a_value is None or math.isnan(b_value) or math.isnan(a_value):
                continue
            factor = _factor(b_value, a_value, higher)
            out.append(Comparison(metric, b_value, a_value, factor, higher, b_range, a_range))
        return out

    def checks(self) -> list[Check]:
        out: list[Check] = []
        added = self.added(NOW)
        if "p50_ms" in added:
            out.append(Check("added p50 (1 client)", added["p50_ms"], f"<= {TARGET_ADDED_P50_MS} ms",
                             added["p50_ms"] <= TARGET_ADDED_P50_MS, "issue 20"))  # fmt: skip
            out.append(Check("added p99 (1 client)", added["p99_ms"], f"<= {SPEC_ADDED_P99_MS} ms",
                             added["p99_ms"] <= SPEC_ADDED_P99_MS))  # fmt: skip
        if "ttft_p50_ms" in added:
            out.append(Check("added TTFT p50 (stream)", added["ttft_p50_ms"],
                             f"<= {SPEC_ADDED_TTFT_MS} ms",
                             added["ttft_p50_ms"] <= SPEC_ADDED_TTFT_MS))  # fmt: skip
        node = self.targets.get(NOW)
        if node and node.throughput:
            cpu = node.throughput.cpu_us_per_request
            out.append(Check("CPU per proxied request", cpu,
                             f"<= {TARGET_CPU_US_PER_REQUEST:.0f} µs",
                             0 < cpu <= TARGET_CPU_US_PER_REQUEST, "issue 20"))  # fmt: skip
            per_core = node.throughput.rps_per_core
            out.append(Check("req/s per core (32 clients)", per_core,
                             f">= {TARGET_RPS_PER_CORE:,.0f}",
                             per_core >= TARGET_RPS_PER_CORE, "issue 20"))  # fmt: skip
        if node and node.stream_throughput:
            cpu = node.stream_throughput.cpu_us_per_request
            out.append(Check("CPU per proxied stream", cpu,
                             f"<= {TARGET_CPU_US_PER_STREAM:.0f} µs",
                             0 < cpu <= TARGET_CPU_US_PER_STREAM, "issue 20"))  # fmt: skip
        ratio = self.ratios().get("rps_meshnode_over_litellm")
        if ratio is not None:
            out.append(Check("requests/s vs LiteLLM (32 clients)", ratio, f">= {SPEC_RPS_RATIO:.0f}x",
                             ratio >= SPEC_RPS_RATIO))  # fmt: skip
        if node and node.slow_stream:
            relayed = node.slow_stream.relayed_incrementally
            out.append(
                Check("stream chunks relayed as they arrive", float(relayed), "yes", relayed)
            )
        return out

    # ----------------------------------------------------------------- rendering
    def to_json(self) -> dict[str, Any]:
        targets: dict[str, Any] = {}
        for name, result in self.targets.items():
            data = asdict(result)
            for key in ("throughput", "stream_throughput"):
                stats = getattr(result, key)
                if stats is not None:
                    data[key]["rps_per_core"] = stats.rps_per_core
            if result.slow_stream is not None:
                data["slow_stream"]["relayed_incrementally"] = (
                    result.slow_stream.relayed_incrementally
                )
            targets[name] = data
        return {
            "machine": self.machine,
            "settings": self.settings,
            "baseline": self.baseline,
            "targets": targets,
            "added": {name: self.added(name) for name in self.targets if name != "direct"},
            "ratios": self.ratios(),
            "above_relay_p50_ms": self.above_relay(),
            "before_after": [
                {**asdict(c), "within_spread": c.within_spread} for c in self.before_after()
            ],
            "checks": [asdict(c) for c in self.checks()],
        }

    def _rows(self) -> list[list[str]]:
        rows = []
        for name, result in self.targets.items():
            if not result.ok:
                rows.append([name, f"unavailable: {(result.error or '').splitlines()[0][:60]}"]
                            + [""] * (len(self._HEADERS) - 2))  # fmt: skip
                continue
            added = self.added(name) if name != "direct" else {}
            lat, thr, ttft = result.latency, result.throughput, result.ttft
            stream = result.stream_throughput
            rows.append(
                [
                    name,
                    _ms(lat.p50_ms if lat else None),
                    _ms(lat.p99_ms if lat else None),
                    _signed(added.get("p50_ms")) + " / " + _signed(added.get("p99_ms")),
                    _us(lat.cpu_us_per_request if lat else None),
                    _us(lat.runqueue_wait_us_per_request if lat else None),
                    f"{thr.rps:,.0f}" if thr else "-",
                    f"{thr.cpu_us_per_request:,.0f}" if thr else "-",
                    f"{thr.cores_used:.2f}" if thr else "-",
                    f"{thr.rps_per_core:,.0f}" if thr else "-",
                    _ms(thr.p99_ms if thr else None),
                    f"{stream.rps:,.0f}" if stream else "-",
                    f"{stream.cpu_us_per_request:,.0f}" if stream else "-",
                    _ms(ttft.p50_ms if ttft else None),
                    _signed(added.get("ttft_p50_ms")),
                    _errors(thr, stream),
                ]
            )
        return rows

    _HEADERS = [
        "target", "p50 ms", "p99 ms", "added p50/p99 ms", "CPU µs/req (1c)", "CPU wait µs/req (1c)", "req/s (32c)", "CPU µs/req",
        "cores used", "req/s per core",
        "p99 ms (32c)", "stream req/s (32c)", "CPU µs/stream", "TTFT p50 ms", "added TTFT ms",
        "errors (32c)",
    ]  # fmt: skip

    def _has_spread(self) -> bool:
        return any(c.within_spread is not None for c in self.before_after())

    def _before_after_lines(self) -> list[tuple[str, str, str, str]]:
        out = []
        for c in self.before_after():
            factor = "n/a" if math.isnan(c.factor) else f"{c.factor:.2f}x"
            if c.within_spread:
                factor += " ~"
            before, after = (
                _with_range(c.before, c.before_range),
                _with_range(c.after, c.after_range),
            )
            out.append((c.metric, before, after, factor))
        return out

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self._HEADERS) + " |", "|" + "---|" * len(self._HEADERS)]
        lines += ["| " + " | ".join(row) + " |" for row in self._rows()]
        comparisons = self._before_after_lines()
        if comparisons:
            lines += ["", f"| before/after | {self.baseline} | {NOW} | better by |",
                      "|---|---:|---:|---:|"]  # fmt: skip
            lines += [f"| {m} | {b} | {a} | {f} |" for m, b, a, f in comparisons]
            if self._has_spread():
                lines += ["", _SPREAD_NOTE]
        checks = self.checks()
        if checks:
            lines += ["", "| target | measured | target | from | |", "|---|---|---|---|---|"]
            for c in checks:
                lines.append(
                    f"| {c.metric} | {_check_value(c)} | {c.target} | {c.source} | "
                    f"{'✅' if c.passed else '❌'} |"
                )
        return "\n".join(lines) + "\n"

    def text(self) -> str:
        rows = [self._HEADERS, *self._rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self._HEADERS))]
        out = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
        out.insert(1, "  ".join("-" * w for w in widths))
        ratios = self.ratios()
        if ratios:
            out.append("")
            for key, ratio in ratios.items():
                out.append(f"{key}: {ratio:.1f}x")
        floor = self.above_relay()  # empty unless the relay's latency was measured
        if floor:
            added = self.added(RELAY).get("p50_ms")
            out += ["", f"1 client, p50 above the byte relay (which itself adds {_signed(added)} ms: "
                        "any process in the middle, on this placement):"]  # fmt: skip
            out += [f"  {name}: {_signed(value)} ms" for name, value in floor.items()]
        comparisons = self._before_after_lines()
        if comparisons:
            out += ["", f"before/after, in this run: {self.baseline} -> {NOW} "
                        "(better by: before/after for costs, after/before for rates):"]  # fmt: skip
            table = [("", "before", "after", "better by"), *comparisons]
            w = [max(len(r[i]) for r in table) for i in range(4)]
            for m, b, a, f in table:
                out.append(f"  {m.ljust(w[0])}  {b.rjust(w[1])}  {a.rjust(w[2])}  {f.ljust(w[3])}")
            if self._has_spread():
                out.append("  " + _SPREAD_NOTE)
        checks = self.checks()
        if checks:
            out.append("")
            out.append("Targets (SPEC §6; issue 20 where it is stricter or new):")
            for c in checks:
                out.append(
                    f"  [{'PASS' if c.passed else 'FAIL'}] {c.metric}: {_check_value(c)} "
                    f"(target {c.target}, {c.source})"
                )
        return "\n".join(out)


_SPREAD_NOTE = (
    "[low-high]: the interleaved 32-client segments; ~: before's and after's segments overlap, "
    "so this run cannot tell the difference from the box's noise."
)


def _with_range(value: float, spread: tuple[float, float] | None) -> str:
    if spread is None:
        return _num(value)
    return f"{_num(value)} [{_num(spread[0])}-{_num(spread[1])}]"


def _factor(before: float, after: float, higher_is_better: bool) -> float:
    """How many times better `after` is than `before` (> 1 better, < 1 worse)."""
    num, den = (after, before) if higher_is_better else (before, after)
    if den == 0:
        return math.inf if num > 0 else 1.0
    if num * den < 0:  # an added latency that crossed zero: no meaningful ratio
        return math.nan
    return num / den


def _errors(thr: ThroughputStats | None, stream: ThroughputStats | None) -> str:
    parts = [f"{s.errors}/{s.requests}" for s in (thr, stream) if s is not None]
    return " + ".join(parts) if parts else "-"


def _check_value(check: Check) -> str:
    if check.target == "yes":
        return "yes" if check.value else "no"
    return _num(check.value)


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def _us(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.0f}"


def _signed(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:+.3f}"


def _num(value: float) -> str:
    return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
