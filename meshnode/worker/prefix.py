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

`summary()` lists the held chain names (hex, most recent first): what `capacity()` carries so
that routing can later prefer the node holding a conversation's prefix. Names depend only on
the token ids and the block size, so nodes with the same tokenizer agree on them.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

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

    def store(self, tokens: list[int], slot: int) -> int:
        """Hold the full blocks of `tokens` (already in `slot`) that are not held yet; returns
        how many were added. Evicts the least recently used blocks to make room."""
        if self.capacity == 0:
            return 0
        names = chain_hashes(tokens, self.block)[:self.capacity]
        missing = [n for n in names if n not in self._held]
        chain = set(names)
        while len(self._free) < len(missing):
            victim = next(name for name in self._held if name not in chain)
            self._free.append(self._held.pop(victim))
        new: list[tuple[int, int]] = []  # (block number, pool index)
        for number, name in enumerate(names):
            if name not in self._held:
                pool = self._free.pop()
                self._held[name] = pool
                new.append((number, pool))
        for name in reversed(names):  # parents more recent than their children
            self._held.move_to_end(name)
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
