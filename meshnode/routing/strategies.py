"""Routing strategies: pure functions from a snapshot of candidates to a ranking.

Each strategy takes the candidates (an offer plus what the router knows of it right now) and
returns them best first, each with a score and a one-line reason. No I/O, no clocks, no globals:
the router builds the snapshot, so these are tested with plain values.

Lower score is better for every strategy. Ties break by position in the fallback chain, then by
provider priority, then by name, so a ranking is deterministic for a given snapshot (round robin
takes its turn counter as input).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from meshnode.types import ModelOffer, frozen_record

STRATEGY_NAMES = (
    "cost_optimized",
    "latency_optimized",
    "availability",
    "round_robin",
    "least_loaded",
    "cache_aware",
)

# cache_aware: load is lopsided (balance first, as SGLang's router and Ray Serve's prefix-aware
# router do) when the busiest candidate is over BALANCE_ABS more loaded than the idlest one and
# over BALANCE_REL times as loaded. Load is in `Capacity.load` units (1.0: every slot busy), so
# BALANCE_ABS is a whole batch of extra work: SGLang and Ray Serve count an absolute margin of
# requests (32 and 10 by default, on GPU batches of hundreds), not one request, since a busy
# node with continuous batching admits the next request at the next step while a miss elsewhere
# recomputes the whole prompt.
BALANCE_ABS = 1.0
BALANCE_REL = 1.5
# Short of lopsided load, cache_aware weighs in time, per candidate: the expected time to the
# answer there, in units of this request's whole service (a full miss) at a node of median
# speed, lowest wins (go elsewhere when the wait costs more than the prefill a hit saves):
# - its service there: 1 - the prefill its hit saves, prefill's share of a service being
#   prompt / (prompt + ratio * output tokens), the ratio being how many prompt tokens of
#   prefill one decoded token costs as long as there: the node's measured prefill tokens/s
#   over its decode tokens/s per stream (meshnode.worker.rates, gossiped with its capacity),
#   within RATIO_BOUNDS; DEFAULT_DECODE_PREFILL_RATIO until it has measured both (a prompt
#   runs in one batched pass: ~10-30 for a CPU worker, hundreds on a GPU);
# - the wait, in services like its own there (what a node serves is alike: a node that holds a
#   conversation serves its turns as hits): nothing while a slot is free (continuous batching
#   admits it at the next step), else the (queue + 1)-th of the busy requests to finish, each
#   uniformly far along: (queue + 1) / (slots + 1);
# - CONTENTION: what sharing the node's steps with its busy slots adds, a full node's worth.
# So time = service * (1 + wait + CONTENTION * occupancy) / speed factor. Found by
# bench.mesh_sched: counting the wait in full-miss services sent a conversation's turn off its
# node whenever the node's two slots were busy, to recompute 1,400 tokens (18 s) elsewhere,
# while the turns ahead of it at home were 200-token hits.
DEFAULT_DECODE_PREFILL_RATIO = 10.0
RATIO_BOUNDS = (1.0, 1000.0)
CONTENTION = 0.25
# Candidates whose KV cache cache_aware can see: this node's worker, and peers (their gossip).
CACHE_KINDS = ("local", "mesh")
# cache_aware weighs a node's speed into its load: its tokens/s per busy slot against the median
# of the candidates that report one, bounded so that one noisy heartbeat cannot swamp the
# occupancy it scales (a node twice as fast as the others counts half as loaded).
SPEED_BOUNDS = (0.5, 2.0)


@frozen_record
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
    # cache_aware: the node that would serve (the same name on every entry node), how many
    # leading blocks of the request's prefix chain it holds, of how many, and its free slots and
    # queue (None and 0 when it does not report them).
    node_id: str = ""
    prefix_hit: int = 0
    prefix_blocks: int = 0
    slots_free: int | None = None
    queue_depth: int = 0
    # The serving node's slots and what it makes now (tokens/s over its last heartbeat): how
    # fast its busy slots drain (0 when it reports nothing, or is idle).
    slots_total: int = 0
    tokens_per_s: float = 0.0
    # Its engine's measured prefill tokens/s and decode tokens/s per stream (0.0: not measured).
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    # The request's size (the router's estimate; the same for every candidate): what prefill's
    # share of its service is (0: unknown, the prompt is all of it).
    prompt_tokens: int = 0
    output_tokens: int = 0


@frozen_record
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


@dataclass(frozen=True, slots=True)
class Affinity:
    """What rendezvous hashing keys a request on (`routing.prefix.request_prefix`)."""

    key: bytes = b""
    source: str = ""  # "session" | "opening" | "first block" | "whole prompt"


NO_AFFINITY = Affinity()

Strategy = Callable[[Sequence[Candidate], int, Affinity], list[Ranked]]


def _tiebreak(c: Candidate) -> tuple[int, int, str, str]:
    return (c.chain_index, c.offer.priority, c.offer.provider, c.offer.node or "")


def _sorted(ranked: list[Ranked]) -> list[Ranked]:
    return sorted(ranked, key=lambda r: (r.score, _tiebreak(r.candidate)))


def cost_optimized(candidates: Sequence[Candidate], turn: int = 0,
                   affinity: Affinity = NO_AFFINITY) -> list[Ranked]:
    """Cheapest estimated cost for this request; free local and peer offers win."""
    return _sorted([Ranked(c, c.estimated_cost, "cost_optimized") for c in candidates])


def latency_optimized(candidates: Sequence[Candidate], turn: int = 0,
                      affinity: Affinity = NO_AFFINITY) -> list[Ranked]:
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


def availability(candidates: Sequence[Candidate], turn: int = 0,
                 affinity: Affinity = NO_AFFINITY) -> list[Ranked]:
    """Follow the fallback chain, demoting whatever has been failing recently."""
    return _sorted([Ranked(c, round(c.error_rate, 2), "availability") for c in candidates])


def round_robin(candidates: Sequence[Candidate], turn: int = 0,
                affinity: Affinity = NO_AFFINITY) -> list[Ranked]:
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


def least_loaded(candidates: Sequence[Candidate], turn: int = 0,
                 affinity: Affinity = NO_AFFINITY) -> list[Ranked]:
    """Lowest load: the provider's own capacity report when it has one (local worker, peers'
    gossip), else our in-flight count over its concurrency limit."""
    return _sorted([Ranked(c, _load(c), "least_loaded") for c in candidates])


def rendezvous_weight(key: bytes, c: Candidate) -> int:
    """Highest-random-weight hashing: every entry node computes the same weight for a key and a
    serving node, so they agree on the winner without talking, and a node that leaves moves
    only the keys it won."""
    who = f"{c.node_id or c.offer.node or ''}/{c.offer.model}"
    digest = hashlib.blake2b(key, digest_size=8, person=b"meshnode-hrw")
    digest.update(who.encode())
    return int.from_bytes(digest.digest(), "big")


def _by_rendezvous(key: bytes, candidates: Sequence[Candidate]) -> dict[int, int]:
    """id(candidate) -> its place (0 = the winner) by rendezvous weight for `key`."""
    order = sorted(candidates, key=lambda c: (-rendezvous_weight(key, c), _tiebreak(c)))
    return {id(c): i for i, c in enumerate(order)}


def stream_speed(c: Candidate) -> float | None:
    """Tokens/s per busy slot: how fast this node serves each request it holds (None when it
    is idle or reports no rate: nothing to tell)."""
    if c.slots_free is None or c.slots_total <= 0 or c.tokens_per_s <= 0:
        return None
    busy = c.slots_total - c.slots_free
    return c.tokens_per_s / busy if busy > 0 else None


def speed_factors(candidates: Sequence[Candidate]) -> dict[int, float]:
    """id(candidate) -> its speed against the median speed of those that report one (1.0 for
    the rest, and for everyone when fewer than two report), within SPEED_BOUNDS."""
    speeds = {id(c): v for c in candidates if (v := stream_speed(c)) is not None}
    if len(speeds) < 2:
        return {id(c): 1.0 for c in candidates}
    ordered = sorted(speeds.values())
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    low, high = SPEED_BOUNDS
    return {id(c): min(high, max(low, speeds[id(c)] / median)) if id(c) in speeds else 1.0
            for c in candidates}


def weighed_loads(candidates: Sequence[Candidate]) -> dict[int, float]:
    """id(candidate) -> its load (busy slots and queue over slots) over its speed factor: what
    cache_aware weighs a hit against."""
    factors = speed_factors(candidates)
    return {id(c): _load(c) / factors[id(c)] for c in candidates}


def imbalanced(candidates: Sequence[Candidate],
               loads_by_id: dict[int, float] | None = None) -> bool:
    loads = (list(loads_by_id.values()) if loads_by_id is not None
             else [_load(c) for c in candidates])
    if len(loads) < 2:
        return False
    low, high = min(loads), max(loads)
    return high - low > BALANCE_ABS and high > BALANCE_REL * low


def decode_prefill_ratio(c: Candidate) -> float:
    """How many prompt tokens of prefill one decoded token costs as long as at this node: its
    measured prefill rate over its per-stream decode rate, within RATIO_BOUNDS (the default
    until it has measured both)."""
    if c.prefill_tokens_per_s <= 0 or c.decode_tokens_per_s <= 0:
        return DEFAULT_DECODE_PREFILL_RATIO
    low, high = RATIO_BOUNDS
    return min(high, max(low, c.prefill_tokens_per_s / c.decode_tokens_per_s))


def prefill_share(c: Candidate) -> float:
    """Prefill's share of the request's service at a node that holds none of it."""
    if c.prompt_tokens <= 0:
        return 1.0
    return c.prompt_tokens / (c.prompt_tokens
                              + decode_prefill_ratio(c) * max(0, c.output_tokens))


def slot_wait(c: Candidate) -> tuple[float, float]:
    """(the expected wait for a slot, the occupancy of the node's steps), in services: from its
    slots and queue when it reports them, else from its load (1.0: every slot busy)."""
    if c.slots_free is not None and c.slots_total > 0:
        busy = max(0, c.slots_total - c.slots_free)
        occupancy = min(1.0, busy / c.slots_total)
        if c.slots_free > 0 and c.queue_depth == 0:
            return 0.0, occupancy
        return (c.queue_depth + 1) / (c.slots_total + 1), occupancy
    load = _load(c)
    return max(0.0, load - 1.0), min(1.0, load)


def expected_time(c: Candidate, factor: float = 1.0) -> float:
    """The time to the answer at this candidate, in services at a median-speed node (lower is
    better): its service there (what prefill its hit does not save) times the wait and the
    steps it shares, over its speed factor."""
    wait, occupancy = slot_wait(c)
    service = 1.0 - prefill_share(c) * c.prefix_hit / max(1, c.prefix_blocks)
    return service * (1.0 + wait + CONTENTION * occupancy) / factor


def cache_aware(candidates: Sequence[Candidate], turn: int = 0,
                affinity: Affinity = NO_AFFINITY) -> list[Ranked]:
    """Where the request's KV cache is, unless that is lopsided.

    This node's local workers and peers (a peer serves with its own worker when it has one)
    are ranked first, the other candidates (cloud APIs, whose cache routing cannot see) after
    them as fallbacks, each group so:
    - Load lopsided (`imbalanced`): least loaded first, as balance comes before hits.
    - A session (`x-aiproxy-session`): rendezvous on its value, so every turn of it goes to
      the same node from every entry node.
    - Some candidate holds a leading part of the prompt: score = the expected time to the
      answer there (`expected_time`: the prefill its hit saves against the wait for a slot,
      in services; lower is better).
    - Nobody holds any of it: rendezvous on the conversation's opening (`routing.prefix`) among
      the nodes with the least wait for a slot (all of them while each has a free slot), so
      two entry nodes send a conversation's first turn to the same node and its later turns
      find their cache there, while conversations sharing a system prompt spread.
    Ties go by rendezvous place, then as every strategy breaks them.
    """
    workers = [c for c in candidates if c.offer.provider_kind in CACHE_KINDS]
    others = [c for c in candidates if c.offer.provider_kind not in CACHE_KINDS]
    tail = "; no KV cache routing can see: after the local workers" if workers else ""
    return _cache_group(workers, affinity, "") + _cache_group(others, affinity, tail)


def _cache_group(candidates: Sequence[Candidate], affinity: Affinity,
                 tail: str) -> list[Ranked]:
    if not candidates:
        return []
    place = _by_rendezvous(affinity.key, candidates)
    factors = speed_factors(candidates)
    loads = weighed_loads(candidates)

    def load(c: Candidate) -> float:
        return loads[id(c)]

    def ranked(score: Callable[[Candidate], float], note: str) -> list[Ranked]:
        rows = [Ranked(c, score(c), "cache_aware", note + tail) for c in candidates]
        return sorted(rows, key=lambda r: (r.score, place[id(r.candidate)],
                                           _tiebreak(r.candidate)))

    if imbalanced(candidates, loads):
        return ranked(load, f"load lopsided ({min(loads.values()):.2f}.."
                            f"{max(loads.values()):.2f}): balancing before cache hits")
    if affinity.source == "session":
        return ranked(lambda c: float(place[id(c)]), "session affinity (rendezvous on "
                                                     "x-aiproxy-session)")
    if any(c.prefix_hit for c in candidates):
        return ranked(lambda c: expected_time(c, factors[id(c)]),
                      "prefill saved weighed against the wait for a slot")
    return ranked(lambda c: slot_wait(c)[0] / factors[id(c)],
                  f"no node holds the prefix: rendezvous on the {affinity.source or 'request'} "
                  f"among the nodes with the least wait for a slot")


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


def _why_cache(c: Candidate, score: float) -> str:
    slots = f"{c.slots_free} slots free, " if c.slots_free is not None else ""
    speed = stream_speed(c)
    rate = f", {c.tokens_per_s:.1f} tok/s ({speed:.1f} a stream)" if speed is not None else ""
    wait, _ = slot_wait(c)
    measured = ("measured" if c.prefill_tokens_per_s > 0 and c.decode_tokens_per_s > 0
                else "default")
    return (f"prefix hit {c.prefix_hit}/{c.prefix_blocks} blocks, load {_load(c):.2f} "
            f"({slots}queue {c.queue_depth}{rate}), wait {wait:.2f} and prefill "
            f"{prefill_share(c):.2f} of a service (a decoded token = "
            f"{decode_prefill_ratio(c):.0f} prompt tokens, {measured})")


REASONS: dict[str, Callable[[Candidate, float], str]] = {
    "cost_optimized": _why_cost,
    "latency_optimized": _why_latency,
    "availability": _why_availability,
    "round_robin": _why_round_robin,
    "least_loaded": _why_load,
    "cache_aware": _why_cache,
}


STRATEGIES: dict[str, Strategy] = {
    "cost_optimized": cost_optimized,
    "latency_optimized": latency_optimized,
    "availability": availability,
    "round_robin": round_robin,
    "least_loaded": least_loaded,
    "cache_aware": cache_aware,
}


def rank(strategy: str, candidates: Sequence[Candidate], turn: int = 0,
         affinity: Affinity = NO_AFFINITY) -> list[Ranked]:
    return STRATEGIES[strategy](candidates, turn, affinity)


def demote(ranked: list[Ranked], cooled: set[tuple[str, str]], reason: str) -> list[Ranked]:
    """Move cooled-down candidates to the end (last resort), keeping the order otherwise."""
    ok = [r for r in ranked if r.candidate.offer.key not in cooled]
    late = [
        replace(r, note=f"{r.note}; {reason}" if r.note else reason)
        for r in ranked
        if r.candidate.offer.key in cooled
    ]
    return ok + late
