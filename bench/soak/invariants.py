"""What must hold at the end of a soak: pure functions over the client log, the ledgers read
from `GET /admin/budget`, the RSS series and the exit codes. Each check says what it measured."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.soak.memory import Series

CENT = 0.005  # "to the cent": a difference that rounds to 0.00 USD
NON_STREAM = ("chat", "embed")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def terminal_outcomes(records: Sequence[Mapping[str, Any]]) -> Check:
    starts = Counter(r["id"] for r in records if r["event"] == "start")
    ends = Counter(r["id"] for r in records if r["event"] == "end")
    dup_starts = sum(1 for c in starts.values() if c > 1)
    twice = sum(1 for c in ends.values() if c > 1)
    never = len(set(starts) - set(ends))
    orphan = len(set(ends) - set(starts))
    ok = not (dup_starts or twice or never or orphan) and bool(starts)
    return Check("every request has exactly one terminal outcome", ok,
                 f"{len(starts)} started, {sum(ends.values())} ended; ended twice {twice}, "
                 f"never ended {never}, end without start {orphan}")


def ends(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in records if r["event"] == "end"]


def nothing_lost(records: Sequence[Mapping[str, Any]]) -> Check:
    bad = Counter(r["outcome"] for r in ends(records)
                  if r["outcome"] in ("timeout", "stream_cut", "transport_error"))
    return Check("no timeout, no transport error, no stream cut without an error event",
                 not bad, ", ".join(f"{k} {v}" for k, v in sorted(bad.items())) or "none")


def non_stream_errors(records: Sequence[Mapping[str, Any]]) -> Check:
    errors = Counter(f"{r['status']} {r['code']}" for r in ends(records)
                     if r["kind"] in NON_STREAM and r["outcome"] != "ok")
    total = sum(1 for r in ends(records) if r["kind"] in NON_STREAM)
    return Check("non-streamed requests: 0 client-visible errors (SPEC §6 failover)",
                 not errors, f"{sum(errors.values())} of {total}"
                 + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(errors.items()))})"
                    if errors else ""))


def answers_intact(records: Sequence[Mapping[str, Any]]) -> Check:
    oks = [r for r in ends(records) if r["outcome"] == "ok"]
    wrong_text = sum(1 for r in oks if r["text_ok"] is not True)
    wrong_header = sum(1 for r in oks if r["kind"] in NON_STREAM and r["header_cost_ok"] is False)
    return Check("every answer is whole and says its cost (text exact, header = body cost)",
                 bool(oks) and not wrong_text and not wrong_header,
                 f"{len(oks)} answers; text not exact {wrong_text}; "
                 f"x-aiproxy-cost header != body {wrong_header}")


def client_cost(records: Sequence[Mapping[str, Any]], node: str | None = None) -> float:
    return sum(r["cost"] or 0.0 for r in ends(records)
               if r["outcome"] == "ok" and (node is None or r["node"] == node))


def ledger_per_node(
    records: Sequence[Mapping[str, Any]], budgets: Mapping[str, Mapping[str, Any]],
) -> list[Check]:
    out = []
    for node, budget in sorted(budgets.items()):
        ledger = float(budget.get("spent_today_this_node", 0.0))
        client = client_cost(records, node)
        out.append(Check(
            f"node {node}: ledger = sum of x_aiproxy.cost of its answers, to the cent",
            abs(ledger - client) < CENT,
            f"ledger ${ledger:.6f}, client log ${client:.6f}, difference ${ledger - client:+.6f}; "
            f"open reservations {budget.get('open_reservations')}",
        ))
    return out


def ledger_mesh_wide(
    records: Sequence[Mapping[str, Any]], budgets: Mapping[str, Mapping[str, Any]],
) -> Check:
    total = client_cost(records)
    seen = {n: float(b.get("spent_today", 0.0)) for n, b in sorted(budgets.items())}
    ok = all(abs(v - total) < CENT for v in seen.values())
    return Check("mesh-wide spend (scope: mesh) on every node = all clients' cost, to the cent",
                 ok, f"client log ${total:.6f}; " + ", ".join(
                     f"{n} ${v:.6f}" for n, v in seen.items()))


def memory_bounded(series: Sequence[Series]) -> Check:
    parts, ok, judged = [], True, 0
    for s in series:
        first, steady, tail, bounded = s.verdict()
        if bounded is None:
            continue
        judged += 1
        ok = ok and bounded
        parts.append(f"{s.node}[{s.pid}] {steady:.0f}->{tail:.0f} MiB")
    return Check("no node's RSS grew without bound (last quarter <= 1.3 x steady + 32 MiB)",
                 ok and judged > 0, "; ".join(parts) or "no series long enough")


def clean_exits(codes: Mapping[str, int | None]) -> Check:
    return Check("every node exits 0 on SIGTERM at the end", all(c == 0 for c in codes.values()),
                 ", ".join(f"{n}: {c}" for n, c in sorted(codes.items())))


def faults_happened(kills: int, freezes: int, upstream_faults: int, failovers: int) -> Check:
    return Check("the faults happened and were absorbed by failover",
                 kills >= 1 and freezes >= 1 and upstream_faults >= 1 and failovers >= 1,
                 f"{kills} kill(s) of C, {freezes} freeze(s), {upstream_faults} scripted "
                 f"upstream faults, {failovers} answers served after a failed attempt")


def failovers(records: Sequence[Mapping[str, Any]]) -> int:
    return sum(1 for r in ends(records) if r["outcome"] == "ok" and (r["attempts"] or 0) > 1)
