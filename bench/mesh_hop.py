"""One peer hop (SPEC §6: client -> A -> gRPC -> B -> backend adds <= 3 ms p50 over going to B).

Starts the instant backend, node B serving it, node A serving nothing (it joins B and forwards
every request over gRPC), then measures 1-client sequential non-stream latency to B and through
A, interleaved in rounds, in the same run. Usage:

    python -m bench.mesh_hop [--requests 2000] [--rounds 10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.mesh_common import mesh_view, start_mesh_node
from bench.probes import sequential_latency, warm_up
from bench.procs import ProcessSet
from bench.report import percentile
from bench.targets import API_KEY, CHAT_PATH, Target, chat_body, start_backend

SPEC_HOP_P50_MS = 3.0


def _wait_forwarding(via: Target, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while True:
        request = urllib.request.Request(
            via.base_url + CHAT_PATH,
            data=chat_body(),
            method="POST",
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        )
        try:
            with opener.open(request, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("node A never forwarded a request to B")
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, ProcessSet(Path(tmp) / "logs") as procs:
        work = Path(tmp)
        backend = start_backend(procs, None, 0.0)
        b, b_grpc = start_mesh_node(procs, "node-b", work, backend_url=backend.base_url, seeds=[])
        a, _ = start_mesh_node(procs, "node-a", work, backend_url=None, seeds=[b_grpc])
        _wait_forwarding(a)
        assert mesh_view(a.base_url).get("node-b") == "alive"
        direct = Target("direct-to-B", b.base_url, b.process)
        via = Target("through-A", a.base_url, a.process)
        warm_up([direct, via], requests=100)
        samples = sequential_latency([direct, via], args.requests, args.rounds)
    d = [s * 1000 for s in samples["direct-to-B"].seconds]
    v = [s * 1000 for s in samples["through-A"].seconds]
    errors = samples["direct-to-B"].errors + samples["through-A"].errors
    d50, d99, v50, v99 = percentile(d, 50), percentile(d, 99), percentile(v, 50), percentile(v, 99)
    print(f"direct to B:  p50 {d50:.3f} ms  p99 {d99:.3f} ms  (n={len(d)})")
    print(f"through A:    p50 {v50:.3f} ms  p99 {v99:.3f} ms  (n={len(v)})")
    added = v50 - d50
    ok = added <= SPEC_HOP_P50_MS and errors == 0
    print(
        f"one peer hop adds p50 {added:.3f} ms, p99 {v99 - d99:.3f} ms; errors {errors}; "
        f"SPEC <= {SPEC_HOP_P50_MS} ms p50: {'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
