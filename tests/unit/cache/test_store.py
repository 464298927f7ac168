"""The in-memory LRU with TTL, on an injected clock."""

from __future__ import annotations

from meshnode.cache.entry import CachedAnswer
from meshnode.cache.store import MemoryStore
from meshnode.types import RequestKind, Usage


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def answer(clock: Clock, text: str = "a") -> CachedAnswer:
    return CachedAnswer(RequestKind.CHAT, "m", {"text": text}, Usage(1, 1), "p", 0.01, clock())


def test_lru_evicts_the_least_recently_used() -> None:
    clock = Clock()
    store = MemoryStore(2, 0, clock)
    assert store.put("a", answer(clock)) == []
    assert store.put("b", answer(clock)) == []
    assert store.get("a") is not None  # a is now the most recent
    assert store.put("c", answer(clock)) == ["b"]
    assert "b" not in store and "a" in store and "c" in store
    assert len(store) == 2


def test_entries_expire_after_ttl() -> None:
    clock = Clock()
    store = MemoryStore(10, 60, clock)
    store.put("a", answer(clock))
    clock.now += 59
    assert store.get("a") is not None
    clock.now += 2
    assert store.get("a") is None
    assert "a" not in store


def test_ttl_zero_never_expires_and_size_zero_keeps_nothing() -> None:
    clock = Clock()
    forever = MemoryStore(10, 0, clock)
    forever.put("a", answer(clock))
    clock.now += 10**9
    assert forever.get("a") is not None
    nothing = MemoryStore(0, 0, clock)
    assert nothing.put("a", answer(clock)) == ["a"]
    assert nothing.get("a") is None


def test_entry_round_trips_through_bytes() -> None:
    clock = Clock()
    original = CachedAnswer(RequestKind.EMBEDDING, "e", {"data": [1, 2]}, Usage(3, 0, True),
                            "local", 0.5, 12.5)
    assert CachedAnswer.from_bytes(original.to_bytes()) == original
    assert answer(clock) == CachedAnswer.from_bytes(answer(clock).to_bytes())
