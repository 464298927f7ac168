"""Strategies are pure: plain snapshots in, rankings out."""

from __future__ import annotations

from meshnode.routing.strategies import Candidate, demote, rank
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
