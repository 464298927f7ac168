"""Prefix reuse: the KV of recently seen prompt prefixes, block by block (worker side).

A prompt is cut into blocks of `block` tokens; block i is named by a chained hash (the hash of
block i - 1's name and block i's tokens), so a name stands for the whole prefix up to and
including its block, and two prompts share a block only if they share everything before it.
Held blocks live in one preallocated pool per layer (`[blocks, kv_heads, block, head_dim]`),
within a memory budget, evicted least recently used. A hit walks the new prompt's chain from
the start and copies the held blocks into the row's slot (`SlotCache.write_span`), so only the
rest of the prompt is prefilled. A lookup refreshes a chain's blocks last-to-first, so a
parent is always more recent than its child and eviction takes the tail of a chain first.

Only full blocks are held, and a hit never covers a prompt's last token: the model has to see
at least one token to give the first answer's logits.

`summary()` lists the held chain names (hex, most recent first). Names depend only on the
token ids and the block size, so nodes with the same tokenizer agree on them.

Routing cannot use those names (an entry node may lack the tokenizer): it names a prompt by its
text (`meshnode.routing.prefix`). A request carries its routing names (`Route`), and
`RoutedNames` ties each to the block that covers the same share of the prompt, so when the store
evicts that block the routing name goes too: the summary the node gossips (`routes.names()`) names
only prefixes whose KV the engine still holds.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from meshnode.routing.prefix import BLOCK_BYTES, MAX_NAMES
from meshnode.worker.kvcache import SlotCache

DEFAULT_BLOCK = 16


def chain_hashes(tokens: list[int], block: int) -> list[bytes]:
    """The chained name of every full block of `tokens`."""
    names: list[bytes] = []
    parent = b""
    for start in range(0, len(tokens) - block + 1, block):
        digest = hashlib.blake2b(parent, digest_size=16)
        digest.update(array("q", tokens[start:start + block]).tobytes())
        parent = digest.digest()
        names.append(parent)
    return names


@dataclass(frozen=True, slots=True)
class Route:
    """A request's routing names (`meshnode.routing.prefix.chain`: one per `BLOCK_BYTES` of its
    rendered prompt, whose length is `rendered_bytes`)."""

    names: tuple[bytes, ...]
    rendered_bytes: int


class RoutedNames:
    """Routing names tied to the engine blocks that hold their prefix, most recent first.

    Routing name i covers the first (i + 1) * BLOCK_BYTES bytes of the rendering; it is tied to
    the engine block that ends at the same share of the prompt's tokens, rounded up (so it goes
    no later than the KV it stands for). Only names whose block is held are kept; evicting a
    block drops every name tied to it. Bounded: the `capacity` most recent names.
    """

    def __init__(self, capacity: int = MAX_NAMES) -> None:
        self.capacity = capacity
        self._tied: OrderedDict[bytes, bytes] = OrderedDict()  # routing -> block, least recent first
        self._by_block: dict[bytes, set[bytes]] = {}

    def __len__(self) -> int:
        return len(self._tied)

    def __contains__(self, name: object) -> bool:
        return name in self._tied

    def link(self, route: Route, blocks: Sequence[bytes], block: int, prompt_tokens: int) -> None:
        """Tie `route`'s names to `blocks` (the held chain of the prompt's full blocks)."""
        if not blocks or route.rendered_bytes <= 0:
            return
        tied: list[tuple[bytes, bytes]] = []
        for i, name in enumerate(route.names):
            end_token = -(-(i + 1) * BLOCK_BYTES * prompt_tokens // route.rendered_bytes)
            at = max(0, -(-end_token // block) - 1)
            if at >= len(blocks):
                break  # that far into the prompt the engine holds no full block
            tied.append((name, blocks[at]))
        for name, owner in reversed(tied):  # a parent more recent than its child, as the store
            self._untie(name)
            self._tied[name] = owner
            self._by_block.setdefault(owner, set()).add(name)
        while len(self._tied) > self.capacity:
            self._untie(next(iter(self._tied)))

    def evicted(self, block_name: bytes) -> None:
        for name in self._by_block.pop(block_name, ()):
            self._tied.pop(name, None)

    def _untie(self, name: bytes) -> None:
        owner = self._tied.pop(name, None)
        if owner is not None:
            names = self._by_block.get(owner)
            if names is not None:
                names.discard(name)
                if not names:
                    del self._by_block[owner]

    def names(self, limit: int = MAX_NAMES) -> list[bytes]:
        """Most recent first, at most `limit`."""
        out: list[bytes] = []
        for name in reversed(self._tied):
            if len(out) >= limit:
                break
            out.append(name)
        return out


class PrefixStore:
    def __init__(self, cache: SlotCache, capacity_blocks: int, block: int = DEFAULT_BLOCK) -> None:
        self.cache = cache
        self.block = block
        self.capacity = capacity_blocks
        shape = cache.shape
        self._keys = [torch.zeros((capacity_blocks, s.kv_heads, block, s.key_dim),
                                  dtype=shape.dtype, device=cache.device) for s in shape.layers]
        self._values = [torch.zeros((capacity_blocks, s.kv_heads, block, s.value_dim),
                                    dtype=shape.dtype, device=cache.device)
                        for s in shape.layers]
        self._held: OrderedDict[bytes, int] = OrderedDict()  # name -> pool index, LRU first
        self._free = list(range(capacity_blocks - 1, -1, -1))
        self.hits = 0
        self.hit_tokens = 0
        self.routes = RoutedNames()

    @property
    def size_bytes(self) -> int:
        return self.cache.shape.bytes_per_token() * self.block * self.capacity

    @property
    def blocks_held(self) -> int:
        return len(self._held)

    def holds(self, name: bytes) -> bool:
        return name in self._held

    def match(self, tokens: list[int]) -> tuple[int, list[int]]:
        """(tokens covered, pool indexes) of the longest held prefix of `tokens` that leaves at
        least one token to compute; refreshes the chain in the LRU order."""
        if self.capacity == 0:
            return 0, []
        usable = (len(tokens) - 1) // self.block
        found: list[bytes] = []
        for name in chain_hashes(tokens[:usable * self.block], self.block):
            if name not in self._held:
                break
            found.append(name)
        for name in reversed(found):
            self._held.move_to_end(name)
        if found:
            self.hits += 1
            self.hit_tokens += len(found) * self.block
        return len(found) * self.block, [self._held[name] for name in found]

    def load(self, slot: int, indexes: list[int]) -> None:
        """Copy held blocks (a chain's pool indexes, in order) into the start of `slot`."""
        if not indexes:
            return
        index = torch.tensor(indexes, dtype=torch.long, device=self.cache.device)
        spans = []
        for keys, values in zip(self._keys, self._values, strict=True):
            # [n, heads, block, dim] -> [heads, n * block, dim]
            k = keys.index_select(0, index).transpose(0, 1).flatten(1, 2)
            v = values.index_select(0, index).transpose(0, 1).flatten(1, 2)
            spans.append((k, v))
        self.cache.write_span(slot, 0, spans)

    def store(self, tokens: list[int], slot: int, route: Route | None = None) -> int:
        """Hold the full blocks of `tokens` (already in `slot`) that are not held yet; returns
        how many were added. Evicts the least recently used blocks to make room (and the
        routing names tied to them). With `route` (`tokens` is then the request's prompt), its
        routing names are tied to the blocks."""
        if self.capacity == 0:
            return 0
        names = chain_hashes(tokens, self.block)[:self.capacity]
        missing = [n for n in names if n not in self._held]
        chain = set(names)
        while len(self._free) < len(missing):
            victim = next(name for name in self._held if name not in chain)
            self._free.append(self._held.pop(victim))
            self.routes.evicted(victim)
        new: list[tuple[int, int]] = []  # (block number, pool index)
        for number, name in enumerate(names):
            if name not in self._held:
                pool = self._free.pop()
                self._held[name] = pool
                new.append((number, pool))
        for name in reversed(names):  # parents more recent than their children
            self._held.move_to_end(name)
        if route is not None:
            self.routes.link(route, names, self.block, len(tokens))
        if not new:
            return 0
        block = self.block
        for (k, v), keys, values in zip(self.cache.read_span(slot, 0, len(names) * block),
                                        self._keys, self._values, strict=True):
            for number, pool in new:  # small contiguous copies: cheaper than a strided gather
                keys[pool] = k[:, number * block:(number + 1) * block]
                values[pool] = v[:, number * block:(number + 1) * block]
        return len(new)

    def summary(self, limit: int = 256) -> list[str]:
        """Names of held blocks, most recently used first (hex, at most `limit`)."""
        out = []
        for name in reversed(self._held):
            out.append(name.hex())
            if len(out) >= limit:
                break
        return out
