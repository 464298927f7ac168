"""The pure parts of the 1,000-node scheduling simulation (bench/mesh_sched_sim.py), and a small
run of it with the real strategies."""

from __future__ import annotations

import time

import pytest

from bench.mesh_sched_sim import (
    BlockCache,
    Params,
    conversation_chain,
    load_spread,
    simulate,
)


def test_a_conversation_chain_grows_by_turn_and_shares_its_groups_head() -> None:
    one = conversation_chain(0, 3, conversation=1, turn=0, system_blocks=4, turn_blocks=2)
    later = conversation_chain(0, 3, conversation=1, turn=2, system_blocks=4, turn_blocks=2)
    other = conversation_chain(0, 3, conversation=2, turn=0, system_blocks=4, turn_blocks=2)
    assert len(one) == 6 and len(later) == 10 and later[:6] == one
    assert other[:4] == one[:4] and other[4:] != one[4:]  # same system prompt, own turns
    assert conversation_chain(1, 3, 1, 0, 4, 2)[0] != one[0]  # another model's prompt


def test_the_block_cache_is_lru_and_evicts_a_chains_tail_first() -> None:
    cache = BlockCache(capacity=6)
    head = conversation_chain(0, 0, 1, 0, system_blocks=4, turn_blocks=2)
    cache.store(head)
    assert cache.hits(head) == 6
    cache.store(conversation_chain(0, 0, 2, 0, system_blocks=4, turn_blocks=2))  # same head
    assert len(cache) == 6
    assert cache.hits(head) == 4  # conversation 1's own blocks went; the shared head stayed
    assert cache.recent(limit=2) == frozenset(head[:2])  # the head is the most recent


def test_load_spread_is_the_coefficient_of_variation_and_the_max() -> None:
    assert load_spread([]) == (0.0, 0.0)
    assert load_spread([0.5, 0.5, 0.5]) == (0.0, 0.5)
    cv, peak = load_spread([0.0, 1.0])
    assert cv == pytest.approx(1.0) and peak == 1.0


def test_a_small_simulation_cache_aware_finds_more_and_survives_churn() -> None:
    p = Params(nodes=60, models=3, seconds=30.0, seed=3)
    deadline = time.monotonic() + 30
    rr = [w.row() for w in simulate("round_robin", p, deadline)]
    ca = [w.row() for w in simulate("cache_aware", p, deadline)]
    for before, after in zip(rr, ca, strict=True):
        assert after["turns"] > 0 and after["hit_rate"] > before["hit_rate"]
    # Deaths in the second window: requests sent to a node the mesh did not know was dead yet
    # went on to the next candidate.
    assert ca[1]["failovers"] > 0 or ca[1]["failed"] > 0


def test_the_simulation_stops_at_its_deadline() -> None:
    with pytest.raises(TimeoutError):
        simulate("cache_aware", Params(nodes=60, models=3, seconds=30.0), time.monotonic())
