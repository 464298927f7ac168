"""The in-memory store: an LRU bounded by entry count, with a time-to-live.

Not thread-safe and not async: it is touched only from the event loop, and every operation is
O(1) (an `OrderedDict` move or pop). The clock is injected so TTL is tested without sleeping.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

from meshnode.cache.entry import CachedAnswer


class MemoryStore:
    """`max_entries` 0 keeps nothing; `ttl_s` 0 means entries never expire."""

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float]) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, CachedAnswer] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def keys(self) -> Iterator[str]:
        return iter(self._entries)

    def expired(self, answer: CachedAnswer) -> bool:
        return self.ttl_s > 0 and self._clock() - answer.created_at > self.ttl_s

    def get(self, key: str) -> CachedAnswer | None:
        """The live entry for `key`, marked most recently used; an expired one is dropped."""
        answer = self._entries.get(key)
        if answer is None:
            return None
        if self.expired(answer):
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return answer

    def put(self, key: str, answer: CachedAnswer) -> list[str]:
        """Keep `answer`; returns the keys evicted to stay within `max_entries`."""
        if self.max_entries <= 0:
            return [key]
        self._entries[key] = answer
        self._entries.move_to_end(key)
        evicted: list[str] = []
        while len(self._entries) > self.max_entries:
            old, _ = self._entries.popitem(last=False)
            evicted.append(old)
        return evicted

    def pop(self, key: str) -> None:
        self._entries.pop(key, None)
