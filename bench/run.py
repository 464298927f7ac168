"""`make bench`: direct vs meshnode before and after vs LiteLLM's proxy, side by side, in one run.

It owns the order of a run and where each process runs:
1. start the instant backend (`bench.backend`), the byte relay (`bench.relay`: the floor of
   any proxy on this placement, `--no-relay` skips it), today's meshnode node (this checkout's
   code), a node of the baseline revision (`--baseline REV`, default in bench/baseline.rev, unpacked
   with `git archive`, run with this venv) and, when `make bench-setup` has installed it,
   LiteLLM's proxy (one worker);
2. 1 client, sequential non-stream requests, interleaved rounds: p50/p99 and what each proxy adds;
3. streaming: time to first token (instant backend) and a slow stream (is each chunk relayed?);
4. 32 connections for a bounded time with the same load generator (wrk, else `bench.pyload`),
   non-stream and then `stream: true` (a whole streamed answer is one request): requests/s and
   CPU µs per request of the target's process tree (/proc utime+stime);
5. print the table, before/after (baseline vs today, same run) and the SPEC §6 / issue 20
   checks; write `bench/results/latest.json` and `bench/results/latest.md`.

CPU placement on a 2-core box: the proxy under test (meshnode or LiteLLM) alone on core 0; the
backend, the load generator and the 1-client probe share core 1. The proxy is what saturates, so
it gets a core of its own; the backend answers ~75k req/s on half a core, far above any proxy.
With more cores the backend and the load generator get separate ones; with one, nothing is pinned.
Both nodes and the relay share the proxy's core; only one of them is under load at any time. Everything listens
on 127.0.0.1, every phase is bounded in count or time, and every process is stopped on exit,
error or Ctrl-C (the unpacked baseline goes with the run's scratch folder).
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

from bench.baseline import BaselineSource, BaselineUnavailable, default_rev, parse_rev_arg, unpack
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
from bench.targets import (
    REPO,
    Target,
    chat_body,
    slug,
    start_backend,
    start_litellm,
    start_meshnode,
    start_relay,
)

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
    """HEAD's short hash, `+dirty` when tracked files differ from it (what is measured is the tree)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, timeout=10)  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = out.stdout.strip()
    if not commit:
        return "unknown"
    return commit + ("+dirty" if dirty.stdout.strip() else "")


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
        "meshnode_source": str(REPO),
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
    parser.add_argument("--quick", action="store_true", help="a short smoke run (~45 s)")
    parser.add_argument("--baseline", metavar="REV", default=None,
                        help="git revision measured as the 'before' node, meshnode@REV "
                             f"(default: {default_rev() or 'none'}, from bench/baseline.rev); "
                             "`none` to skip")  # fmt: skip
    parser.add_argument("--requests", type=int, help="1-client requests per target (2000)")
    parser.add_argument("--stream-requests", type=int, help="streams per target for TTFT (500)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds for the probes (5)")
    parser.add_argument("--duration", type=float,
                        help="seconds of 32-client load per target, non-stream (10)")  # fmt: skip
    parser.add_argument("--stream-duration", type=float,
                        help="seconds of 32-client streaming load per target (10)")  # fmt: skip
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
    parser.add_argument("--no-relay", action="store_true",
                        help="skip the byte relay (bench.relay: the floor of a proxy on this "
                             "placement, measured beside the proxies)")  # fmt: skip
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
        "stream_duration": 1.0 if quick else 10.0,
        "warmup": 1.0 if quick else 2.0,
        "load_rounds": 1 if quick else 2,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.baseline = parse_rev_arg(args.baseline) if args.baseline is not None else default_rev()
    except ValueError as exc:
        parser.error(str(exc))
    return args


def _start_baseline(args: argparse.Namespace, procs: ProcessSet, plan: CorePlan, backend: Target,
                    work_dir: Path) -> tuple[TargetResult, Target | None]:  # fmt: skip
    """Unpack the baseline revision and start a node from it, or say why it is not measured."""
    rev = args.baseline
    _note(f"baseline: unpacking {rev} with `git archive`")
    source: BaselineSource | None = None
    try:
        source = unpack(REPO, rev, work_dir / "baseline-src")
        _note(f"starting {source.target_name} from {source.path}")
        node = start_meshnode(procs, plan.proxy, backend, work_dir, args.meshnode,
                              args.start_timeout, name=source.target_name,
                              source_dir=source.path)  # fmt: skip
    except (BaselineUnavailable, BenchProcessError) as exc:
        name = source.target_name if source else f"meshnode@{rev}"
        _note(f"baseline {name} not measured: {exc}")
        return TargetResult(name, error=f"baseline not measured: {exc}"), None
    return TargetResult(source.target_name, node.base_url), node


def measure(args: argparse.Namespace, procs: ProcessSet, report: Report, plan: CorePlan,
            tool: str, work_dir: Path) -> None:  # fmt: skip
    _note(f"starting the backend ({plan.describe()})")
    backend = start_backend(procs, plan.backend, args.chunk_delay_ms)
    report.targets["direct"] = TargetResult("direct", backend.base_url)
    targets: list[Target] = [backend]

    if not args.no_relay:
        _note("starting the byte relay (the floor of a proxy on this placement)")
        try:
            relay = start_relay(procs, plan.proxy, backend)
            report.targets["relay"] = TargetResult("relay", relay.base_url)
            targets.append(relay)
        except BenchProcessError as exc:
            _note(f"relay unavailable: {exc}")
            report.targets["relay"] = TargetResult("relay", error=str(exc))

    if args.baseline is None:
        _note("no baseline revision (--baseline none): measuring today's node alone")
    else:
        result, started = _start_baseline(args, procs, plan, backend, work_dir)
        report.baseline = result.name
        report.targets[result.name] = result
        if started is not None:
            targets.append(started)

    _note(f"starting meshnode from {REPO} ({args.meshnode or 'default'})")
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

    for stream in (False, True):
        duration = args.stream_duration if stream else args.duration
        if duration <= 0:
            continue
        results = _load_phase(args, procs, targets, plan, tool, stream, duration)
        for name, stats in results.items():
            if stream:
                report.targets[name].stream_throughput = stats
            else:
                report.targets[name].throughput = stats


def _load_phase(args: argparse.Namespace, procs: ProcessSet, targets: Sequence[Target],
                plan: CorePlan, tool: str, stream: bool,
                duration: float) -> dict[str, ThroughputStats]:  # fmt: skip
    """32 closed-loop clients on every target in turn, in interleaved segments."""
    body = chat_body(stream=stream)
    kind = "streams" if stream else "non-stream"
    segments = max(1, args.load_rounds)
    seg_s = max(1.0, duration / segments)
    for target in targets:
        _note(f"{args.connections} clients, {kind}: warming up {target.name} ({args.warmup:g} s)")
        run_load(procs, target.chat_url, body, args.connections, args.warmup, plan.loadgen, tool,
                 name=f"warmup-{slug(target.name)}")  # fmt: skip
    loads: dict[str, list[tuple[LoadResult, float]]] = {t.name: [] for t in targets}
    for segment in range(segments):
        # Interleaved segments: a burst of load from a neighbour hits every target alike.
        for target in targets:
            _note(f"{args.connections} clients, {kind}: {target.name}, {seg_s:g} s "
                  f"(segment {segment + 1}/{segments}, {tool})")  # fmt: skip
            cpu_before = target.process.cpu_seconds()
            load = run_load(procs, target.chat_url, body, args.connections, seg_s, plan.loadgen,
                            tool, name=f"load-{slug(target.name)}")  # fmt: skip
            loads[target.name].append((load, target.process.cpu_seconds() - cpu_before))
    return {name: _throughput(parts) for name, parts in loads.items()}


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
        segment_cpu_us=tuple(
            c * 1e6 / (load.requests - load.errors)
            for load, c in parts
            if load.requests > load.errors
        ),
    )


def _pct(value: object) -> str:
    return f"{value:.0f}%" if isinstance(value, float) else "n/a"


def describe_machine(report: Report) -> str:
    m = report.machine
    return (
        f"Measured {m['date_utc']} on {m['cpu']} ({m['cores']} cores, load average "
        f"{m['loadavg_at_start']:.2f} at start, {m.get('loadavg_at_end', 0):.2f} at end; "
        f"CPU pressure {_pct(m.get('cpu_pressure_at_start'))} at start, "
        f"{_pct(m.get('cpu_pressure_at_end'))} at end), Python {m['python']}, meshnode {m['meshnode_commit']}"
        f"{' against ' + report.baseline if report.baseline else ''}, "
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
