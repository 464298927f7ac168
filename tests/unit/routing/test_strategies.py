"""Strategies are pure: plain snapshots in, rankings out."""

from __future__ import annotations

from dataclasses import replace

from meshnode.routing.strategies import (
    DEFAULT_DECODE_PREFILL_RATIO,
    RATIO_BOUNDS,
    SPEED_BOUNDS,
    Affinity,
    Candidate,
    decode_prefill_ratio,
    demote,
    prefill_share,
    rank,
    slot_wait,
    speed_factors,
    stream_speed,
    weighed_loads,
)
from meshnode.types import ModelOffer


def cand(provider: str, *, chain: int = 0, cost: float = 0.0, latency: float | None = None,
         errors: float = 0.0, in_flight: int = 0, load: float | None = None) -> Candidate:
    offer = ModelOffer(model="m", provider=provider, provider_kind="openai", upstream_model="m")
    return Candidate(offer=offer, chain_index=chain, estimated_cost=cost, latency_ms=latency,
                     error_rate=errors, in_flight=in_flight, load=load)


def names(ranking) -> list[str]:
    return [r.candidate.offer.provider for r in ranking]


def test_cost_optimized_prefers_cheapest_then_chain_order() -> None:
    cs = [cand("a", chain=0, cost=0.5), cand("b", chain=1, cost=0.0), cand("c", chain=2, cost=0.0)]
    assert names(rank("cost_optimized", cs)) == ["b", "c", "a"]


def test_latency_optimized_measures_unknown_once_and_penalises_errors() -> None:
    cs = [cand("slow", latency=200.0), cand("fast", latency=20.0), cand("new")]
    assert names(rank("latency_optimized", cs)) == ["new", "fast", "slow"]
    flaky = [cand("fast-flaky", latency=10.0, errors=0.5), cand("steady", latency=100.0)]
    assert names(rank("latency_optimized", flaky)) == ["steady", "fast-flaky"]


def test_availability_follows_chain_unless_failing() -> None:
    cs = [cand("first", chain=0, errors=0.6), cand("second", chain=1), cand("third", chain=2)]
    assert names(rank("availability", cs)) == ["second", "third", "first"]


def test_round_robin_rotates_with_the_turn() -> None:
    cs = [cand("a", chain=0), cand("b", chain=1), cand("c", chain=2)]
    assert names(rank("round_robin", cs, 0)) == ["a", "b", "c"]
    assert names(rank("round_robin", cs, 1)) == ["b", "c", "a"]
    assert names(rank("round_robin", cs, 5)) == ["c", "a", "b"]


def test_least_loaded_uses_reported_load_or_in_flight() -> None:
    cs = [cand("busy", load=0.9), cand("idle", load=0.1), cand("cloud", in_flight=128)]
    assert names(rank("least_loaded", cs)) == ["idle", "cloud", "busy"]


def test_demote_moves_cooled_candidates_last_with_reason() -> None:
    cs = [cand("a", cost=0.0), cand("b", cost=1.0)]
    ranking = demote(rank("cost_optimized", cs), {("a", "m")}, "cooling down")
    assert names(ranking) == ["b", "a"]
    assert "cooling down" in ranking[1].reason


# ------------------------------------------------------------------ cache_aware
def node(name: str, *, hit: int = 0, blocks: int = 8, load: float = 0.2, via: str = "",
         chain: int = 0) -> Candidate:
    """The local worker on node `name`, as an entry node sees it: its own (`via` empty: the
    local provider) or a peer's (`via` the entry node: offered through the mesh)."""
    offer = ModelOffer(model="m", provider="mesh" if via else "w",
                       provider_kind="mesh" if via else "local", upstream_model="m",
                       node=name if via else None)
    return Candidate(offer=offer, chain_index=chain, estimated_cost=0.0, latency_ms=None,
                     error_rate=0.0, in_flight=0, load=load, node_id=name, prefix_hit=hit,
                     prefix_blocks=blocks, slots_free=4, queue_depth=0)


def winner(ranking) -> str:
    return ranking[0].candidate.node_id


def key(i: int) -> Affinity:
    return Affinity(f"first-block-{i}".encode(), "first block")


def test_cache_aware_prefers_the_node_holding_the_longest_prefix() -> None:
    cs = [node("a", hit=0, load=0.0), node("b", hit=6, load=0.3), node("c", hit=2, load=0.1)]
    ranking = rank("cache_aware", cs, 0, key(1))
    assert [r.candidate.node_id for r in ranking] == ["b", "c", "a"]
    assert "prefix hit 6/8 blocks, load 0.30" in ranking[0].reason
    assert "weighed against the wait for a slot" in ranking[0].reason


def worker(name: str, *, hit: int = 0, slots: int = 2, busy: int = 0, queue: int = 0,
           prompt: int = 1000, out: int = 8) -> Candidate:
    """A node reporting its slots and queue, for a request of `prompt` and `out` tokens."""
    return replace(node(name, hit=hit, load=(busy + queue) / slots), slots_total=slots,
                   slots_free=slots - busy, queue_depth=queue, prompt_tokens=prompt,
                   output_tokens=out)


def test_slot_wait_is_nothing_while_a_slot_is_free_then_a_share_of_a_service() -> None:
    assert slot_wait(worker("a", slots=4, busy=3)) == (0.0, 0.75)
    # Every slot busy: the first of the 4 to finish, each uniformly far along: 1/5.
    assert slot_wait(worker("a", slots=4, busy=4)) == (0.2, 1.0)
    assert slot_wait(worker("a", slots=4, busy=4, queue=2)) == (0.6, 1.0)
    # Without slots: the load beyond 1.0 (every slot busy) is the queue, in services.
    assert slot_wait(node("a", load=1.5)) == (0.5, 1.0)
    # Prefill's share of a service: the whole of it unknown, less with long answers.
    assert prefill_share(node("a")) == 1.0
    assert prefill_share(worker("a", prompt=1000, out=100)) == 0.5


def test_cache_aware_a_hit_is_worth_the_prefill_it_saves_against_the_wait() -> None:
    # A free slot: no wait, so even a small hit keeps the holder, though it is busier.
    small = [worker("holder", hit=1, slots=4, busy=1), worker("idle", slots=4)]
    assert all(winner(rank("cache_aware", small, 0, key(i))) == "holder" for i in range(20))
    # Every slot taken: the wait (a fifth of a service) and the shared steps are more than an
    # eighth of the prefill; another node recomputes it sooner. (Not lopsided: load 1.0 to 0.)
    full = [worker("holder", hit=1, slots=4, busy=4), worker("idle", slots=4)]
    assert all(winner(rank("cache_aware", full, 0, key(i))) == "idle" for i in range(20))
    assert "lopsided" not in rank("cache_aware", full, 0, key(1))[0].reason
    # The whole prompt held is worth that wait.
    whole = [worker("holder", hit=8, slots=4, busy=4), worker("idle", slots=4)]
    assert all(winner(rank("cache_aware", whole, 0, key(i))) == "holder" for i in range(20))
    # ... unless the answer, not the prompt, is most of the work: then the hit saves little.
    long = [worker("holder", hit=8, slots=4, busy=4, out=1000), worker("idle", slots=4, out=1000)]
    assert all(winner(rank("cache_aware", long, 0, key(i))) == "idle" for i in range(20))
    assert "wait 0.20 and prefill 0.93 of a service" in rank("cache_aware", whole, 0,
                                                              key(1))[0].reason


def rated(c: Candidate, prefill: float, decode: float) -> Candidate:
    """The node's measured prefill tokens/s and decode tokens/s per stream."""
    return replace(c, prefill_tokens_per_s=prefill, decode_tokens_per_s=decode)


def test_the_decode_prefill_ratio_is_the_nodes_measured_one_within_bounds() -> None:
    plain = worker("a", prompt=1000, out=100)
    assert decode_prefill_ratio(plain) == DEFAULT_DECODE_PREFILL_RATIO
    # Only one of the two measured: still the default.
    assert decode_prefill_ratio(rated(plain, 400.0, 0.0)) == DEFAULT_DECODE_PREFILL_RATIO
    assert decode_prefill_ratio(rated(plain, 0.0, 20.0)) == DEFAULT_DECODE_PREFILL_RATIO
    # A CPU worker: 400 prompt tokens/s, 20 tokens/s a stream: a decoded token is 20 of prefill.
    cpu = rated(plain, 400.0, 20.0)
    assert decode_prefill_ratio(cpu) == 20.0
    assert prefill_share(cpu) == 1000 / (1000 + 20 * 100)
    # Bounded both ways: a decode faster than prefill per token, a noisy huge prefill rate.
    assert decode_prefill_ratio(rated(plain, 10.0, 50.0)) == RATIO_BOUNDS[0]
    assert decode_prefill_ratio(rated(plain, 1e9, 1.0)) == RATIO_BOUNDS[1]
    reasons = {r.candidate.node_id: r.reason for r in rank(
        "cache_aware", [cpu, worker("b", prompt=1000, out=100)], 0, key(1))}
    assert "(a decoded token = 20 prompt tokens, measured)" in reasons["a"]
    assert "(a decoded token = 10 prompt tokens, default)" in reasons["b"]


def test_cache_aware_weighs_a_hit_by_the_nodes_measured_prefill_speed() -> None:
    # The whole prompt held, every slot busy, against an idle node (as above): with a CPU's
    # ratio the prefill is most of the service, so the hit is worth the wait ...
    cpu = [rated(worker("holder", hit=8, slots=4, busy=4), 200.0, 20.0),
           rated(worker("idle", slots=4), 200.0, 20.0)]
    assert all(winner(rank("cache_aware", cpu, 0, key(i))) == "holder" for i in range(20))
    # ... on a GPU (20,000 prompt tokens/s, 20 a stream) prefill is cheap and decode is the
    # service: the hit saves a ninth of it, less than the wait, so the idle node serves.
    gpu = [rated(c, 20_000.0, 20.0) for c in cpu]
    assert all(winner(rank("cache_aware", gpu, 0, key(i))) == "idle" for i in range(20))


def test_cache_aware_a_later_turn_goes_home_unless_home_is_lopsided() -> None:
    # Its own node holds the conversation (7 blocks of 8), the others only the shared system
    # prompt (5 of 8): home wins while it has a free slot ...
    home, others = worker("home", hit=7, busy=1), [worker("b", hit=5), worker("c", hit=5)]
    assert winner(rank("cache_aware", [home, *others], 0, key(1))) == "home"
    # ... and with every slot busy: the turns ahead of it are hits like itself, done sooner
    # than recomputing 2 blocks elsewhere.
    full = worker("home", hit=7, busy=2)
    assert winner(rank("cache_aware", [full, *others], 0, key(1))) == "home"
    # With a whole batch queued beyond the others, it balances first.
    queued = worker("home", hit=7, busy=2, queue=2)
    assert winner(rank("cache_aware", [queued, *others], 0, key(1))) in ("b", "c")
    # Where only one node holds the shared system prompt too, a node that holds a part of
    # the prompt serves sooner than a node holding nothing whose slots are all busy.
    held = [worker("b", hit=5), worker("c", busy=2)]
    assert winner(rank("cache_aware", held, 0, key(1))) == "b"


def test_cache_aware_with_no_hit_a_full_rendezvous_winner_yields_to_a_free_node() -> None:
    cs = [worker("a"), worker("b"), worker("c")]
    for i in range(30):
        first = winner(rank("cache_aware", cs, 0, key(i)))
        filled = [replace(c, slots_free=0) if c.node_id == first else c for c in cs]
        ranking = rank("cache_aware", filled, 0, key(i))
        assert winner(ranking) != first and "least wait for a slot" in ranking[0].reason


def test_cache_aware_balances_first_when_load_is_lopsided() -> None:
    cs = [node("holder", hit=8, load=1.4), node("idle", hit=0, load=0.1)]
    ranking = rank("cache_aware", cs, 0, key(1))
    assert winner(ranking) == "idle"
    assert "lopsided" in ranking[0].reason
    # Within the threshold the full hit wins again.
    even = [node("holder", hit=8, load=0.5), node("idle", hit=0, load=0.1)]
    assert winner(rank("cache_aware", even, 0, key(1))) == "holder"
    # Every slot busy is not lopsided: the holder admits the turn at its next step, while the
    # idle node would recompute the whole prompt.
    full = [node("holder", hit=8, load=1.0), node("idle", hit=0, load=0.0)]
    assert winner(rank("cache_aware", full, 0, key(1))) == "holder"
    # A batch and a half queued beyond the idle node's is.
    queued = [node("holder", hit=8, load=1.5), node("idle", hit=0, load=0.0)]
    assert winner(rank("cache_aware", queued, 0, key(1))) == "idle"


def test_cache_aware_rendezvous_agrees_across_entry_nodes_and_spreads() -> None:
    nodes = ["a", "b", "c", "d"]
    # Entry node a sees its own worker locally and the rest through the mesh; entry node c the
    # same from its side, in another order and another fallback chain position.
    from_a = [node(n, via="" if n == "a" else "a", chain=0 if n == "a" else 1) for n in nodes]
    from_c = [node(n, via="" if n == "c" else "c", chain=0 if n == "c" else 1)
              for n in reversed(nodes)]
    picks = {}
    for i in range(200):
        one = winner(rank("cache_aware", from_a, 0, key(i)))
        assert one == winner(rank("cache_aware", from_c, 0, key(i)))
        assert one == winner(rank("cache_aware", from_a, 7, key(i)))  # the turn plays no part
        picks[i] = one
    assert "rendezvous on the first block" in rank("cache_aware", from_a, 0, key(0))[0].reason
    share = {n: sum(1 for p in picks.values() if p == n) for n in nodes}
    assert all(20 <= s <= 80 for s in share.values()), share  # each about a quarter of 200


def test_cache_aware_a_dead_node_moves_only_its_share() -> None:
    everyone = [node(n) for n in ("a", "b", "c", "d")]
    without_b = [c for c in everyone if c.node_id != "b"]
    moved = 0
    for i in range(200):
        before = winner(rank("cache_aware", everyone, 0, key(i)))
        after = winner(rank("cache_aware", without_b, 0, key(i)))
        if before != "b":
            assert after == before
        else:
            moved += 1
    assert 20 <= moved <= 80


def test_cache_aware_session_affinity_keeps_a_session_on_one_node() -> None:
    cs = [node("a", hit=8), node("b"), node("c")]
    homes = set()
    for turn in range(5):
        s = Affinity(b"session\0user-42", "session")
        ranking = rank("cache_aware", cs, turn, s)
        homes.add(winner(ranking))
        assert "session affinity" in ranking[0].reason
    assert len(homes) == 1
    others = {winner(rank("cache_aware", cs, 0, Affinity(f"session\0u{i}".encode(), "session")))
              for i in range(40)}
    assert others == {"a", "b", "c"}  # sessions spread, whatever a holds
    # A session does not pin a node that is drowning.
    (home,) = homes
    drowning = [node(n, load=2.0 if n == home else 0.1) for n in ("a", "b", "c")]
    assert winner(rank("cache_aware", drowning, 0, Affinity(b"session\0user-42", "session"))) \
        != home


def test_cache_aware_ranks_cloud_apis_after_the_local_workers() -> None:
    cloud = cand("openai", load=0.0)
    workers = [node("a", load=0.4), node("b", load=0.45)]
    for i in range(30):
        ranking = rank("cache_aware", [cloud, *workers], 0, key(i))
        assert ranking[-1].candidate is cloud
        assert "after the local workers" in ranking[-1].reason
    # Only cloud candidates: ranked among themselves as usual (no local tail note).
    only = rank("cache_aware", [cand("x"), cand("y")], 0, key(1))
    assert len(only) == 2 and "after the local workers" not in only[0].reason


# ------------------------------------------------------------------ cache_aware: tokens/s
def busy(c: Candidate, *, slots: int, free: int, tps: float) -> Candidate:
    return replace(c, slots_total=slots, slots_free=free, tokens_per_s=tps,
                   load=(slots - free) / slots)


def test_stream_speed_is_tokens_per_s_per_busy_slot_and_unknown_when_idle() -> None:
    assert stream_speed(busy(node("a"), slots=4, free=2, tps=30.0)) == 15.0
    assert stream_speed(busy(node("a"), slots=4, free=4, tps=0.0)) is None  # idle: no news
    assert stream_speed(node("a")) is None  # reports no rate
    assert stream_speed(replace(node("a"), slots_free=None, slots_total=4,
                                tokens_per_s=9.0)) is None


def test_speed_factors_are_against_the_median_and_bounded() -> None:
    slow = busy(node("slow"), slots=2, free=1, tps=10.0)
    mid = busy(node("mid"), slots=2, free=1, tps=20.0)
    rocket = busy(node("rocket"), slots=2, free=1, tps=2000.0)
    quiet = node("quiet")  # no rate reported: neither helped nor punished
    factors = speed_factors([slow, mid, rocket, quiet])
    assert factors[id(slow)] == 0.5 and factors[id(mid)] == 1.0 and factors[id(quiet)] == 1.0
    assert factors[id(rocket)] == SPEED_BOUNDS[1]
    # One node alone reporting has nobody to be compared with.
    assert set(speed_factors([slow, quiet]).values()) == {1.0}
    loads = weighed_loads([slow, mid, rocket])
    assert loads[id(slow)] == 1.0 and loads[id(mid)] == 0.5  # both half busy, slow counts double
    assert loads[id(rocket)] == 0.25


def test_cache_aware_a_faster_node_counts_less_loaded() -> None:
    # Same hit, same occupancy: the node making twice the tokens/s a stream wins, whatever the
    # rendezvous order of the key.
    for i in range(20):
        fast = busy(node("fast", hit=4), slots=4, free=2, tps=40.0)
        slow = busy(node("slow", hit=4), slots=4, free=2, tps=20.0)
        ranking = rank("cache_aware", [slow, fast], 0, key(i))
        assert winner(ranking) == "fast"
        assert "40.0 tok/s (20.0 a stream)" in ranking[0].reason
    # Without rates the same two tie on load and the rendezvous decides: both win some keys.
    plain = {winner(rank("cache_aware", [node("fast", hit=4, load=0.5),
                                         node("slow", hit=4, load=0.5)], 0, key(i)))
             for i in range(20)}
    assert plain == {"fast", "slow"}


def test_cache_aware_speed_shifts_the_balance_threshold() -> None:
    # Equal occupancy is lopsided once one node drains four times slower: against the median
    # (7.5 tok/s a stream) 0.75 / 0.5 (the lower bound) = 1.5 and 0.75 / 1.6 = 0.47: balance
    # first, to the fast one, even though the slow one holds the whole prefix.
    slow = busy(node("slow", hit=8), slots=4, free=1, tps=3.0)
    fast = busy(node("fast", hit=0), slots=4, free=1, tps=12.0)
    ranking = rank("cache_aware", [slow, fast], 0, key(1))
    assert winner(ranking) == "fast" and "lopsided" in ranking[0].reason
