"""Failure detection with real processes at DEFAULT mesh settings (SPEC §6: a killed node is
known dead by every live node within 5 s, <= 10 nodes; a graceful leave within 1 s).

Starts `--nodes` meshnode processes joined through the first, waits until everyone sees everyone
alive, then SIGKILLs one and times until every live node's `/admin/mesh` says `dead`; then
SIGTERMs another and times until every live node says `left`. Repeats `--trials` times on fresh
meshes. Also reports any false death (a live node seen not alive). Usage:

    python -m bench.mesh_failure [--nodes 5] [--trials 2]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench.mesh_common import mesh_view, start_mesh_node
from bench.procs import ProcessSet
from bench.targets import Target

SPEC_DEAD_S = 5.0
SPEC_LEFT_S = 1.0
POLL_S = 0.02


def _views(nodes: list[Target]) -> list[dict[str, str]]:
    out = []
    for node in nodes:
        try:
            out.append(mesh_view(node.base_url))
        except OSError:
            out.append({})
    return out


def _wait_all(
    nodes: list[Target], subject: str, status: str, cap_s: float, false_deaths: set[str]
) -> float:
    start = time.monotonic()
    while True:
        views = _views(nodes)
        for view in views:
            for member, seen in view.items():
                if member in {n.name for n in nodes} and seen != "alive":
                    false_deaths.add(member)
        if all(v.get(subject) == status for v in views):
            return time.monotonic() - start
        if time.monotonic() - start > cap_s:
            return float("inf")
        time.sleep(POLL_S)


def trial(n: int, work: Path) -> tuple[float, float, set[str]]:
    with ProcessSet(work / "logs") as procs:
        first, seed = start_mesh_node(procs, "n0", work, backend_url=None, seeds=[])
        nodes = [first]
        for i in range(1, n):
            node, _ = start_mesh_node(procs, f"n{i}", work, backend_url=None, seeds=[seed])
            nodes.append(node)
        deadline = time.monotonic() + 60
        while not all(len(v) == n and set(v.values()) == {"alive"} for v in _views(nodes)):
            if time.monotonic() > deadline:
                raise SystemExit("the mesh did not converge in 60 s")
            time.sleep(0.1)
        false_deaths: set[str] = set()
        victim, leaver = nodes[-1], nodes[-2]
        os.kill(victim.process.pid, signal.SIGKILL)
        live = nodes[:-1]
        dead_s = _wait_all(live, victim.name, "dead", 30, false_deaths)
        os.kill(leaver.process.pid, signal.SIGTERM)
        live = nodes[:-2]
        left_s = _wait_all(live, leaver.name, "left", 30, false_deaths)
        return dead_s, left_s, false_deaths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--trials", type=int, default=2)
    args = parser.parse_args(argv)
    ok = True
    for t in range(args.trials):
        with tempfile.TemporaryDirectory() as tmp:
            dead_s, left_s, false_deaths = trial(args.nodes, Path(tmp))
        good = dead_s <= SPEC_DEAD_S and left_s <= SPEC_LEFT_S and not false_deaths
        ok = ok and good
        print(
            f"trial {t + 1}: {args.nodes} nodes; SIGKILL known dead by all in {dead_s:.2f} s "
            f"(SPEC <= {SPEC_DEAD_S}); SIGTERM leave seen by all in {left_s:.2f} s "
            f"(SPEC <= {SPEC_LEFT_S}); false deaths: {sorted(false_deaths) or 'none'}"
            f" -> {'PASS' if good else 'FAIL'}",
            flush=True,
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
