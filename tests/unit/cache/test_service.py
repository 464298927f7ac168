"""ResponseCache over a real Router and FakeProviders: hits, misses, bypasses, streams, TTL,
persistence and metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from meshnode.cache.service import ResponseCache
from meshnode.config import CacheConfig
from meshnode.errors import InvalidRequest, StreamBroken
from meshnode.providers.fake import BreakAfter, FakeProvider
from tests.unit.cache.conftest import Clock, chat, embedding, make_router


def sample(registry: CollectorRegistry, result: str) -> float:
    value = registry.get_sample_value("meshnode_cache_lookups_total", {"result": result})
    return value or 0.0


async def test_deterministic_request_twice_second_is_a_free_hit() -> None:
    fake = FakeProvider("up", cost_per_1k=0.01)
    router = make_router([fake])
    registry = CollectorRegistry()
    cache = ResponseCache(CacheConfig(), node_id="n1", registry=registry)

    first = await cache.complete(router, chat(temperature=0))
    second = await cache.complete(router, chat(temperature=0))

    assert len(fake.calls) == 1
    assert first.served.cost > 0 and first.served.cache is None
    assert second.served.cache == "hit"
    assert second.served.cost == 0.0
    assert second.completion.body == first.completion.body
    x = second.served.to_json()
    assert x["cache"] == "hit" and x["cache_match"] == "exact" and x["provider"] == "cache"
    assert x["cached_provider"] == "up" and x["cost"] == 0.0
    assert x["attempts"][0]["outcome"] == "hit"
    assert sample(registry, "hit") == 1 and sample(registry, "miss") == 1
    saved = registry.get_sample_value("meshnode_cache_saved_usd_total")
    assert saved == pytest.approx(first.served.cost)


async def test_sampling_without_opt_in_always_goes_upstream() -> None:
    fake = FakeProvider("up")
    router = make_router([fake])
    registry = CollectorRegistry()
    cache = ResponseCache(CacheConfig(), node_id="n1", registry=registry)
    for _ in range(2):
        routed = await cache.complete(router, chat(temperature=0.7))
        assert routed.served.cache is None
    assert len(fake.calls) == 2
    assert sample(registry, "uncacheable") == 2


async def test_client_opt_in_caches_sampling_and_never_sends_our_field_upstream() -> None:
    fake = FakeProvider("up")
    router = make_router([fake])
    cache = ResponseCache(CacheConfig(), node_id="n1")
    await cache.complete(router, chat(temperature=0.7, cache=True))
    hit = await cache.complete(router, chat(temperature=0.7, cache=True))
    assert hit.served.cache == "hit"
    assert len(fake.calls) == 1
    assert "cache" not in fake.calls[0].body


@pytest.mark.parametrize(
    ("params", "cache_control", "stores"),
    [({"cache": False}, None, False), ({}, "no-store", False), ({}, "no-cache", True)],
)
async def test_bypass_goes_upstream(params: dict, cache_control: str | None,
                                    stores: bool) -> None:
    fake = FakeProvider("up")
    router = make_router([fake])
    clock = Clock()
    cache = ResponseCache(CacheConfig(), node_id="n1", clock=clock)
    await cache.complete(router, chat(temperature=0))  # kept at t0
    t0 = clock.now
    clock.now += 5
    bypassed = await cache.complete(router, chat(temperature=0, **params), cache_control)
    assert bypassed.served.cache is None
    assert len(fake.calls) == 2
    assert "cache" not in fake.calls[1].body
    assert len(cache.memory) == 1
    # no-cache refreshed the entry with the fresh answer; the others left it alone.
    entry = next(iter(cache.memory._entries.values()))
    assert entry.created_at == (clock.now if stores else t0)


async def test_cache_off_in_config_still_strips_our_field() -> None:
    fake = FakeProvider("up")
    router = make_router([fake])
    cache = ResponseCache(CacheConfig(enabled=False), node_id="n1")
    await cache.complete(router, chat(temperature=0, cache=True))
    await cache.complete(router, chat(temperature=0, cache=True))
    stream = await cache.open_stream(router, chat(stream=True, temperature=0, cache=True))
    assert [chunk async for chunk in stream]
    assert len(fake.calls) == 3
    assert all("cache" not in c.body for c in fake.calls)
    assert len(cache.memory) == 0


@pytest.mark.parametrize("enabled", [True, False])
async def test_malformed_directive_is_the_clients_error(enabled: bool) -> None:
    fake = FakeProvider("up")
    cache = ResponseCache(CacheConfig(enabled=enabled), node_id="n1")
    with pytest.raises(InvalidRequest):
        await cache.complete(make_router([fake]), chat(cache="yes"))
    with pytest.raises(InvalidRequest):
        await cache.open_stream(make_router([fake]), chat(cache="yes"))
    assert fake.calls == []  # whether the cache is on or off


async def test_embeddings_are_cached() -> None:
    fake = FakeProvider("up")
    router = make_router([fake])
    cache = ResponseCache(CacheConfig(), node_id="n1")
    first = await cache.complete(router, embedding("hello"))
    second = await cache.complete(router, embedding("hello"))
    other = await cache.complete(router, embedding("bye"))
    assert second.served.cache == "hit" and other.served.cache is None
    assert second.completion.body["data"] == first.completion.body["data"]
    assert len(fake.calls) == 2


async def test_different_parameters_miss() -> None:
    fake = FakeProvider("up")
    router = make_router([fake])
    cache = ResponseCache(CacheConfig(), node_id="n1")
    await cache.complete(router, chat(temperature=0))
    miss = await cache.complete(router, chat(temperature=0, max_tokens=3))
    assert miss.served.cache is None and len(fake.calls) == 2


async def collect(routed) -> list:
    return [chunk async for chunk in routed]


async def test_a_stream_is_kept_and_replayed_as_a_stream_and_as_a_whole_answer() -> None:
    fake = FakeProvider("up", text="one two three four", chunks=2)
    router = make_router([fake])
    cache = ResponseCache(CacheConfig(), node_id="n1")

    live = await cache.open_stream(router, chat(stream=True, temperature=0))
    live_chunks = await collect(live)
    live_text = "".join(c.data["choices"][0]["delta"].get("content", "")
                        for c in live_chunks if c.data["choices"])

    replay = await cache.open_stream(router, chat(stream=True, temperature=0))
    assert replay.served.cache == "hit"
    replayed = await collect(replay)
    text = "".join(c.data["choices"][0]["delta"].get("content") or ""
                   for c in replayed if c.data["choices"])
    assert text == live_text == "one two three four"
    assert replayed[-1].data["choices"] == [] and replayed[-1].usage is not None
    assert replay.served.usage == replayed[-1].usage and replay.served.cost == 0.0

    whole = await cache.complete(router, chat(temperature=0))
    assert whole.served.cache == "hit"
    assert whole.completion.body["choices"][0]["message"]["content"] == "one two three four"
    assert whole.completion.body["object"] == "chat.completion"
    assert len(fake.calls) == 1


async def test_a_broken_or_abandoned_stream_is_not_kept() -> None:
    fake = FakeProvider("up", text="one two three four", chunks=4)
    fake.script(BreakAfter(2))
    router = make_router([fake])
    cache = ResponseCache(CacheConfig(), node_id="n1")
    broken = await cache.open_stream(router, chat(stream=True, temperature=0))
    with pytest.raises(StreamBroken):
        await collect(broken)
    assert len(cache.memory) == 0

    abandoned = await cache.open_stream(router, chat(stream=True, temperature=0))
    iterator = abandoned.__aiter__()
    await iterator.__anext__()
    await iterator.aclose()
    await abandoned.aclose()
    assert len(cache.memory) == 0


async def test_entries_expire_after_ttl() -> None:
    fake = FakeProvider("up")
    router = make_router([fake])
    clock = Clock()
    cache = ResponseCache(CacheConfig(ttl_s=60), node_id="n1", clock=clock)
    await cache.complete(router, chat(temperature=0))
    clock.now += 30
    assert (await cache.complete(router, chat(temperature=0))).served.cache == "hit"
    clock.now += 31
    assert (await cache.complete(router, chat(temperature=0))).served.cache is None
    assert len(fake.calls) == 2


async def test_size_bound_evicts_least_recently_used() -> None:
    fake = FakeProvider("up")
    router = make_router([fake])
    registry = CollectorRegistry()
    cache = ResponseCache(CacheConfig(max_entries=2), node_id="n1", registry=registry)
    for text in ("a", "b", "c"):
        await cache.complete(router, chat(text, temperature=0))
    assert len(cache.memory) == 2
    assert registry.get_sample_value("meshnode_cache_evictions_total") == 1
    assert (await cache.complete(router, chat("a", temperature=0))).served.cache is None
    assert registry.get_sample_value("meshnode_cache_entries") == 2


async def test_persisted_answers_survive_a_restart(tmp_path: Path) -> None:
    fake = FakeProvider("up")
    router = make_router([fake])
    config = CacheConfig(persist=True, ttl_s=3600)
    clock = Clock()
    first = ResponseCache(config, node_id="n1", data_dir=tmp_path, clock=clock)
    await first.start()
    original = await first.complete(router, chat(temperature=0))
    await first.complete(router, chat("other", temperature=0))
    await first.close()
    assert (tmp_path / "response_cache.sqlite3").exists()

    second = ResponseCache(config, node_id="n1", data_dir=tmp_path, clock=clock)
    await second.start()
    hit = await second.complete(router, chat(temperature=0))
    assert hit.served.cache == "hit"
    assert hit.completion.body == original.completion.body
    await second.close()
    assert len(fake.calls) == 2

    # A restart after the TTL finds nothing.
    clock.now += 3601
    third = ResponseCache(config, node_id="n1", data_dir=tmp_path, clock=clock)
    await third.start()
    assert len(third.memory) == 0
    await third.close()
