"""The soak's report: one markdown section with the run's facts, outcomes, ledgers, memory and
checks (what docs/soak.md shows)."""

from __future__ import annotations

import os
import platform
import subprocess
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.soak.chaos import ChaosEvent
from bench.soak.invariants import Check, client_cost, ends
from bench.soak.memory import Series

REPO = Path(__file__).resolve().parents[2]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{len(os.sched_getaffinity(0))} cores ({cpu}), Python {platform.python_version()}, "
            f"load average {load} at the end")


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def render(
    *,
    command: str,
    seconds: float,
    records: Sequence[Mapping[str, Any]],
    budgets: Mapping[str, Mapping[str, Any]],
    series: Sequence[Series],
    events: Sequence[ChaosEvent],
    checks: Sequence[Check],
) -> str:
    done = ends(records)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"`{command}`, {when}, meshnode at `{commit()}`, {seconds:.0f} s of load, "
        f"on {machine()}.",
        "",
        "| kind | requests | ok | HTTP error | stream error | other | cost (client log) |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in ("chat", "stream", "embed"):
        rows = [r for r in done if r["kind"] == kind]
        outcomes = Counter(r["outcome"] for r in rows)
        other = sum(v for k, v in outcomes.items()
                    if k not in ("ok", "http_error", "stream_error"))
        cost = sum(r["cost"] or 0.0 for r in rows if r["outcome"] == "ok")
        lines.append(f"| {kind} | {len(rows)} | {outcomes['ok']} | {outcomes['http_error']} | "
                     f"{outcomes['stream_error']} | {other} | ${cost:.4f} |")
    served = Counter(r["served_by"] for r in done if r["outcome"] == "ok")
    cached = sum(1 for r in done if r.get("cache") == "hit")
    lines += [
        "",
        "Answers served by: " + ", ".join(f"{k} {v}" for k, v in sorted(served.items())
                                          if k) + f"; cache hits {cached}.",
        "",
        "| node | ledger `spent_today_this_node` | client log | difference | mesh-wide `spent_today` |",
        "|---|---|---|---|---|",
    ]
    for node, budget in sorted(budgets.items()):
        ledger = float(budget.get("spent_today_this_node", 0.0))
        client = client_cost(records, node)
        lines.append(f"| {node} | ${ledger:.6f} | ${client:.6f} | ${ledger - client:+.6f} | "
                     f"${float(budget.get('spent_today', 0.0)):.6f} |")
    lines += ["", "| process | RSS first | steady | last quarter | samples |", "|---|---|---|---|---|"]
    for s in series:
        first, steady, tail, _ = s.verdict()
        lines.append(f"| {s.node} (pid {s.pid}) | {first:.0f} MiB | {steady:.0f} MiB | "
                     f"{tail:.0f} MiB | {len(s.samples)} |")
    lines += ["", "Faults (seconds from the start): " + "; ".join(
        f"{e.t:g} {e.what}" for e in events) + ".", "", "| check | | measured |", "|---|---|---|"]
    for check in checks:
        lines.append(f"| {check.name} | {'✅' if check.ok else '❌'} | {check.detail} |")
    return "\n".join(lines) + "\n"
