"""`python -m bench.run --quick` end to end: a real backend, a real `meshnode run` process of this
checkout and one of a git revision (HEAD, unpacked with `git archive`), the real load generator.
It asserts the report's shape and that every phase counted requests; it asserts no timing (speed
is what `make bench` reports, not what tests check)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]


def test_quick_bench_measures_direct_and_meshnode(tmp_path: Path) -> None:
    out_json, out_md = tmp_path / "latest.json", tmp_path / "latest.md"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--quick",
            "--no-litellm",
            "--requests",
            "40",
            "--stream-requests",
            "10",
            "--duration",
            "1",
            "--warmup",
            "1",
            "--stream-duration",
            "1",
            "--baseline",
            "HEAD",
            "--output",
            str(out_json),
            "--markdown",
            str(out_md),
        ],  # fmt: skip
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out_json.read_text())

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    baseline = f"meshnode@{head}"
    assert report["baseline"] == baseline
    assert set(report["targets"]) == {"direct", "relay", baseline, "meshnode"}
    for name in ("direct", "relay", baseline, "meshnode"):
        target = report["targets"][name]
        assert target["error"] is None
        assert target["latency"]["n"] == 40 and target["latency"]["errors"] == 0
        assert target["latency"]["p50_ms"] > 0 and target["latency"]["p99_ms"] > 0
        assert target["ttft"]["n"] == 10 and target["ttft"]["errors"] == 0
        assert target["slow_stream"]["n"] > 0
        throughput = target["throughput"]
        assert throughput["connections"] == 32
        assert throughput["requests"] > 0
        assert throughput["errors"] == 0
        assert throughput["rps"] > 0
        assert throughput["cpu_s"] > 0
        streams = target["stream_throughput"]
        assert streams["connections"] == 32
        assert streams["requests"] > 0 and streams["errors"] == 0
        assert streams["cpu_s"] > 0

    # What each proxy adds above the byte relay: every proxy, and only the proxies.
    assert set(report["above_relay_p50_ms"]) == {baseline, "meshnode"}

    node = report["targets"]["meshnode"]
    assert node["throughput"]["cpu_us_per_request"] > 0
    assert node["latency"]["cpu_us_per_request"] > 0
    assert node["latency"]["runqueue_wait_us_per_request"] >= 0
    assert set(report["added"]["meshnode"]) >= {"p50_ms", "p99_ms", "ttft_p50_ms", "ttft_p99_ms"}
    assert node["stream_throughput"]["cpu_us_per_request"] > 0
    metrics = {check["metric"] for check in report["checks"]}
    assert {
        "added p50 (1 client)",
        "added p99 (1 client)",
        "CPU per proxied request",
        "CPU per proxied stream",
        "req/s per core (32 clients)",
    } <= metrics
    compared = {row["metric"] for row in report["before_after"]}
    assert {
        "CPU µs per request (32 clients)",
        "CPU µs per request (32 clients, stream)",
    } <= compared
    # The unpacked baseline lives in the run's scratch folder, removed at the end.
    unpacked = re.search(rf"starting {re.escape(baseline)} from (\S+)", run.stdout)
    assert unpacked is not None
    assert not Path(unpacked.group(1)).exists()
    assert report["machine"]["load_generator"] in ("wrk", "pyload")
    assert "| meshnode |" in out_md.read_text()
    assert "SPEC §6" in run.stdout and "before/after" in run.stdout
