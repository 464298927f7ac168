"""The soak's invariants catch what they claim to: a request that ended twice or never, a lost
request, a cent missing from a ledger, a growing RSS, an unclean exit."""

from __future__ import annotations

from typing import Any

from bench.soak import invariants as inv
from bench.soak.memory import Series


def _start(i: int, node: str = "a", kind: str = "chat") -> dict[str, Any]:
    return {"event": "start", "id": i, "node": node, "kind": kind}


def _end(i: int, node: str = "a", kind: str = "chat", outcome: str = "ok",
         cost: float | None = 0.01, **kw: Any) -> dict[str, Any]:
    base = {"event": "end", "id": i, "node": node, "kind": kind, "outcome": outcome,
            "cost": cost if outcome == "ok" else None, "status": 200, "code": None,
            "text_ok": True, "header_cost_ok": True, "attempts": 1}
    return {**base, **kw}


def test_exactly_one_terminal_outcome() -> None:
    good = [_start(1), _end(1), _start(2), _end(2)]
    assert inv.terminal_outcomes(good).ok
    assert not inv.terminal_outcomes([*good, _end(2)]).ok  # ended twice
    assert not inv.terminal_outcomes([*good, _start(3)]).ok  # never ended
    assert not inv.terminal_outcomes([*good, _end(9)]).ok  # end without start
    assert not inv.terminal_outcomes([]).ok


def test_lost_and_failed_requests_are_seen() -> None:
    assert inv.nothing_lost([_end(1), _end(2, kind="stream", outcome="stream_error")]).ok
    for outcome in ("timeout", "transport_error", "stream_cut"):
        assert not inv.nothing_lost([_end(1), _end(2, outcome=outcome)]).ok
    assert inv.non_stream_errors([_end(1, kind="stream", outcome="stream_error")]).ok
    assert not inv.non_stream_errors([_end(1, kind="embed", outcome="http_error")]).ok
    assert not inv.answers_intact([_end(1, text_ok=False)]).ok
    assert not inv.answers_intact([_end(1, header_cost_ok=False)]).ok
    assert inv.answers_intact([_end(1), _end(2, kind="stream", header_cost_ok=None)]).ok


def test_ledgers_must_match_to_the_cent() -> None:
    records = [_end(1, cost=0.0123), _end(2, node="b", cost=0.5), _end(3, outcome="http_error")]
    exact = {"a": {"spent_today_this_node": 0.0123, "spent_today": 0.5123},
             "b": {"spent_today_this_node": 0.5, "spent_today": 0.5123}}
    assert all(c.ok for c in inv.ledger_per_node(records, exact))
    assert inv.ledger_mesh_wide(records, exact).ok
    off = {**exact, "a": {"spent_today_this_node": 0.0223, "spent_today": 0.5123}}
    assert [c.ok for c in inv.ledger_per_node(records, off)] == [False, True]
    stale = {**exact, "b": {"spent_today_this_node": 0.5, "spent_today": 0.5}}
    assert not inv.ledger_mesh_wide(records, stale).ok


def test_memory_growth_and_exits() -> None:
    flat = Series("a", 1, [(float(t), 100.0 + (t % 3)) for t in range(40)])
    leak = Series("b", 2, [(float(t), 100.0 + 10 * t) for t in range(40)])
    short = Series("c", 3, [(0.0, 100.0)])
    assert inv.memory_bounded([flat, short]).ok
    assert not inv.memory_bounded([flat, leak]).ok
    assert not inv.memory_bounded([short]).ok  # nothing judged is not a pass
    assert inv.clean_exits({"a": 0, "b": 0}).ok
    assert not inv.clean_exits({"a": 0, "b": -9}).ok
    assert inv.failovers([_end(1, attempts=2), _end(2)]) == 1
    assert not inv.faults_happened(0, 1, 1, 1).ok
