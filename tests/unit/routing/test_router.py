"""The router's failover loop, cooldowns, policies and stream commit, over FakeProviders."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest

from meshnode.config import (
    CooldownConfig,
    FailoverConfig,
    PolicyConfig,
    PolicyMatch,
    RoutingConfig,
)
from meshnode.errors import (
    DeadlineExceeded,
    ModelNotFound,
    NoCapacity,
    StreamBroken,
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from meshnode.providers.fake import BreakAfter, FakeProvider, Hang
from meshnode.routing.policy import carried_constraint
from meshnode.routing.router import Router
from meshnode.types import (
    Capacity,
    InferenceRequest,
    ModelOffer,
    PolicyConstraint,
    RequestKind,
    Usage,
)
from tests.kit.wait import wait_for


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def request(model: str = "m", *, stream: bool = False, deadline_s: float = 5.0,
            headers: dict[str, str] | None = None, visited: tuple[str, ...] = ()) -> InferenceRequest:
    return InferenceRequest(
        kind=RequestKind.CHAT, model=model, body={"messages": [{"role": "user", "content": "hi"}]},
        request_id="r1", deadline=time.monotonic() + deadline_s, stream=stream,
        headers=headers or {}, visited=visited,
    )


def routing(**kw) -> RoutingConfig:
    failover = kw.pop("failover", FailoverConfig(
        backoff={"initial_ms": 1, "max_ms": 2, "multiplier": 2.0, "jitter": 0.0}))
    return RoutingConfig(failover=failover, **kw)


async def test_cheapest_provider_serves_and_outcome_is_reported() -> None:
    cheap, dear = FakeProvider("cheap", cost_per_1k=0.001), FakeProvider("dear", cost_per_1k=0.01)
    router = Router(routing(), ["dear", "cheap"], [dear, cheap], "n1")
    routed = await router.complete(request())
    assert routed.served.offer.provider == "cheap"
    assert routed.served.node == "n1"
    assert [a.outcome for a in routed.served.attempts] == ["ok"]
    assert routed.served.cost == pytest.approx((10 + 3) * 0.001 / 1000)
    assert len(dear.calls) == 0


async def test_retryable_failure_fails_over_to_next_candidate() -> None:
    a, b = FakeProvider("a"), FakeProvider("b")
    a.script(UpstreamUnavailable("boom", provider="a"))
    router = Router(routing(strategy="availability"), ["a", "b"], [a, b], "n1")
    routed = await router.complete(request())
    assert routed.served.offer.provider == "b"
    assert [(x.provider, x.outcome) for x in routed.served.attempts] == [
        ("a", "upstream_error"), ("b", "ok")]


async def test_the_clients_bad_request_does_not_fail_over() -> None:
    a, b = FakeProvider("a"), FakeProvider("b")
    a.script(UpstreamBadRequest("bad field"))
    router = Router(routing(strategy="availability"), ["a", "b"], [a, b], "n1")
    with pytest.raises(UpstreamBadRequest):
        await router.complete(request())
    assert len(b.calls) == 0


async def test_rejected_credentials_cool_the_provider_down_and_fail_over() -> None:
    clock = Clock()
    a, b = FakeProvider("a"), FakeProvider("b")
    a.script(UpstreamAuthError("a rejected this node's credentials (HTTP 401)", provider="a"))
    router = Router(routing(strategy="availability"), ["a", "b"], [a, b], "n1", clock=clock)
    routed = await router.complete(request())
    assert routed.served.offer.provider == "b"
    assert [(x.provider, x.outcome) for x in routed.served.attempts] == [
        ("a", "upstream_auth_error"), ("b", "ok")]
    assert "HTTP 401" in router.provider_problems()["a"]
    # cooled down at once: the next requests go to b without trying a
    for _ in range(3):
        assert (await router.complete(request())).served.offer.provider == "b"
    assert len(a.calls) == 1
    assert router.explain("m")["candidates"][-1]["cooling_down"] is True
    # after the cooldown, once a answers again (b failing here), the problem is cleared
    clock.now += 3600
    b.script(UpstreamUnavailable("b down", provider="b"))
    assert (await router.complete(request())).served.offer.provider == "a"
    assert router.provider_problems() == {}


class _Buggy(FakeProvider):
    async def complete(self, req, offer, timeouts):  # type: ignore[no-untyped-def]
        self.calls.append(req)
        raise ValueError("Cannot combine AUTHORIZATION header with credentials in the URL")


async def test_a_providers_unexpected_exception_is_a_failed_attempt(
        caplog: pytest.LogCaptureFixture) -> None:
    a, b = _Buggy("a"), FakeProvider("b")
    router = Router(routing(strategy="availability"), ["a", "b"], [a, b], "n1")
    routed = await router.complete(request())
    assert routed.served.offer.provider == "b"
    assert [(x.provider, x.outcome) for x in routed.served.attempts] == [
        ("a", "provider_error"), ("b", "ok")]
    (logged,) = [r for r in caplog.records if r.exc_info]
    assert logged.levelname == "ERROR" and "provider a raised ValueError" in logged.getMessage()
    # alone, it is a 502 that says what failed, not a phantom "client gone"
    alone = Router(routing(), ["a"], [_Buggy("a")], "n1")
    with pytest.raises(UpstreamUnavailable) as info:
        await alone.complete(request())
    assert "ValueError" in info.value.message


async def test_a_model_whose_only_provider_left_is_503_not_404() -> None:
    peer = FakeProvider("mesh", models=["shared"])
    router = Router(routing(), ["mesh"], [peer], "n1")
    assert (await router.complete(request("shared"))).served.offer.provider == "mesh"
    peer._offers = []  # the only peer serving it died: its offers are gone
    with pytest.raises(NoCapacity) as info:
        await router.complete(request("shared"))
    assert info.value.status == 503 and info.value.retry_after
    assert isinstance(router.missing_model("never-offered"), ModelNotFound)


async def test_max_retries_bounds_attempts_and_last_error_lists_them() -> None:
    a = FakeProvider("a")
    a.script(*[UpstreamUnavailable("down") for _ in range(10)])
    router = Router(routing(failover=FailoverConfig(
        max_retries=2, backoff={"initial_ms": 1, "max_ms": 1, "jitter": 0.0})), ["a"], [a], "n1")
    with pytest.raises(UpstreamUnavailable) as info:
        await router.complete(request())
    assert len(a.calls) == 3
    assert "All 3 attempts failed" in info.value.message


async def test_failover_disabled_tries_once() -> None:
    a, b = FakeProvider("a"), FakeProvider("b")
    a.script(UpstreamUnavailable("down"))
    router = Router(routing(strategy="availability", failover=FailoverConfig(enabled=False)),
                    ["a", "b"], [a, b], "n1")
    with pytest.raises(UpstreamUnavailable):
        await router.complete(request())
    assert len(b.calls) == 0


async def test_unknown_model_is_404_and_calls_nothing() -> None:
    a = FakeProvider("a")
    router = Router(routing(), ["a"], [a], "n1")
    with pytest.raises(ModelNotFound):
        await router.complete(request("nope"))
    assert a.calls == []


async def test_consecutive_failures_cool_down_then_probe_back_in() -> None:
    clock = Clock()
    a, b = FakeProvider("a"), FakeProvider("b", cost_per_1k=0.01)
    cfg = routing(failover=FailoverConfig(
        max_retries=1, cooldown=CooldownConfig(failures=2, seconds=10),
        backoff={"initial_ms": 1, "max_ms": 1, "jitter": 0.0}))
    router = Router(cfg, ["a", "b"], [a, b], "n1", clock=clock)
    a.script(UpstreamUnavailable("x"), UpstreamUnavailable("x"))
    await router.complete(request())
    await router.complete(request())
    assert router.explain("m")["candidates"][0]["provider"] == "b"
    assert router.explain("m")["candidates"][1]["cooling_down"] is True
    calls_before = len(a.calls)
    await router.complete(request())
    assert len(a.calls) == calls_before  # cooled down: b served without trying a
    clock.now += 11
    routed = await router.complete(request())
    assert routed.served.offer.provider == "a"  # probed back in and healthy


async def test_upstream_429_cools_down_for_its_retry_after_capped() -> None:
    clock = Clock()
    a, b = FakeProvider("a"), FakeProvider("b")
    a.script(UpstreamRateLimited("slow down", retry_after=10_000))
    cfg = routing(strategy="availability", failover=FailoverConfig(
        cooldown=CooldownConfig(max_retry_after_s=30),
        backoff={"initial_ms": 1, "max_ms": 1, "jitter": 0.0}))
    router = Router(cfg, ["a", "b"], [a, b], "n1", clock=clock)
    routed = await router.complete(request())
    assert routed.served.offer.provider == "b"
    row = next(r for r in router.stats()["candidates"] if r["provider"] == "a")
    assert row["cooldown_s_left"] == pytest.approx(30)


async def test_429_with_retry_after_is_never_resent_before_it() -> None:
    clock = Clock()
    only = FakeProvider("only")
    only.script(UpstreamRateLimited("slow down", retry_after=3, provider="only"), "ok", "ok")
    cfg = routing(failover=FailoverConfig(max_retries=3, backoff={
        "initial_ms": 1, "max_ms": 1, "jitter": 0.0}))
    router = Router(cfg, ["only"], [only], "n1", clock=clock)
    with pytest.raises(UpstreamRateLimited) as caught:
        await router.complete(request())
    assert len(only.calls) == 1  # not re-sent 3 times within its Retry-After
    assert caught.value.retry_after == 3
    clock.now += 3.5
    routed = await router.complete(request())
    assert routed.served.offer.provider == "only" and len(only.calls) == 2

    a, b = FakeProvider("a"), FakeProvider("b")
    a.script(UpstreamRateLimited("slow down", retry_after=3, provider="a"))
    b.script(UpstreamUnavailable("boom", provider="b"), "ok")
    router = Router(routing(strategy="availability", failover=FailoverConfig(
        max_retries=3, backoff={"initial_ms": 1, "max_ms": 1, "jitter": 0.0})),
        ["a", "b"], [a, b], "n1", clock=clock)
    routed = await router.complete(request())
    # a said wait: b is tried at once, and again after its own failure; a never twice.
    assert [x.provider for x in routed.served.attempts] == ["a", "b", "b"]
    assert len(a.calls) == 1


async def test_deadline_bounds_a_hanging_provider() -> None:
    a = FakeProvider("a")
    a.script(Hang())
    router = Router(routing(), ["a"], [a], "n1")
    with pytest.raises(DeadlineExceeded):
        await router.complete(request(deadline_s=0.2))
    assert a.cancelled == 1


async def test_policy_restricts_candidates_even_when_all_allowed_fail() -> None:
    local = FakeProvider("local", kind="local")
    cloud = FakeProvider("cloud", kind="openai")
    local.script(UpstreamUnavailable("down"), UpstreamUnavailable("down"),
                 UpstreamUnavailable("down"), UpstreamUnavailable("down"))
    cfg = routing(policies=[PolicyConfig(name="pii", match=PolicyMatch(
        header={"x-aiproxy-tags": "pii"}), allow=["local", "mesh"])])
    router = Router(cfg, ["local", "cloud"], [local, cloud], "n1")
    with pytest.raises(NoCapacity) as exhausted:
        await router.complete(request(headers={"x-aiproxy-tags": "eu, pii"}))
    assert cloud.calls == []
    assert "policy 'pii'" in exhausted.value.message and "cloud" in exhausted.value.message
    only_cloud = Router(cfg, ["cloud"], [cloud], "n1")
    with pytest.raises(NoCapacity) as info:
        await only_cloud.complete(request(headers={"x-aiproxy-tags": "pii"}))
    assert "policy 'pii'" in info.value.message


async def test_peers_already_visited_or_beyond_max_hops_are_skipped() -> None:
    peer = FakeProvider("mesh", kind="mesh", node="n2")
    router = Router(routing(), ["mesh"], [peer], "n1", max_hops=2)
    with pytest.raises(NoCapacity):
        await router.complete(request(visited=("n2",)))
    with pytest.raises(NoCapacity):
        await router.complete(request(visited=("a", "b")))
    routed = await router.complete(request(visited=("a",)))
    assert routed.served.node == "n2"


async def test_stream_fails_over_before_first_chunk_then_commits() -> None:
    a, b = FakeProvider("a"), FakeProvider("b", text="one two three four")
    a.script(UpstreamUnavailable("down"))
    router = Router(routing(strategy="availability"), ["a", "b"], [a, b], "n1")
    routed = await router.open_stream(request(stream=True))
    texts = [c.data["choices"][0]["delta"].get("content", "") async for c in routed
             if c.data["choices"]]
    assert "".join(texts) == "one two three four"
    assert routed.served.offer.provider == "b"
    assert routed.served.usage.completion_tokens == 4
    assert [x.outcome for x in routed.served.attempts] == ["upstream_error", "ok"]
    assert router.stats()["candidates"][1]["in_flight"] == 0


async def test_stream_break_after_first_chunk_is_not_retried() -> None:
    a, b = FakeProvider("a", text="w1 w2 w3 w4", chunks=4), FakeProvider("b")
    a.script(BreakAfter(2))
    router = Router(routing(strategy="availability"), ["a", "b"], [a, b], "n1")
    routed = await router.open_stream(request(stream=True))
    got = []
    with pytest.raises(StreamBroken):
        async for chunk in routed:
            got.append(chunk)
    assert len(got) == 2
    assert b.calls == []


async def test_stream_aclose_releases_upstream_and_in_flight() -> None:
    a = FakeProvider("a", text="w1 w2 w3 w4", chunks=4)
    router = Router(routing(), ["a"], [a], "n1")
    routed = await router.open_stream(request(stream=True))
    await routed.aclose()
    assert a.closed_streams == 1
    assert router.stats()["candidates"][0]["in_flight"] == 0


async def test_round_robin_spreads_requests() -> None:
    a, b = FakeProvider("a"), FakeProvider("b")
    router = Router(routing(strategy="round_robin"), ["a", "b"], [a, b], "n1")
    served = [(await router.complete(request())).served.offer.provider for _ in range(4)]
    assert sorted(served) == ["a", "a", "b", "b"]


async def test_explain_names_winner_and_exclusions() -> None:
    a, b = FakeProvider("a", cost_per_1k=0.002), FakeProvider("b", cost_per_1k=0.001)
    c = FakeProvider("c")
    router = Router(routing(), ["a", "b"], [a, b, c], "n1")
    out = router.explain("m")
    assert out["winner"]["provider"] == "b"
    assert "cost_optimized" in out["why"]
    assert any("c: not in the fallback chain" in e for e in out["excluded"])


async def test_concurrent_requests_track_in_flight() -> None:
    a = FakeProvider("a")
    router = Router(routing(), ["a"], [a], "n1")
    results = await asyncio.gather(*[router.complete(request()) for _ in range(20)])
    assert len(results) == 20
    row = router.stats()["candidates"][0]
    assert row["requests"] == 20 and row["in_flight"] == 0


async def test_policy_deadline_shortens_the_request_deadline() -> None:
    a = FakeProvider("a")
    a.script(Hang())
    cfg = routing(policies=[PolicyConfig(name="quick", match=PolicyMatch(model="m"),
                                         deadline_ms=100)])
    router = Router(cfg, ["a"], [a], "n1")
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await router.complete(request(deadline_s=30))
    assert time.monotonic() - started < 10  # bounded by the policy, not the 30 s request


async def test_a_provider_with_its_queue_over_the_bound_overflows_to_the_next() -> None:
    busy = FakeProvider("local", kind="local",
                        capacity=Capacity(slots_total=4, slots_free=0, queue_depth=9))
    cloud = FakeProvider("cloud", cost_per_1k=0.01)
    router = Router(routing(overflow_queue_depth=8), ["local", "cloud"], [busy, cloud], "n1")
    routed = await router.complete(request())
    assert routed.served.offer.provider == "cloud"
    assert "overflow" in router.explain("m")["candidates"][1]["reason"]
    calm = Router(routing(overflow_queue_depth=16), ["local", "cloud"], [busy, cloud], "n1")
    assert (await calm.complete(request())).served.offer.provider == "local"


class _PeersProvider(FakeProvider):
    """Two peers behind one provider, each with its own gossiped capacity and latency."""

    def __init__(self) -> None:
        super().__init__("mesh", kind="mesh", node="b")
        self._offers = [*self._offers, replace(self._offers[0], node="c")]

    def capacity_for(self, offer: ModelOffer) -> Capacity | None:
        return Capacity(slots_total=4, slots_free=0 if offer.node == "b" else 4)

    def latency_ms_for(self, offer: ModelOffer) -> float | None:
        return 50.0 if offer.node == "b" else 5.0


async def test_peers_are_ranked_by_their_own_gossiped_capacity_and_latency() -> None:
    for strategy in ("least_loaded", "latency_optimized"):
        router = Router(routing(strategy=strategy), ["mesh"], [_PeersProvider()], "a")
        assert router.explain("m")["winner"]["node"] == "c", strategy


async def test_own_measurement_outweighs_a_peers_estimate() -> None:
    peers = _PeersProvider()
    router = Router(routing(strategy="latency_optimized"), ["mesh"], [peers], "a")
    # c claims 5 ms but we measured it slow; b was never measured and claims 50 ms
    c_offer = next(o for o in peers.offers() if o.node == "c")
    router._stats_for(c_offer).record_success(500.0, Usage(), 0.0)
    assert router.explain("m")["winner"]["node"] == "b"


class _RecordingGate:
    """A SpendGate that records what the router did with each hold."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def reserve(self, request: InferenceRequest, offer: ModelOffer) -> object:
        gate, provider = self, offer.provider

        class _Hold:
            def settle(self, usage: Usage | None, chunks: int = 0,
                       cost: float | None = None) -> float:
                gate.events.append((provider, "settle" if usage else "settle-prompt"))
                return 0.0

            def held(self) -> None:
                return None

            def release(self) -> None:
                gate.events.append((provider, "release"))

            def abandon(self) -> None:
                gate.events.append((provider, "abandon"))

        return _Hold()


async def test_budget_holds_are_released_settled_or_abandoned_exactly_once() -> None:
    gate = _RecordingGate()
    a, b = FakeProvider("a"), FakeProvider("b", cost_per_1k=0.01)
    router = Router(routing(), ["a", "b"], [a, b], "n1", spend=gate)  # type: ignore[arg-type]
    a.script(UpstreamUnavailable("down"))
    await router.complete(request())
    assert gate.events == [("a", "release"), ("b", "settle")]

    gate.events.clear()
    a.script(Hang())
    before = len(a.calls)
    task = asyncio.create_task(router.complete(request()))
    await wait_for(lambda: len(a.calls) > before, "the router calls a")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gate.events == [("a", "abandon")]  # the upstream may still bill a whole call

    gate.events.clear()
    a.script(Hang())
    before = len(a.calls)
    task = asyncio.create_task(router.open_stream(request(stream=True)))
    await wait_for(lambda: len(a.calls) > before, "the router calls a")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gate.events == [("a", "settle-prompt")]  # gone before a first chunk
    assert a.cancelled == 2  # both upstream calls were cancelled with the client

    gate.events.clear()
    routed = await router.open_stream(request(stream=True))
    assert gate.events == []  # held until the stream ends
    [c async for c in routed]
    assert gate.events == [("a", "settle")]
    assert all(r["in_flight"] == 0 for r in router.stats()["candidates"])


def test_carried_constraint_only_narrows() -> None:
    rule = PolicyConfig(name="mine", allow=["local", "mesh", "openai"], max_cost_per_1k=0.01)
    incoming = PolicyConstraint(name="origin", allow=("local", "mesh"), max_cost_per_1k=0.02)
    merged = carried_constraint(rule, incoming)
    assert merged == PolicyConstraint(name="origin", allow=("local", "mesh"), max_cost_per_1k=0.01)
    assert carried_constraint(None, incoming) is incoming
    assert carried_constraint(rule, None) == PolicyConstraint(
        name="mine", allow=("local", "mesh", "openai"), max_cost_per_1k=0.01)
    unrestricted = PolicyConfig(name="cap-only", max_cost_per_1k=0.5)
    assert carried_constraint(unrestricted, incoming).allow == ("local", "mesh")


async def test_a_forwarded_policy_is_honoured_here_and_carried_further() -> None:
    cloud = FakeProvider("cloud", kind="openai")
    peer = FakeProvider("mesh", kind="mesh", node="n3")
    router = Router(routing(), ["cloud", "mesh"], [cloud, peer], "n2")
    forwarded = replace(request(visited=("n1",)),
                        policy=PolicyConstraint(name="pii", allow=("local", "mesh")))
    routed = await router.complete(forwarded)
    assert routed.served.offer.provider == "mesh" and cloud.calls == []
    assert peer.calls[0].policy == forwarded.policy  # carried on to the next hop
    peer.script(*[UpstreamUnavailable("down") for _ in range(4)])
    with pytest.raises(NoCapacity) as info:
        await router.complete(forwarded)
    assert "policy 'pii'" in info.value.message and cloud.calls == []


async def test_this_nodes_matched_policy_travels_with_the_request() -> None:
    peer = FakeProvider("mesh", kind="mesh", node="n2")
    cfg = routing(policies=[PolicyConfig(name="pii", match=PolicyMatch(
        header={"x-aiproxy-tags": "pii"}), allow=["local", "mesh"])])
    router = Router(cfg, ["mesh"], [peer], "n1")
    await router.complete(request(headers={"x-aiproxy-tags": "pii"}))
    assert peer.calls[-1].policy == PolicyConstraint(name="pii", allow=("local", "mesh"))
    await router.complete(request())
    assert peer.calls[-1].policy is None


async def test_a_stream_cut_short_reports_the_estimated_usage_it_is_charged_for() -> None:
    a = FakeProvider("a", text="w1 w2 w3 w4", chunks=4, cost_per_1k=1.0)
    a.script(BreakAfter(2))
    router = Router(routing(), ["a"], [a], "n1")
    routed = await router.open_stream(request(stream=True))
    with pytest.raises(StreamBroken):
        async for _ in routed:
            pass
    usage = routed.served.usage
    assert usage.estimated and usage.completion_tokens == 2 and usage.prompt_tokens > 0
    assert routed.served.cost == pytest.approx(usage.total_tokens / 1000.0)


# ------------------------------------------------------------------ cache_aware
CONVERSATION = [{"role": "system", "content": "You answer in haiku. " * 60},
                {"role": "user", "content": "first question"}]


def chat(messages: list[dict], headers: dict[str, str] | None = None) -> InferenceRequest:
    return InferenceRequest(kind=RequestKind.CHAT, model="m", body={"messages": messages},
                            request_id="r1", deadline=time.monotonic() + 5.0,
                            headers=headers or {})


async def test_cache_aware_follows_the_prefix_a_worker_served_and_fails_over() -> None:
    from meshnode.routing.prefix import request_prefix

    worker = FakeProvider("w", kind="local", capacity=Capacity(slots_total=4, slots_free=4))
    router = Router(routing(strategy="cache_aware"), ["w", "mesh"], [worker], "n1")
    await router.complete(chat(CONVERSATION))
    served = request_prefix("m", {"messages": CONVERSATION}).chain
    assert served and all(name in router.prefix_index for name in served)

    # A peer holding nothing, idle: the local worker holding the prefix still wins the next turn.
    peer = FakeProvider("mesh", kind="local", node="p",
                        capacity=Capacity(slots_total=4, slots_free=4))
    router.add_provider(peer)
    later = [*CONVERSATION, {"role": "assistant", "content": "an answer " * 30},
             {"role": "user", "content": "second question " * 30}]
    out = router.explain("m", body={"messages": later})
    first, second = out["candidates"]
    assert (first["provider"], first["prefix_hit_blocks"]) == ("w", len(served))
    assert second["prefix_hit_blocks"] == 0 and first["prefix_blocks"] > len(served)
    assert "prefix hit" in first["reason"] and first["slots_free"] == 4
    # The holder failing: failover goes on to the peer, and nothing it did not serve is recorded.
    worker.script(UpstreamUnavailable("down", provider="w"))
    routed = await router.complete(chat(later))
    assert routed.served.offer.provider == "mesh"
    assert request_prefix("m", {"messages": later}).chain[-1] not in router.prefix_index


async def test_cache_aware_takes_a_workers_own_report_and_follows_its_evictions() -> None:
    from meshnode.routing.prefix import request_prefix

    chain = request_prefix("m", {"messages": CONVERSATION}).chain
    holds = Capacity(slots_total=4, slots_free=4, prefix_names=frozenset(chain),
                     prefix_recent=chain)
    worker = FakeProvider("w", kind="local", capacity=holds)
    peer = FakeProvider("mesh", kind="local", node="p",
                        capacity=Capacity(slots_total=4, slots_free=4))
    router = Router(routing(strategy="cache_aware"), ["w", "mesh"], [worker, peer], "n1")
    out = router.explain("m", body={"messages": CONVERSATION})
    assert (out["winner"]["provider"], out["winner"]["prefix_hit_blocks"]) == ("w", len(chain))
    await router.complete(chat(CONVERSATION))
    assert len(router.prefix_index) == 0  # the worker says what it holds; nothing kept here
    # The engine evicted the blocks: the worker's next report no longer names them.
    worker._capacity = Capacity(slots_total=4, slots_free=4, prefix_recent=())
    rows = router.explain("m", body={"messages": CONVERSATION})["candidates"]
    assert all(r["prefix_hit_blocks"] == 0 for r in rows)


async def test_cache_aware_hands_its_names_of_the_prompt_to_the_local_worker() -> None:
    from meshnode.routing.prefix import render, request_prefix

    worker = FakeProvider("w", kind="local", capacity=Capacity(slots_total=4, slots_free=4))
    peer = FakeProvider("mesh", kind="local", node="p",
                        capacity=Capacity(slots_total=4, slots_free=4))
    router = Router(routing(strategy="cache_aware"), ["w", "mesh"], [worker, peer], "n1")
    routed = await router.complete(chat(CONVERSATION))
    assert routed.served.offer.provider == "w"
    given = worker.calls[-1].prefix
    expected = request_prefix("m", {"messages": CONVERSATION})
    assert given == expected and given is not None and given.chain
    assert given.rendered_bytes == len(render({"messages": CONVERSATION}))
    # A peer's attempt carries no names (the peer names the prompt for its own worker) ...
    worker.script(UpstreamUnavailable("down", provider="w"))
    routed = await router.complete(chat(CONVERSATION))
    assert routed.served.offer.node == "p" and peer.calls[-1].prefix is None
    # ... nor does a local attempt under a strategy that did not name the prompt.
    plain = Router(routing(strategy="least_loaded"), ["w", "mesh"], [worker, peer], "n1")
    assert (await plain.complete(chat(CONVERSATION))).served.offer.provider == "w"
    assert worker.calls[-1].prefix is None


async def test_cache_aware_ranks_a_peer_by_its_gossiped_names() -> None:
    from meshnode.routing.prefix import request_prefix

    names = frozenset(request_prefix("m", {"messages": CONVERSATION}).chain)
    holder = FakeProvider("mesh", kind="local", node="b",
                          capacity=Capacity(slots_total=4, slots_free=3, prefix_names=names))
    other = FakeProvider("mesh2", kind="local", node="c",
                         capacity=Capacity(slots_total=4, slots_free=4))
    router = Router(routing(strategy="cache_aware"), ["mesh", "mesh2"], [other, holder], "n1")
    assert router.explain("m", body={"messages": CONVERSATION})["winner"]["node"] == "b"
    routed = await router.complete(chat(CONVERSATION))
    assert routed.served.offer.node == "b"


async def test_the_shortlist_is_computed_once_until_the_offers_change(monkeypatch) -> None:
    a = FakeProvider("a", models=["m", "other"], cost_per_1k=0.01)
    b = FakeProvider("b", models=["m"], cost_per_1k=0.02)
    router = Router(routing(), ["a", "b"], [a, b], "n1")
    built: list[str] = []
    build = router._build_shortlist

    def spy(request, *args):  # type: ignore[no-untyped-def]
        built.append(request.model)
        return build(request, *args)

    monkeypatch.setattr(router, "_build_shortlist", spy)
    for _ in range(3):
        assert (await router.complete(request())).served.offer.provider == "a"
    await router.complete(request("other"))
    assert built == ["m", "other"]
    # b gets cheaper (its offers change in place): the plan follows at once.
    b._offers[0] = replace(b._offers[0], cost_per_1k_input=0.0, cost_per_1k_output=0.0)
    assert (await router.complete(request())).served.offer.provider == "b"
    # a goes away: only b is left, and a made-up model is still a 404 (and never kept).
    a._offers = []
    assert (await router.complete(request())).served.offer.provider == "b"
    with pytest.raises(NoCapacity):
        await router.complete(request("other"))  # offered a moment ago: 503, not 404
    with pytest.raises(ModelNotFound):
        await router.complete(request("made-up"))
    assert built == ["m", "other", "m", "m", "other", "made-up"]
    assert all(key[0] != "made-up" for key in router._shortlists)


async def test_a_prompt_the_worker_served_is_named_when_the_index_is_read(monkeypatch) -> None:
    from meshnode.routing import prefix as prefix_module

    worker = FakeProvider("w", kind="local")
    router = Router(routing(strategy="cost_optimized"), ["w"], [worker], "n1")
    named: list[str] = []
    real = prefix_module.chain

    def counting(model: str, text: bytes) -> tuple[bytes, ...]:
        named.append(model)
        return real(model, text)

    monkeypatch.setattr(prefix_module, "chain", counting)
    await router.complete(chat(CONVERSATION))
    assert named == []  # not on the request's path
    served = prefix_module.request_prefix("m", {"messages": CONVERSATION}).chain
    named.clear()
    assert served and router.prefix_index.names()[:len(served)] == served  # gossip reads it
    assert named == ["m"]


class FixedOffers(FakeProvider):
    """A provider whose offers are fixed for its life, counting how often they are read."""

    fixed_offers = True

    def __init__(self, name: str, **kw) -> None:
        super().__init__(name, **kw)
        self.reads = 0

    def offers(self) -> list[ModelOffer]:
        self.reads += 1
        return super().offers()


async def test_fixed_offers_are_read_once_and_a_changing_provider_is_still_watched() -> None:
    fixed = FixedOffers("a", cost_per_1k=0.01)
    router = Router(routing(), ["a", "b"], [fixed], "n1")
    for _ in range(3):
        assert router.has_model("m", RequestKind.CHAT)
        assert (await router.complete(request())).served.offer.provider == "a"
    assert fixed.reads == 1
    changing = FakeProvider("b", cost_per_1k=0.001)
    router.add_provider(changing)  # not fixed: every provider's offers are read again
    assert (await router.complete(request())).served.offer.provider == "b"
    changing._offers = []  # its model is gone: seen at the next routing decision
    assert (await router.complete(request())).served.offer.provider == "a"
    assert fixed.reads > 1


async def test_a_fixed_provider_added_later_is_seen() -> None:
    router = Router(routing(), ["a", "b"], [FixedOffers("a", cost_per_1k=0.01)], "n1")
    assert (await router.complete(request())).served.offer.provider == "a"
    router.add_provider(FixedOffers("b", cost_per_1k=0.001))  # all fixed still: read once more
    assert (await router.complete(request())).served.offer.provider == "b"
