"""Routing strategies: pure functions from a snapshot of candidates to a ranking.

Each strategy takes the candidates (an offer plus what the router knows of it right now) and
returns them best first, each with a score and a one-line reason. No I/O, no clocks, no globals:
the router builds the snapshot, so these are tested with plain values.

Lower score is better for every strategy. Ties break by position in the fallback chain, then by
provider priority, then by name, so a ranking is deterministic for a given snapshot (round robin
takes its turn counter as input).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from meshnode.types import ModelOffer

STRATEGY_NAMES = (
    "cost_optimized",
    "latency_optimized",
    "availability",
    "round_robin",
    "least_loaded",
)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One offer and the router's view of it at decision time."""

    offer: ModelOffer
    chain_index: int  # position of its provider in the fallback chain
    estimated_cost: float  # USD for this request at this offer's prices
    latency_ms: float | None  # EWMA of whole-request latency; None when never measured
    error_rate: float  # recent failures / attempts, 0..1
    in_flight: int
    load: float | None  # 0 idle .. 1 full, >1 queueing; None when the provider cannot tell
    max_concurrency: int = 256


@dataclass(frozen=True, slots=True)
class Ranked:
    candidate: Candidate
    score: float
    strategy: str
    note: str = ""

    @property
    def reason(self) -> str:
        """Why it scored so, in words. Built only when asked (`/admin/route`), never on the
        request path."""
        why = REASONS[self.strategy](self.candidate, self.score)
        return f"{why}; {self.note}" if self.note else why


Strategy = Callable[[Sequence[Candidate], int], list[Ranked]]


def _tiebreak(c: Candidate) -> tuple[int, int, str, str]:
    return (c.chain_index, c.offer.priority, c.offer.provider, c.offer.node or "")


def _sorted(ranked: list[Ranked]) -> list[Ranked]:
    return sorted(ranked, key=lambda r: (r.score, _tiebreak(r.candidate)))


def cost_optimized(candidates: Sequence[Candidate], turn: int = 0) -> list[Ranked]:
    """Cheapest estimated cost for this request; free local and peer offers win."""
    return _sorted([Ranked(c, c.estimated_cost, "cost_optimized") for c in candidates])


def latency_optimized(candidates: Sequence[Candidate], turn: int = 0) -> list[Ranked]:
    """Lowest measured latency. An offer never measured scores 0 so it gets measured once;
    a flaky one pays for its errors (each error counts as a full second)."""
    return _sorted(
        [
            Ranked(
                c,
                (c.latency_ms if c.latency_ms is not None else 0.0) + 1000.0 * c.error_rate,
                "latency_optimized",
            )
            for c in candidates
        ]
    )


def availability(candidates: Sequence[Candidate], turn: int = 0) -> list[Ranked]:
    """Follow the fallback chain, demoting whatever has been failing recently."""
    return _sorted([Ranked(c, round(c.error_rate, 2), "availability") for c in candidates])


def round_robin(candidates: Sequence[Candidate], turn: int = 0) -> list[Ranked]:
    """Each request starts one further along the (chain-ordered) list."""
    ordered = sorted(candidates, key=_tiebreak)
    n = len(ordered)
    if n == 0:
        return []
    start = turn % n
    return [
        Ranked(c, float(i), "round_robin")
        for i, c in enumerate(ordered[start:] + ordered[:start])
    ]


def _load(c: Candidate) -> float:
    return c.load if c.load is not None else c.in_flight / max(1, c.max_concurrency)


def least_loaded(candidates: Sequence[Candidate], turn: int = 0) -> list[Ranked]:
    """Lowest load: the provider's own capacity report when it has one (local worker, peers'
    gossip), else our in-flight count over its concurrency limit."""
    return _sorted([Ranked(c, _load(c), "least_loaded") for c in candidates])


def _why_cost(c: Candidate, score: float) -> str:
    return f"estimated cost ${c.estimated_cost:.6f}"


def _why_latency(c: Candidate, score: float) -> str:
    what = f"ewma {c.latency_ms:.1f} ms" if c.latency_ms is not None else "not measured yet"
    return f"{what}, error rate {c.error_rate:.0%}"


def _why_availability(c: Candidate, score: float) -> str:
    return f"error rate {c.error_rate:.0%}, chain #{c.chain_index}"


def _why_round_robin(c: Candidate, score: float) -> str:
    return f"position {int(score)} this turn"


def _why_load(c: Candidate, score: float) -> str:
    if c.load is not None:
        return f"load {c.load:.2f} (reported)"
    return f"{c.in_flight} in flight of {c.max_concurrency}"


REASONS: dict[str, Callable[[Candidate, float], str]] = {
    "cost_optimized": _why_cost,
    "latency_optimized": _why_latency,
    "availability": _why_availability,
    "round_robin": _why_round_robin,
    "least_loaded": _why_load,
}


STRATEGIES: dict[str, Strategy] = {
    "cost_optimized": cost_optimized,
    "latency_optimized": latency_optimized,
    "availability": availability,
    "round_robin": round_robin,
    "least_loaded": least_loaded,
}


def rank(strategy: str, candidates: Sequence[Candidate], turn: int = 0) -> list[Ranked]:
    return STRATEGIES[strategy](candidates, turn)


def demote(ranked: list[Ranked], cooled: set[tuple[str, str]], reason: str) -> list[Ranked]:
    """Move cooled-down candidates to the end (last resort), keeping the order otherwise."""
    ok = [r for r in ranked if r.candidate.offer.key not in cooled]
    late = [
        replace(r, note=f"{r.note}; {reason}" if r.note else reason)
        for r in ranked
        if r.candidate.offer.key in cooled
    ]
    return ok + late
