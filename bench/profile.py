"""`python -m bench.profile`: where a meshnode node spends its CPU under 32-client load.

It owns one profiling session: the instant backend, one node, the same load generator as
`bench.run`, and py-spy (installed into `.bench-venv` by `make bench-setup`) sampling the node
while the load runs. It prints the functions with the most self time and the meshnode frames
with the most inclusive time, as shares of all samples, and keeps the raw samples in
`bench/results/profile.txt` (collapsed stacks, loadable by speedscope or flamegraph.pl).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from bench.loadgen import pick_tool, run_load
from bench.procs import ProcessSet
from bench.run import RESULTS_DIR, plan_cores
from bench.setup_litellm import BENCH_VENV
from bench.targets import chat_body, start_backend, start_meshnode

_LINE = re.compile(r":\d+\)$")


def summarize(collapsed: Path, top: int) -> str:
    """Self and inclusive shares from py-spy's raw (collapsed-stack) output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        # Per function, not per line: "f (path:12)" and "f (path:30)" are one row.
        frames = [_LINE.sub(")", frame) for frame in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return "no samples"
    out = [f"{total} samples", "", "self time:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    out += ["", "inclusive time, meshnode frames:"]
    mine = [(f, n) for f, n in inclusive.most_common() if "meshnode/" in f]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in mine[:top]]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of sampled load")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--stream", action="store_true", help="profile streaming requests")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "profile.txt")
    args = parser.parse_args(argv)
    py_spy = BENCH_VENV / "bin" / "py-spy"
    if not py_spy.exists():
        found = shutil.which("py-spy")
        if found is None:
            print("py-spy not found: run `make bench-setup` (it installs py-spy into .bench-venv)")
            return 2
        py_spy = Path(found)
    plan = plan_cores()
    tool = pick_tool("auto")
    body = chat_body(stream=args.stream)
    work_dir = Path(tempfile.mkdtemp(prefix="meshnode-profile-"))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    try:
        with ProcessSet(args.output.parent / "logs") as procs:
            backend = start_backend(procs, plan.backend, 10.0)
            node = start_meshnode(procs, plan.proxy, backend, work_dir, None, 120.0)
            run_load(procs, node.chat_url, body, args.connections, 2.0, plan.loadgen, tool)
            # py-spy samples while the load runs; start it just after the load begins.
            sampler = threading.Timer(
                0.5,
                subprocess.run,
                args=(
                    [
                        str(py_spy),
                        "record",
                        "--pid",
                        str(node.process.pid),
                        "--duration",
                        str(max(1, int(args.duration) - 1)),
                        "--rate",
                        str(args.rate),
                        "--format",
                        "raw",
                        "--output",
                        str(args.output),
                        "--nonblocking",
                    ],  # fmt: skip
                ),
                kwargs={"capture_output": True, "timeout": args.duration + 60},
            )
            sampler.start()
            load = run_load(procs, node.chat_url, body, args.connections, args.duration,
                            plan.loadgen, tool)  # fmt: skip
            sampler.join()
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(f"{load.requests} requests, {load.rps:,.0f} req/s, {load.errors} errors ({tool})")
    print(summarize(args.output, args.top))
    print(f"\nraw samples: {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
