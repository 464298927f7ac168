"""The pure parts of `bench.run`: the SPEC §6 / issue 20 checks, the before/after comparison and
how both are rendered, from hand-made results (no process, no timing)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from bench.report import (
    TARGET_CPU_US_PER_REQUEST,
    TARGET_CPU_US_PER_STREAM,
    LatencyStats,
    Report,
    TargetResult,
    ThroughputStats,
)

BASELINE = "meshnode@0c3eb37"


def _latency(p50_ms: float, p99_ms: float, cpu_us: float = 500.0) -> LatencyStats:
    return LatencyStats(n=100, errors=0, p50_ms=p50_ms, p90_ms=p50_ms, p99_ms=p99_ms,
                        mean_ms=p50_ms, cpu_us_per_request=cpu_us)  # fmt: skip


def _throughput(cpu_us: float, rps: float, requests: int = 10_000) -> ThroughputStats:
    duration = requests / rps
    return ThroughputStats(tool="wrk", connections=32, requests=requests, errors=0,
                           duration_s=duration, rps=rps, p50_ms=5.0, p99_ms=20.0,
                           cpu_s=cpu_us * requests / 1e6, cpu_us_per_request=cpu_us,
                           cores_used=cpu_us * rps / 1e6)  # fmt: skip


def _target(name: str, p50: float, p99: float, cpu: float, stream_cpu: float, rps: float,
            ttft: float = 0.5) -> TargetResult:  # fmt: skip
    return TargetResult(name, "http://127.0.0.1:1", latency=_latency(p50, p99),
                        throughput=_throughput(cpu, rps), ttft=_latency(ttft, ttft),
                        stream_throughput=_throughput(stream_cpu, rps / 2))  # fmt: skip


def _report(node: TargetResult, baseline: TargetResult | None = None) -> Report:
    report = Report(machine={}, settings={})
    report.targets["direct"] = _target("direct", 0.03, 0.1, 10, 12, 60_000, ttft=0.04)
    if baseline is not None:
        report.targets[baseline.name] = baseline
        report.baseline = baseline.name
    report.targets["meshnode"] = node
    return report


def _checks(report: Report) -> dict[str, bool]:
    return {c.metric: c.passed for c in report.checks()}


def test_todays_numbers_fail_the_issue_20_targets() -> None:
    # 0c3eb37 on a quiet box: +0.77 ms p50, 521 µs, 1,920 req/s, streams ~550 µs.
    report = _report(_target("meshnode", 0.80, 2.5, 521, 550, 1_920))
    checks = _checks(report)
    assert checks["added p50 (1 client)"] is False
    assert checks["added p99 (1 client)"] is False
    assert checks["CPU per proxied request"] is False
    assert checks["CPU per proxied stream"] is False
    assert checks["req/s per core (32 clients)"] is False
    assert checks["added TTFT p50 (stream)"] is True
    sources = {c.metric: c.source for c in report.checks()}
    assert sources["CPU per proxied request"] == "issue 20"
    assert sources["added p99 (1 client)"] == "SPEC §6"


def test_a_lean_node_passes_and_the_lines_sit_where_issue_20_puts_them() -> None:
    report = _report(_target("meshnode", 0.43, 1.9, 150, 250, 6_500))  # direct p50 is 0.03 ms
    checks = _checks(report)
    assert all(checks.values()), checks
    per_core = {c.metric: c.value for c in report.checks()}["req/s per core (32 clients)"]
    assert per_core == pytest.approx(1e6 / 150)
    # One µs over a line fails it.
    just_over = _checks(_report(_target("meshnode", 0.44, 1.9, 151, 251, 6_500)))
    assert just_over["CPU per proxied request"] is False
    assert just_over["CPU per proxied stream"] is False
    assert just_over["added p50 (1 client)"] is False
    assert just_over["req/s per core (32 clients)"] is True  # 1e6 / 151 = 6,623
    assert TARGET_CPU_US_PER_REQUEST == 150 and TARGET_CPU_US_PER_STREAM == 250


def test_a_node_that_served_nothing_does_not_pass_the_cpu_targets() -> None:
    # ThroughputStats reports 0 µs per request when no request succeeded.
    report = _report(_target("meshnode", 0.3, 1.0, 0, 0, 1))
    checks = _checks(report)
    assert checks["CPU per proxied request"] is False
    assert checks["CPU per proxied stream"] is False
    assert checks["req/s per core (32 clients)"] is False


def test_before_after_is_better_than_one_for_an_improvement_either_way_round() -> None:
    before = _target(BASELINE, 0.80, 2.5, 520, 560, 1_900)
    after = _target("meshnode", 0.43, 1.5, 260, 280, 3_800)
    rows = {c.metric: c for c in _report(after, before).before_after()}
    cpu = rows["CPU µs per request (32 clients)"]
    assert (cpu.before, cpu.after) == (520, 260)
    assert cpu.factor == pytest.approx(2.0)  # a cost: before ÷ after
    assert rows["CPU µs per request (32 clients, stream)"].factor == pytest.approx(2.0)
    assert rows["req/s (32 clients)"].factor == pytest.approx(2.0)  # a rate: after ÷ before
    assert rows["req/s per core (32 clients)"].factor == pytest.approx(2.0)
    assert rows["added p50 ms (1 client)"].factor == pytest.approx((0.80 - 0.03) / (0.43 - 0.03))

    worse = _report(_target("meshnode", 0.80, 2.5, 520, 560, 1_900),
                    _target(BASELINE, 0.43, 1.5, 260, 280, 3_800))  # fmt: skip
    slower = {c.metric: c for c in worse.before_after()}
    assert slower["CPU µs per request (32 clients)"].factor == pytest.approx(0.5)
    assert slower["req/s (32 clients)"].factor == pytest.approx(0.5)


def test_no_before_after_without_a_measured_baseline() -> None:
    node = _target("meshnode", 0.8, 2.5, 521, 550, 1_920)
    assert _report(node).before_after() == []
    failed = TargetResult(BASELINE, error="baseline not measured: git is not installed")
    report = _report(node, failed)
    assert report.before_after() == []
    assert "before/after" not in report.text()
    # The failure is a row of the table, not a crash.
    assert f"{BASELINE}  unavailable: baseline not measured: git is not installed" in report.text()
    assert report.to_json()["baseline"] == BASELINE


def test_an_added_latency_that_crosses_zero_has_no_ratio() -> None:
    before = _target(BASELINE, 0.02, 2.0, 500, 550, 2_000)  # 0.01 ms faster than direct
    after = _target("meshnode", 0.05, 2.0, 500, 550, 2_000)
    rows = {c.metric: c for c in _report(after, before).before_after()}
    assert math.isnan(rows["added p50 ms (1 client)"].factor)
    assert "n/a" in _report(after, before).text()


def test_text_markdown_and_json_carry_before_after_and_the_checks() -> None:
    before = _target(BASELINE, 0.80, 2.5, 521, 545, 1_920)
    after = _target("meshnode", 0.35, 1.5, 140, 240, 5_000)
    report = _report(after, before)
    text = report.text()
    assert f"before/after, in this run: {BASELINE} -> meshnode" in text
    assert "CPU µs per request (32 clients)" in text and "3.72x" in text  # 521 / 140
    assert "[PASS] CPU per proxied request: 140 (target <= 150 µs, issue 20)" in text
    assert "[PASS] CPU per proxied stream: 240 (target <= 250 µs, issue 20)" in text
    assert "[FAIL]" not in text

    markdown = report.markdown()
    assert f"| before/after | {BASELINE} | meshnode | better by |" in markdown
    assert "| CPU µs per request (32 clients) | 521 | 140 | 3.72x |" in markdown
    assert "| CPU per proxied stream | 240 | <= 250 µs | issue 20 | ✅ |" in markdown
    header = markdown.splitlines()[0]
    assert "stream req/s (32c)" in header and "CPU µs/stream" in header
    row = next(line for line in markdown.splitlines() if line.startswith("| meshnode |"))
    assert row.count("|") == header.count("|")

    data = report.to_json()
    assert data["targets"]["meshnode"]["stream_throughput"]["rps_per_core"] == pytest.approx(
        1e6 / 240
    )
    metrics = {row["metric"]: row for row in data["before_after"]}
    assert metrics["CPU µs per request (32 clients, stream)"]["before"] == 545
    assert {c["metric"] for c in data["checks"]} >= {"CPU per proxied stream"}


def _with_segments(result: TargetResult, *segments: float) -> TargetResult:
    assert result.throughput is not None
    result.throughput = replace(result.throughput, segment_cpu_us=segments)
    return result


def test_before_after_says_when_the_segments_overlap() -> None:
    noisy = _report(
        _with_segments(_target("meshnode", 0.8, 2.5, 460, 550, 2_100), 420, 500),
        _with_segments(_target(BASELINE, 0.8, 2.5, 435, 550, 2_200), 430, 440),
    )
    row = {c.metric: c for c in noisy.before_after()}["CPU µs per request (32 clients)"]
    assert (row.before_range, row.after_range) == ((430, 440), (420, 500))
    assert row.within_spread is True
    assert "435 [430-440]" in noisy.text() and "460 [420-500]" in noisy.text()
    assert "0.95x ~" in noisy.text()
    per_core = {c.metric: c for c in noisy.before_after()}["req/s per core (32 clients)"]
    assert per_core.after_range == pytest.approx((1e6 / 500, 1e6 / 420))

    clear = _report(
        _with_segments(_target("meshnode", 0.4, 1.5, 260, 280, 3_800), 250, 270),
        _with_segments(_target(BASELINE, 0.8, 2.5, 510, 560, 1_900), 500, 520),
    )
    row = {c.metric: c for c in clear.before_after()}["CPU µs per request (32 clients)"]
    assert row.within_spread is False
    assert "| CPU µs per request (32 clients) | 510 [500-520] | 260 [250-270] | 1.96x |" in (
        clear.markdown()
    )
    assert clear.to_json()["before_after"][0]["within_spread"] is False
    # One segment (--quick) has no spread to judge by.
    single = {c.metric: c for c in _report(_target("meshnode", 0.4, 1.5, 260, 280, 3_800),
                                           _target(BASELINE, 0.8, 2.5, 510, 560, 1_900)).before_after()}  # fmt: skip
    assert single["CPU µs per request (32 clients)"].within_spread is None
    assert "[low-high]" in clear.text() and "[low-high]" in clear.markdown()
    one_segment = _report(_target("meshnode", 0.4, 1.5, 260, 280, 3_800),
                          _target(BASELINE, 0.8, 2.5, 510, 560, 1_900))  # fmt: skip
    assert "[low-high]" not in one_segment.text() and "[low-high]" not in one_segment.markdown()


def test_what_each_proxy_adds_above_the_byte_relay() -> None:
    report = _report(_target("meshnode", 0.45, 1.0, 140, 240, 7_000),
                     _target(BASELINE, 0.90, 2.0, 600, 900, 1_500))  # fmt: skip
    assert report.above_relay() == {}  # no relay measured: nothing to subtract
    assert "above the byte relay" not in report.text()
    report.targets["relay"] = _target("relay", 0.23, 0.4, 40, 50, 30_000)
    floor = report.above_relay()
    assert floor.keys() == {BASELINE, "meshnode"}  # the proxies, not direct or the relay
    assert floor["meshnode"] == pytest.approx(0.22)
    assert floor[BASELINE] == pytest.approx(0.67)
    text = report.text()
    assert "above the byte relay (which itself adds +0.200 ms" in text
    assert "meshnode: +0.220 ms" in text
    assert report.to_json()["above_relay_p50_ms"]["meshnode"] == pytest.approx(0.22)
    # The relay is a reference, not a proxy under test: no check is made of it.
    assert {c.metric for c in report.checks()} == {c.metric for c in _report(
        _target("meshnode", 0.45, 1.0, 140, 240, 7_000)).checks()}
