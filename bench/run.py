"""`make bench`: direct vs one meshnode node vs LiteLLM's proxy, side by side, in one run (SPEC §6).

It owns the order of a run and where each process runs:
1. start the instant backend (`bench.backend`), one meshnode node (`meshnode run --config ...`)
   and, when `make bench-setup` has installed it, LiteLLM's proxy (one worker);
2. 1 client, sequential non-stream requests, interleaved rounds: p50/p99 and what each proxy adds;
3. streaming: time to first token (instant backend) and a slow stream (is each chunk relayed?);
4. 32 connections for a bounded time with the same load generator (wrk, else `bench.pyload`):
   requests/s and CPU µs per request of the target's process tree (/proc utime+stime);
5. print the table, the ratios and the SPEC §6 checks; write `bench/results/latest.json` and
   `bench/results/latest.md`.

CPU placement on a 2-core box: the proxy under test (meshnode or LiteLLM) alone on core 0; the
backend, the load generator and the 1-client probe share core 1. The proxy is what saturates, so
it gets a core of its own; the backend answers ~75k req/s on half a core, far above any proxy.
With more cores the backend and the load generator get separate ones; with one, nothing is pinned.
Everything listens on 127.0.0.1, every phase is bounded in count or time, and every process is
stopped on exit, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from bench.loadgen import LoadResult, pick_tool, run_load
from bench.probes import Samples, sequential_latency, stream_ttft, warm_up
from bench.procs import BenchProcessError, ProcessSet, cpu_count
from bench.report import (
    LatencyStats,
    Report,
    SlowStreamStats,
    TargetResult,
    ThroughputStats,
    percentile,
)
from bench.setup_litellm import BENCH_VENV
from bench.targets import REPO, Target, chat_body, start_backend, start_litellm, start_meshnode

RESULTS_DIR = REPO / "bench" / "results"


@dataclass(frozen=True)
class CorePlan:
    proxy: set[int] | None
    backend: set[int] | None
    loadgen: set[int] | None

    def describe(self) -> str:
        def fmt(cores: set[int] | None) -> str:
            return ",".join(map(str, sorted(cores))) if cores else "any"

        return f"proxy on core {fmt(self.proxy)}; backend on {fmt(self.backend)}; " \
               f"load generator and probe on {fmt(self.loadgen)}"  # fmt: skip


def plan_cores(pin: bool = True) -> CorePlan:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2 or not pin:
        return CorePlan(None, None, None)
    if len(cores) == 2:
        return CorePlan({cores[0]}, {cores[1]}, {cores[1]})
    return CorePlan({cores[0]}, {cores[1]}, set(cores[2:]))


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, timeout=10)  # fmt: skip
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_pressure() -> float | None:
    """Linux PSI: % of the last 60 s in which some runnable task waited for a CPU (busy box)."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    fields = dict(part.split("=", 1) for part in first.split()[1:])
    return float(fields.get("avg60", "nan"))


def _litellm_version(venv: Path) -> str | None:
    for dist in sorted(venv.glob("lib/python*/site-packages/litellm-*.dist-info")):
        return dist.name.removeprefix("litellm-").removesuffix(".dist-info")
    return None


def machine_info(plan: CorePlan, tool: str, venv: Path) -> dict[str, object]:
    return {
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": cpu_count(),
        "loadavg_at_start": os.getloadavg()[0],
        "cpu_pressure_at_start": cpu_pressure(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "meshnode_commit": _git_commit(),
        "litellm_version": _litellm_version(venv),
        "load_generator": tool,
        "placement": plan.describe(),
    }


def _latency(samples: Samples) -> LatencyStats:
    return LatencyStats.from_seconds(samples.seconds, samples.errors)


def _note(message: str) -> None:
    print(f"bench: {message}", flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a short smoke run (~30 s)")
    parser.add_argument("--requests", type=int, help="1-client requests per target (2000)")
    parser.add_argument("--stream-requests", type=int, help="streams per target for TTFT (500)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds for the probes (5)")
    parser.add_argument("--duration", type=float, help="seconds of 32-client load per target (10)")
    parser.add_argument("--load-rounds", type=int,
                        help="interleaved segments the 32-client time is split into (2)")  # fmt: skip
    parser.add_argument("--warmup", type=float, help="seconds of load before each measured run (2)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--no-pin", action="store_true",
                        help="let the OS place every process (default: pin, see above)")  # fmt: skip
    parser.add_argument("--chunk-delay-ms", type=float, default=10.0,
                        help="backend pause between chunks of the slow stream")  # fmt: skip
    parser.add_argument("--loadgen", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument(
        "--no-litellm", action="store_true", help="measure direct and meshnode only"
    )
    parser.add_argument("--litellm-venv", type=Path, default=BENCH_VENV)
    parser.add_argument("--meshnode", type=Path, default=None,
                        help="the meshnode executable (default: beside this Python, "
                             "else `python -m meshnode`)")  # fmt: skip
    parser.add_argument("--start-timeout", type=float, default=120.0)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "latest.json")
    parser.add_argument("--markdown", type=Path, default=RESULTS_DIR / "latest.md")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "requests": 100 if quick else 2000,
        "stream_requests": 30 if quick else 500,
        "rounds": 2 if quick else 5,
        "duration": 2.0 if quick else 10.0,
        "warmup": 1.0 if quick else 2.0,
        "load_rounds": 1 if quick else 2,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def measure(args: argparse.Namespace, procs: ProcessSet, report: Report, plan: CorePlan,
            tool: str, work_dir: Path) -> None:  # fmt: skip
    _note(f"starting the backend ({plan.describe()})")
    backend = start_backend(procs, plan.backend, args.chunk_delay_ms)
    report.targets["direct"] = TargetResult("direct", backend.base_url)
    targets: list[Target] = [backend]

    _note(f"starting meshnode ({args.meshnode or 'default'})")
    try:
        node = start_meshnode(
            procs, plan.proxy, backend, work_dir, args.meshnode, args.start_timeout
        )
        report.targets["meshnode"] = TargetResult("meshnode", node.base_url)
        targets.append(node)
    except BenchProcessError as exc:
        _note(f"meshnode unavailable: {exc}")
        report.targets["meshnode"] = TargetResult("meshnode", error=str(exc))

    if not args.no_litellm:
        if not (args.litellm_venv / "bin" / "litellm").exists():
            msg = "LiteLLM is not installed: run `make bench-setup` to compare against it"
            _note(msg + "; measuring meshnode alone")
            report.targets["litellm"] = TargetResult("litellm", error=msg)
        else:
            _note("starting LiteLLM's proxy (one worker; takes a few seconds)")
            try:
                litellm = start_litellm(procs, plan.proxy, backend, work_dir, args.litellm_venv,
                                        args.start_timeout)  # fmt: skip
                report.targets["litellm"] = TargetResult("litellm", litellm.base_url)
                targets.append(litellm)
            except BenchProcessError as exc:
                _note(f"LiteLLM unavailable: {exc}")
                report.targets["litellm"] = TargetResult("litellm", error=str(exc))

    if plan.loadgen:  # the 1-client probe runs in this process: keep it off the proxy's core
        os.sched_setaffinity(0, plan.loadgen)

    _note("warming up")
    warm_up(targets, requests=10 if args.quick else 50)

    _note(f"1 client: {args.requests} sequential requests per target")
    for name, samples in sequential_latency(targets, args.requests, args.rounds).items():
        report.targets[name].latency = LatencyStats.from_seconds(
            samples.seconds, samples.errors, samples.on_cpu_s, samples.runqueue_wait_s
        )
        if samples.errors:
            _note(f"{name}: {samples.errors} errors, last: {samples.last_error}")

    _note(f"streaming: {args.stream_requests} streams per target (time to first token)")
    for name, samples in stream_ttft(targets, args.stream_requests, args.rounds).items():
        report.targets[name].ttft = _latency(samples)
        if samples.errors:
            _note(f"{name}: {samples.errors} stream errors, last: {samples.last_error}")

    slow_n = 5 if args.quick else 20
    _note(f"slow streams: {slow_n} per target, {args.chunk_delay_ms:g} ms between chunks")
    for name, samples in stream_ttft(targets, slow_n, 1, slow=True).items():
        report.targets[name].slow_stream = SlowStreamStats(
            n=len(samples.seconds),
            errors=samples.errors,
            chunk_delay_ms=args.chunk_delay_ms,
            ttft_p50_ms=percentile(samples.seconds, 50) * 1e3,
            total_p50_ms=percentile(samples.totals, 50) * 1e3,
        )

    body = chat_body()
    segments = max(1, args.load_rounds)
    seg_s = max(1.0, args.duration / segments)
    for target in targets:
        _note(f"{args.connections} clients: warming up {target.name} ({args.warmup:g} s)")
        run_load(procs, target.chat_url, body, args.connections, args.warmup, plan.loadgen, tool,
                 name=f"warmup-{target.name}")  # fmt: skip
    loads: dict[str, list[tuple[LoadResult, float]]] = {t.name: [] for t in targets}
    for segment in range(segments):
        # Interleaved segments: a burst of load from a neighbour hits every target alike.
        for target in targets:
            _note(f"{args.connections} clients: {target.name}, {seg_s:g} s "
                  f"(segment {segment + 1}/{segments}, {tool})")  # fmt: skip
            cpu_before = target.process.cpu_seconds()
            load = run_load(procs, target.chat_url, body, args.connections, seg_s, plan.loadgen,
                            tool, name=f"load-{target.name}")  # fmt: skip
            loads[target.name].append((load, target.process.cpu_seconds() - cpu_before))
    for name, parts in loads.items():
        report.targets[name].throughput = _throughput(parts)


def _throughput(parts: list[tuple[LoadResult, float]]) -> ThroughputStats:
    requests = sum(load.requests for load, _ in parts)
    errors = sum(load.errors for load, _ in parts)
    duration = sum(load.duration_s for load, _ in parts)
    cpu = sum(c for _, c in parts)
    ok = max(0, requests - errors)
    weight = max(1, requests)
    return ThroughputStats(
        tool=parts[0][0].tool,
        connections=parts[0][0].connections,
        requests=requests,
        errors=errors,
        duration_s=duration,
        rps=ok / duration if duration > 0 else 0.0,
        p50_ms=sum(load.p50_ms * load.requests for load, _ in parts) / weight,
        p99_ms=max(load.p99_ms for load, _ in parts),
        cpu_s=cpu,
        cpu_us_per_request=cpu * 1e6 / ok if ok else 0.0,
        cores_used=cpu / duration if duration > 0 else 0.0,
    )


def _pct(value: object) -> str:
    return f"{value:.0f}%" if isinstance(value, float) else "n/a"


def describe_machine(report: Report) -> str:
    m = report.machine
    return (
        f"Measured {m['date_utc']} on {m['cpu']} ({m['cores']} cores, load average "
        f"{m['loadavg_at_start']:.2f} at start, {m.get('loadavg_at_end', 0):.2f} at end; "
        f"CPU pressure {_pct(m.get('cpu_pressure_at_start'))} at start, "
        f"{_pct(m.get('cpu_pressure_at_end'))} at end), Python {m['python']}, meshnode {m['meshnode_commit']}, "
        f"LiteLLM {m['litellm_version'] or 'not installed'}, load generator {m['load_generator']}; "
        f"{m['placement']}."
    )


def write_outputs(report: Report, json_path: Path, md_path: Path) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_bytes(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2))
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(describe_machine(report) + "\n\n" + report.markdown())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = plan_cores(pin=not args.no_pin)
    tool = pick_tool(args.loadgen)
    if tool == "pyload":
        _note("wrk not found (`make bench-setup` installs it): using the Python load generator")
    settings = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k not in ("output", "markdown", "litellm_venv", "meshnode")
    }
    report = Report(machine=machine_info(plan, tool, args.litellm_venv), settings=settings)
    work_dir = Path(tempfile.mkdtemp(prefix="meshnode-bench-"))
    started = time.monotonic()
    try:
        with ProcessSet(args.output.parent / "logs") as procs:
            measure(args, procs, report, plan, tool, work_dir)
    except KeyboardInterrupt:
        _note("interrupted; every benchmark process stopped")
        return 130
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    report.machine["loadavg_at_end"] = os.getloadavg()[0]
    report.machine["cpu_pressure_at_end"] = cpu_pressure()
    write_outputs(report, args.output, args.markdown)
    print()
    print(describe_machine(report))
    print()
    print(report.text())
    print()
    _note(f"done in {time.monotonic() - started:.0f} s; wrote {args.output} and {args.markdown}")
    node = report.targets.get("meshnode")
    return 0 if node is not None and node.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
