"""Mesh scheduling, simulated at 1,000 nodes: the real strategies over a simulated load and cache.

    python -m bench.mesh_sched_sim [--nodes 1000] [--seconds 120] [--seed 1] [--time-limit-s 50]

What is real: the ranking (`meshnode.routing.strategies`: round_robin, least_loaded,
cache_aware with its rendezvous, balance threshold and tokens/s weighing), the `Candidate`s it
ranks and the prefix matching (`routing.prefix.leading_hits`). What is simulated:
- the mesh: `--nodes` nodes, each offering one of `--models` models with `--slots` slots and an
  LRU cache of `--cache-blocks` prefix blocks; a fifth of them are twice as fast;
- gossip: every 0.5 s each node's load (busy slots, queue, tokens/s) and its most recent 512
  held names are what entry nodes see until the next tick (stale in between, as in the mesh);
- the traffic: conversations arrive at random entry nodes (Poisson); each belongs to a group
  sharing a system prompt of `--system-blocks` blocks, adds `--turn-blocks` blocks a turn, and
  thinks `--think-s` between turns;
- the service: a turn waits for a slot, then prefills the blocks its node's cache does not hold
  (`--prefill-s` a block) and decodes (`--decode-s`), both divided by the node's speed;
- churn: at half time a tenth of the nodes die (requests sent to a dead node before the mesh
  knows, 2 s, fail over to the next ranked candidate); at three quarters as many new, empty
  nodes join.
Per strategy and window (the first quarter warms up; then steady, after the deaths, after the
joins, a quarter each; a turn counts in the window it arrives in): prefix hit rate (cached
over prompt blocks), simulated TTFT p50/p95, and load spread (the coefficient of variation and
the max of busy+queued over slots across live nodes, sampled at each gossip tick).
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import random
import statistics
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from meshnode.routing.prefix import MAX_NAMES, leading_hits
from meshnode.routing.strategies import Affinity, Candidate, rank
from meshnode.types import ModelOffer

STRATEGIES = ("round_robin", "least_loaded", "cache_aware")
GOSSIP_S = 0.5
DETECT_S = 2.0
TOKENS_PER_TURN = 16.0  # what a decode makes, for the tokens/s a node reports


# --------------------------------------------------------------------------- the pure parts
class BlockCache:
    """A node's prefix cache: LRU over chained block names, a chain refreshed last to first
    (as the engine's store), so a conversation's tail goes before its shared head."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._held: OrderedDict[bytes, None] = OrderedDict()

    def __contains__(self, name: object) -> bool:
        return name in self._held

    def __len__(self) -> int:
        return len(self._held)

    def hits(self, chain: list[bytes]) -> int:
        return leading_hits(chain, self._held)

    def store(self, chain: list[bytes]) -> None:
        for name in reversed(chain[:self.capacity]):
            self._held[name] = None
            self._held.move_to_end(name)
        while len(self._held) > self.capacity:
            self._held.popitem(last=False)

    def recent(self, limit: int = MAX_NAMES) -> frozenset[bytes]:
        out: list[bytes] = []
        for name in reversed(self._held):
            if len(out) >= limit:
                break
            out.append(name)
        return frozenset(out)


def block_name(*parts: object) -> bytes:
    return hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()


def conversation_chain(model: int, group: int, conversation: int, turn: int,
                       system_blocks: int, turn_blocks: int) -> list[bytes]:
    """The prompt's block names at `turn`: the group's system prompt, then the conversation's
    own blocks (which name everything before them, as chained names do)."""
    head = [block_name("sys", model, group, i) for i in range(system_blocks)]
    own = [block_name("conv", conversation, j) for j in range((turn + 1) * turn_blocks)]
    return head + own


def load_spread(loads: list[float]) -> tuple[float, float]:
    """(coefficient of variation, max) of per-node loads; (0, 0) when there are none."""
    if not loads:
        return 0.0, 0.0
    mean = statistics.fmean(loads)
    cv = statistics.pstdev(loads) / mean if mean > 0 else 0.0
    return cv, max(loads)


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * (len(ordered) - 1) + 0.5))]


# --------------------------------------------------------------------------- the simulation
@dataclass
class SimNode:
    name: str
    model: int
    slots: int
    speed: float
    cache: BlockCache
    offer: ModelOffer
    alive: bool = True
    died_at: float = -1.0
    busy: int = 0
    queue: list[Job] = field(default_factory=list)
    # What the mesh last heard (gossip tick): load, tokens/s, held names.
    seen_busy: int = 0
    seen_queue: int = 0
    seen_tps: float = 0.0
    seen_names: frozenset[bytes] = frozenset()
    dirty: bool = True


@dataclass
class Job:
    conversation: int
    turn: int
    chain: list[bytes]
    arrived: float
    window: int
    node: SimNode | None = None


@dataclass
class Window:
    prompt_blocks: int = 0
    cached_blocks: int = 0
    ttft: list[float] = field(default_factory=list)
    cv: list[float] = field(default_factory=list)
    peak: float = 0.0
    failovers: int = 0
    failed: int = 0

    def row(self) -> dict[str, float]:
        return {"hit_rate": self.cached_blocks / self.prompt_blocks if self.prompt_blocks else 0.0,
                "ttft_p50_s": pct(self.ttft, 50), "ttft_p95_s": pct(self.ttft, 95),
                "load_cv": statistics.fmean(self.cv) if self.cv else 0.0,
                "load_max": self.peak, "turns": len(self.ttft), "failovers": self.failovers,
                "failed": self.failed}


@dataclass(frozen=True)
class Params:
    nodes: int = 1000
    models: int = 20
    slots: int = 2
    cache_blocks: int = 64
    groups_per_model: int = 10
    system_blocks: int = 8
    turn_blocks: int = 2
    turns: int = 5
    think_s: float = 10.0
    prefill_s: float = 0.4
    decode_s: float = 6.0
    utilisation: float = 0.55
    seconds: float = 60.0
    seed: int = 1


def _make_node(i: int, p: Params, rng: random.Random) -> SimNode:
    model = i % p.models
    name = f"n{i}"
    offer = ModelOffer(model=f"m{model}", provider="mesh", provider_kind="mesh",
                       upstream_model=f"m{model}", node=name)
    speed = 2.0 if rng.random() < 0.2 else 1.0
    return SimNode(name, model, p.slots, speed, BlockCache(p.cache_blocks), offer)


def simulate(strategy: str, p: Params, deadline: float) -> list[Window]:
    rng = random.Random(p.seed)
    nodes = [_make_node(i, p, rng) for i in range(p.nodes)]
    by_model: dict[int, list[SimNode]] = {}
    for n in nodes:
        by_model.setdefault(n.model, []).append(n)
    # A warm-up quarter (not reported), then: steady, after the deaths, after the joins.
    windows = [Window(), Window(), Window(), Window()]
    quarter = p.seconds / 4
    # The arrival rate that keeps the slots `utilisation` busy when nothing is ever cached (the
    # mean prompt: the system prompt and half the turns' blocks): a cache only lowers it.
    mean_blocks = p.system_blocks + p.turn_blocks * (p.turns + 1) / 2
    turns_per_s = p.utilisation * p.nodes * p.slots / (p.decode_s + p.prefill_s * mean_blocks)
    conv_rate = turns_per_s / p.turns
    events: list[tuple[float, int, str, object]] = []
    seq = 0

    def push(at: float, kind: str, what: object) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (at, seq, kind, what))

    conversations = 0
    t = rng.expovariate(conv_rate)
    while t < p.seconds:
        push(t, "turn", (conversations, 0, rng.randrange(p.models),
                         rng.randrange(p.groups_per_model)))
        conversations += 1
        t += rng.expovariate(conv_rate)
    tick = 0.0
    while tick < p.seconds:
        push(tick, "gossip", None)
        tick += GOSSIP_S
    push(2 * quarter, "kill", None)
    push(3 * quarter, "join", None)
    turn_counter: dict[str, int] = {}

    def window_of(now: float) -> int:
        return min(3, int(now // quarter))

    def start(node: SimNode, job: Job, now: float) -> None:
        node.busy += 1
        cached = node.cache.hits(job.chain)
        w = windows[job.window]
        w.prompt_blocks += len(job.chain)
        w.cached_blocks += cached
        prefill = (len(job.chain) - cached) * p.prefill_s / node.speed
        w.ttft.append(now - job.arrived + prefill)
        node.cache.store(job.chain)  # the prompt's blocks are held once prefilled
        node.dirty = True
        push(now + prefill + p.decode_s / node.speed, "done", job)

    def candidates(model: int, chain: list[bytes], now: float) -> list[Candidate]:
        out = []
        for n in by_model[model]:
            if not n.alive and now - n.died_at >= DETECT_S:
                continue  # the mesh knows it is dead
            out.append(Candidate(
                offer=n.offer, chain_index=0, estimated_cost=0.0, latency_ms=None,
                error_rate=0.0, in_flight=0,
                load=(n.seen_busy + n.seen_queue) / n.slots, node_id=n.name,
                slots_free=n.slots - n.seen_busy, queue_depth=n.seen_queue,
                slots_total=n.slots, tokens_per_s=n.seen_tps,
                prefix_hit=leading_hits(chain, n.seen_names), prefix_blocks=len(chain)))
        return out

    while events:
        now, _, kind, what = heapq.heappop(events)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{strategy}: simulation ran out of time at t={now:.0f}s")
        if kind == "turn":
            conversation, turn, model, group = what  # type: ignore[misc]
            chain = conversation_chain(model, group, conversation, turn, p.system_blocks,
                                       p.turn_blocks)
            job = Job(conversation, turn, chain, now, window_of(now))
            entry = rng.choice(nodes).name
            # Each entry node's own turn counter, from wherever its traffic so far left it.
            turn_counter[entry] = turn_counter.get(entry, rng.randrange(1 << 16)) + 1
            cands = candidates(model, chain, now)
            index = {n.name: n for n in by_model[model]}
            # Keyed on the conversation's opening (its system prompt and first turn), as
            # `routing.prefix.request_prefix` keys a chat.
            opening = chain[p.system_blocks + p.turn_blocks - 1]
            ranking = rank(strategy, cands, turn_counter[entry], Affinity(opening, "opening"))
            for position, ranked in enumerate(ranking):
                node = index[ranked.candidate.node_id]
                if node.alive:
                    windows[job.window].failovers += position
                    job.node = node
                    if node.busy < node.slots:
                        start(node, job, now)
                    else:
                        node.queue.append(job)
                    break
            else:
                windows[job.window].failed += 1
            if turn + 1 < p.turns and now + p.think_s < p.seconds:
                push(now + p.think_s, "turn", (conversation, turn + 1, model, group))
        elif kind == "done":
            job = what  # type: ignore[assignment]
            node = job.node
            assert node is not None
            if not node.alive:
                continue
            node.busy -= 1
            if node.queue:
                start(node, node.queue.pop(0), now)
        elif kind == "gossip":
            loads = []
            for n in nodes:
                if not n.alive:
                    continue
                n.seen_busy, n.seen_queue = n.busy, len(n.queue)
                n.seen_tps = n.busy * TOKENS_PER_TURN * n.speed / p.decode_s
                if n.dirty:
                    n.seen_names, n.dirty = n.cache.recent(), False
                loads.append((n.busy + len(n.queue)) / n.slots)
            cv, peak = load_spread(loads)
            w = windows[window_of(now)]
            w.cv.append(cv)
            w.peak = max(w.peak, peak)
        elif kind == "kill":
            for n in rng.sample([n for n in nodes if n.alive], p.nodes // 10):
                n.alive, n.died_at = False, now
                windows[window_of(now)].failed += n.busy + len(n.queue)
                n.busy, n.queue = 0, []
        elif kind == "join":
            for _ in range(p.nodes // 10):
                node = _make_node(len(nodes), p, rng)
                nodes.append(node)
                by_model[node.model].append(node)
    return windows[1:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0, help="simulated time")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--time-limit-s", type=float, default=50.0, help="wall clock, all runs")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    p = Params(nodes=args.nodes, seconds=args.seconds, seed=args.seed)
    deadline = time.monotonic() + args.time_limit_s
    results: dict[str, list[dict[str, float]]] = {}
    for strategy in STRATEGIES:
        began = time.monotonic()
        results[strategy] = [w.row() for w in simulate(strategy, p, deadline)]
        print(f"  {strategy}: {time.monotonic() - began:.1f}s", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    names = ("steady", "after 10% die", "after 10% join")
    print(f"{p.nodes} nodes, {p.models} models, {p.slots} slots, cache {p.cache_blocks} blocks, "
          f"{p.seconds:.0f} s simulated, offered load {p.utilisation:.0%} of the slots "
          "without any cache hit")
    print("| strategy | window | hit rate | TTFT p50 s | TTFT p95 s | load CV | load max "
          "| turns | failovers | failed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for strategy, rows in results.items():
        for name, r in zip(names, rows, strict=True):
            print(f"| {strategy} | {name} | {r['hit_rate']:.0%} | {r['ttft_p50_s']:.2f} "
                  f"| {r['ttft_p95_s']:.2f} | {r['load_cv']:.2f} | {r['load_max']:.2f} "
                  f"| {r['turns']} | {r['failovers']} | {r['failed']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
