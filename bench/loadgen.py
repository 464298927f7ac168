"""The closed-loop load generator used for every target: `wrk` (preferred) or `bench.pyload`.

It owns running N keep-alive connections of identical POSTs against one URL for a bounded time
and returning a `LoadResult`. The same generator, pinned to the same cores, drives the direct
baseline, meshnode and LiteLLM, so the ratios compare only what sits between it and the backend.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.procs import BenchProcessError, ProcessSet
from bench.targets import API_KEY

# wrk's own summary, printed by a Lua `done` hook as one JSON line (wrk latencies are µs).
_WRK_LUA = """
wrk.method = "POST"
wrk.body = [==[%s]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%%d,"duration_us":%%d,"errors_status":%%d,"errors_socket":%%d,' ..
    '"p50_us":%%d,"p99_us":%%d}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True)
class LoadResult:
    tool: str  # "wrk" or "pyload"
    connections: int
    requests: int
    errors: int  # non-2xx answers plus socket errors
    duration_s: float
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        ok = self.requests - self.errors
        return ok / self.duration_s if self.duration_s > 0 else 0.0


def pick_tool(preference: str = "auto") -> str:
    """`wrk` when asked for or available, else the Python generator."""
    if preference == "python":
        return "pyload"
    if shutil.which("wrk"):
        return "wrk"
    if preference == "wrk":
        raise BenchProcessError("wrk requested but not installed (run `make bench-setup`)")
    return "pyload"


def run_load(
    procs: ProcessSet,
    url: str,
    body: bytes,
    connections: int,
    duration_s: float,
    cores: set[int] | None,
    tool: str,
    name: str = "loadgen",
) -> LoadResult:
    """Drive `url` with `connections` closed-loop clients for `duration_s`; block until done."""
    if tool == "wrk":
        return _run_wrk(procs, url, body, connections, duration_s, cores, name)
    return _run_pyload(procs, url, body, connections, duration_s, cores, name)


def _run_wrk(
    procs: ProcessSet,
    url: str,
    body: bytes,
    connections: int,
    duration_s: float,
    cores: set[int] | None,
    name: str,
) -> LoadResult:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_LUA % (body.decode(), API_KEY))
    try:
        seconds = max(1, round(duration_s))
        argv = [
            "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
            "-s", script.name, url,
        ]  # fmt: skip
        managed = procs.start(name, argv, cores=cores)
        managed.proc.wait(timeout=seconds + 60)
        line = managed.wait_for_line(r"^WRK_JSON (.*)$", timeout_s=5).group(1)
        procs.stop(managed)
    finally:
        Path(script.name).unlink(missing_ok=True)
    data = json.loads(line)
    return LoadResult(
        tool="wrk",
        connections=connections,
        requests=int(data["requests"]),
        errors=int(data["errors_status"]) + int(data["errors_socket"]),
        duration_s=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1e3,
        p99_ms=data["p99_us"] / 1e3,
    )


def _run_pyload(
    procs: ProcessSet,
    url: str,
    body: bytes,
    connections: int,
    duration_s: float,
    cores: set[int] | None,
    name: str,
) -> LoadResult:
    # One process per load-generator core, the connections split among them.
    workers = max(1, len(cores) if cores else 1)
    shares = [
        connections // workers + (1 if i < connections % workers else 0) for i in range(workers)
    ]
    started = []
    for i, share in enumerate(s for s in shares if s > 0):
        argv = [
            sys.executable, "-m", "bench.pyload", "--url", url, "--body", body.decode(),
            "--connections", str(share), "--duration", str(duration_s), "--api-key", API_KEY,
        ]  # fmt: skip
        core = {sorted(cores)[i]} if cores else None
        started.append(
            procs.start(f"{name}-{i}", argv, cores=core, cwd=Path(__file__).parent.parent)
        )
    results = []
    for managed in started:
        managed.proc.wait(timeout=duration_s + 60)
        results.append(
            json.loads(managed.wait_for_line(r"^PYLOAD_JSON (.*)$", timeout_s=5).group(1))
        )
        procs.stop(managed)
    requests = sum(int(r["requests"]) for r in results)
    return LoadResult(
        tool="pyload",
        connections=connections,
        requests=requests,
        errors=sum(int(r["errors_status"]) + int(r["errors_socket"]) for r in results),
        duration_s=max(float(r["duration_s"]) for r in results),
        # Percentiles of the busiest worker: close enough for a fallback generator.
        p50_ms=max(float(r["p50_ms"]) for r in results),
        p99_ms=max(float(r["p99_ms"]) for r in results),
    )
