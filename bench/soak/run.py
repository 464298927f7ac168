"""Run a soak: start the cluster, load it while the chaos script runs, settle, read the ledgers,
stop everything, check the invariants and render the report.

Bounded: the load stops at `seconds` or `max_requests`, whichever first; each request has a
client deadline; the chaos window closes `settle_s` before the load ends so the last answers
come from a healed mesh; every process is stopped in `finally`.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.soak import invariants as inv
from bench.soak.chaos import Chaos, ChaosEvent
from bench.soak.cluster import ENTRY_NODES, NODES, SoakCluster
from bench.soak.load import ClientLog, Load, read_log
from bench.soak.memory import RssSampler, Series
from bench.soak.report import render


@dataclass
class SoakSettings:
    seconds: float = 600.0
    clients: int = 6
    max_requests: int = 0  # 0: 400 per second of load (a bound, not a target)
    cycle_s: float = 60.0
    settle_s: float = 12.0
    workdir: Path | None = None
    command: str = "python -m bench.soak"


@dataclass
class SoakResult:
    records: list[dict[str, Any]]
    budgets: dict[str, dict[str, Any]]
    series: list[Series]
    events: list[ChaosEvent]
    checks: list[inv.Check] = field(default_factory=list)
    report: str = ""
    workdir: Path | None = None
    load_s: float = 0.0  # how long the load actually ran

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def run_soak(settings: SoakSettings) -> SoakResult:
    if settings.workdir is not None:
        return _run(settings, settings.workdir)
    with tempfile.TemporaryDirectory(prefix="meshnode-soak-") as tmp:
        return _run(settings, Path(tmp))


def _run(settings: SoakSettings, workdir: Path) -> SoakResult:
    day = datetime.now(UTC).date()
    cluster = SoakCluster.start(workdir)
    codes: dict[str, int | None] = {}
    try:
        result = asyncio.run(_drive(settings, cluster, workdir))
        result.budgets = {n: cluster.get_json(n, "/admin/budget") for n in NODES}
    finally:
        codes = cluster.stop()
    result.workdir = workdir
    records = result.records
    checks = [
        inv.terminal_outcomes(records),
        inv.nothing_lost(records),
        inv.non_stream_errors(records),
        inv.answers_intact(records),
    ]
    if datetime.now(UTC).date() == day:
        checks += inv.ledger_per_node(records, result.budgets)
        checks.append(inv.ledger_mesh_wide(records, result.budgets))
    else:
        checks.append(inv.Check("ledgers (the run crossed 00:00 UTC: daily totals reset)",
                                True, "not compared"))
    checks += [inv.memory_bounded(result.series), inv.clean_exits(codes)]
    checks.append(inv.faults_happened(*_chaos_totals(result.events), inv.failovers(records)))
    result.checks = checks
    result.report = render(
        command=settings.command, seconds=result.load_s, records=records,
        budgets=result.budgets, series=result.series, events=result.events, checks=checks,
    )
    return result


def _chaos_totals(events: list[ChaosEvent]) -> tuple[int, int, int]:
    kills = sum(1 for e in events if "killed" in e.what)
    freezes = sum(1 for e in events if "frozen" in e.what)
    faults = sum(1 for e in events if "upstream" in e.what)
    return kills, freezes, faults


async def _drive(settings: SoakSettings, cluster: SoakCluster, workdir: Path) -> SoakResult:
    started = time.monotonic()
    deadline = started + settings.seconds
    max_requests = settings.max_requests or int(settings.seconds * 400)
    log = ClientLog(workdir / "client.jsonl")
    load = Load(lambda: {n: cluster.url(n) for n in ENTRY_NODES}, log,
                clients=settings.clients, deadline=deadline, max_requests=max_requests)
    chaos = Chaos(cluster, started, until=deadline - settings.settle_s,
                  cycle_s=min(settings.cycle_s, settings.seconds - settings.settle_s))
    sampler = RssSampler(interval_s=max(1.0, settings.seconds / 300))
    stop_sampling = asyncio.Event()
    sampling = asyncio.create_task(
        sampler.run(lambda: {n: cluster.nodes[n].pid for n in NODES}, stop_sampling))
    try:
        await asyncio.gather(load.run(), chaos.run())
        load_s = time.monotonic() - started
    finally:
        stop_sampling.set()
        await sampling
        log.close()
    # every RSS sample, for a look at the trend beyond the table's medians
    (workdir / "rss.json").write_text(json.dumps(
        [{"node": s.node, "pid": s.pid, "samples": s.samples} for s in sampler.series]))
    await _settle_budgets(cluster, read_log(workdir / "client.jsonl"))
    return SoakResult(read_log(workdir / "client.jsonl"), {}, sampler.series, chaos.events,
                      load_s=load_s)


async def _settle_budgets(cluster: SoakCluster, records: list[dict[str, Any]],
                          timeout_s: float = 20.0) -> None:
    """Wait (bounded) until gossip has carried every node's spend to every node whose ledger the
    checks then read (C too: it is read mesh-wide like A and B, and after its restart it learns
    the others' spend a gossip round later than they learn each other's)."""
    total = inv.client_cost(records)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        spent = [await asyncio.to_thread(cluster.get_json, n, "/admin/budget") for n in NODES]
        if all(abs(float(b.get("spent_today", 0.0)) - total) < inv.CENT for b in spent):
            return
        await asyncio.sleep(0.5)
