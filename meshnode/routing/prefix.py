"""Prompt-prefix names for cache-aware routing: names every node computes alike.

The local engine names its KV blocks by token ids (`meshnode.worker.prefix`), but an entry node
may not have the serving node's tokenizer, or the model at all. Routing therefore uses its own
names, over the request's text, which every node computes the same way from the same body:

- `render` writes the prompt-bearing parts of the OpenAI body (`system`, `tools`, then each
  message or the `prompt`) as canonical JSON (orjson, sorted keys, UTF-8), one part a line. A
  later turn of a conversation resends the earlier messages unchanged, so its rendering starts
  with the earlier rendering.
- The rendering is cut into blocks of `BLOCK_BYTES` bytes; block i is named by blake2b (cut to
  `NAME_BYTES` bytes) of the model name's seed and every byte up to the end of block i (one
  running hash, copied at each block's end). A name stands for the whole prefix up to its block. Only full blocks are
  named, as in the engine.

A local worker ties the names of each prompt it served to the KV blocks that hold them and drops
them when its engine evicts those blocks (`meshnode.worker.prefix.RoutedNames`); the node
matches and gossips what the worker reports (`Capacity.prefix_recent`, `SCHEME` says how the
names were made; a receiver ignores a scheme it does not know). `PrefixIndex` (bounded, least
recently used out) keeps, in the router, the chains of local providers that cannot tell what
they hold. Naming a prompt costs ~54 µs for a 16 KB conversation, so for those an answer only
queues its prompt (`record_later`) and the index names the queued prompts when it is read (a
routing decision, a gossip round), newest first, stopping once it holds `capacity` fresh names:
older prompts could only have been evicted, so the index reads exactly as if every prompt had
been named when served. Still approximate: a name is tied to the block at the same share of the
prompt, not an exact token offset, and two renderings that tokenize alike but differ in JSON (a
client that reorders keys: they are sorted here) would not match.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

SCHEME = 1  # blake2b running over the prefix, model-seeded, 256-byte blocks of orjson, names cut to 8 bytes
BLOCK_BYTES = 256
NAME_BYTES = 8
MAX_NAMES = 512  # what a node gossips: 4 KiB of names
# Prompts queued unnamed at most (each holds its request's body until named or dropped).
MAX_PENDING = 32
SESSION_HEADER = "x-aiproxy-session"


def _dump(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE)


def _parts(body: Mapping[str, Any]) -> tuple[list[bytes], int]:
    """The rendered parts, and how many of them make the conversation's opening (through its
    first user message; 0 when it has none)."""
    parts: list[bytes] = []
    for key in ("system", "tools"):
        if body.get(key):
            parts.append(_dump(body[key]))
    opening = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in messages:
            parts.append(_dump(m))
            if not opening and isinstance(m, Mapping) and m.get("role") == "user":
                opening = len(parts)
    elif "prompt" in body:
        parts.append(_dump(body["prompt"]))
    return parts, opening


def render(body: Mapping[str, Any]) -> bytes:
    """The prompt-bearing parts of an OpenAI body, stable across turns."""
    return b"".join(_parts(body)[0])


def _seed(model: str) -> bytes:
    return hashlib.blake2b(model.encode(), digest_size=NAME_BYTES).digest()


def chain(model: str, text: bytes) -> tuple[bytes, ...]:
    """The chained name of every full block of `text`."""
    names: list[bytes] = []
    running = hashlib.blake2b(_seed(model), digest_size=NAME_BYTES)
    view = memoryview(text)
    for start in range(0, len(text) - BLOCK_BYTES + 1, BLOCK_BYTES):
        running.update(view[start:start + BLOCK_BYTES])
        names.append(running.copy().digest())
    return tuple(names)


@dataclass(frozen=True, slots=True)
class RequestPrefix:
    """A request's prefix chain and what rendezvous hashing keys it on."""

    chain: tuple[bytes, ...]
    # The session value, else the name of the conversation's opening, else the first block's
    # name, else the whole prompt's.
    affinity: bytes
    source: str  # "session" | "opening" | "first block" | "whole prompt"
    # The rendering's length in bytes: with the chain, what a local worker ties to its KV
    # blocks (the router hands this prefix to the local provider, so a prompt is named once).
    rendered_bytes: int = 0


def prompt_chain(model: str, body: Mapping[str, Any]) -> tuple[bytes, ...]:
    """The names of a request's prompt (what the local worker served), nothing more."""
    return chain(model, render(body))


def request_prefix(model: str, body: Mapping[str, Any],
                   headers: Mapping[str, str] | None = None) -> RequestPrefix:
    """The chain, and the affinity key: a conversation's opening (the system prompt, tools and
    messages through the first user message) when it has one. Every later turn resends the
    opening unchanged, so it finds the node its first turn went to, while conversations that
    share only a system prompt key apart and spread over the nodes (keyed on the first block,
    a group sharing a system prompt would all go to one node)."""
    parts, opening = _parts(body)
    text = b"".join(parts)
    names = chain(model, text)
    size = len(text)
    session = (headers or {}).get(SESSION_HEADER, "")
    if session:
        return RequestPrefix(names, b"session\0" + session.encode(), "session", size)
    if opening:
        digest = hashlib.blake2b(_seed(model), digest_size=NAME_BYTES, person=b"opening")
        for part in parts[:opening]:
            digest.update(part)
        return RequestPrefix(names, digest.digest(), "opening", size)
    if names:
        return RequestPrefix(names, names[0], "first block", size)
    whole = hashlib.blake2b(_seed(model) + text, digest_size=NAME_BYTES).digest()
    return RequestPrefix(names, whole, "whole prompt", size)


def worker_route(model: str, body: Mapping[str, Any],
                 named: RequestPrefix | None = None) -> tuple[bytes, int] | None:
    """What a local worker ties to the KV blocks of a prompt it serves: the prompt's names
    packed as on the gossip wire and its rendering's length (None: no full block). `named`:
    the router's names of the same request (`request_prefix`), used as they are."""
    if named is not None:
        names, size = named.chain, named.rendered_bytes
    else:
        text = render(body)
        names, size = chain(model, text), len(text)
    return (encode_names(names), size) if names else None


def leading_hits(names: Sequence[bytes], held: Container[bytes]) -> int:
    """How many leading blocks of `names` are held. A name stands for its whole prefix, so the
    longest held one counts (a child can outlive an evicted parent in a sketch)."""
    for i in range(len(names), 0, -1):
        if names[i - 1] in held:
            return i
    return 0


class PrefixIndex:
    """The chains this node's local worker served, most recent first, bounded.

    `record` takes names already made; `record_later` a way to make them, run only if they can
    still matter when the index is next read (see the module docstring). Both keep the order
    they were called in. Not thread-safe: the event loop's thread owns it."""

    def __init__(self, capacity: int = MAX_NAMES, max_pending: int = MAX_PENDING) -> None:
        self.capacity = capacity
        self._max_pending = max_pending
        self._names: OrderedDict[bytes, None] = OrderedDict()  # least recent first
        self._pending: list[Sequence[bytes] | Callable[[], Sequence[bytes]]] = []

    def record(self, names: Sequence[bytes]) -> None:
        self._queue(names)

    def record_later(self, names: Callable[[], Sequence[bytes]]) -> None:
        self._queue(names)

    def _queue(self, item: Sequence[bytes] | Callable[[], Sequence[bytes]]) -> None:
        self._pending.append(item)
        if len(self._pending) >= self._max_pending:
            self._settle()

    def _settle(self) -> None:
        """Apply the queued chains. Recording a chain touches its names last to first (a parent
        is more recent than its child, so eviction takes a chain's tail first, as the engine's
        store does); newest chain first, names first to last is therefore most recent first,
        and only the first `capacity` distinct names can survive the eviction."""
        pending, self._pending = self._pending, []
        fresh: dict[bytes, None] = {}  # most recent first
        for item in reversed(pending):
            for name in item() if callable(item) else item:
                fresh.setdefault(name)
            if len(fresh) >= self.capacity:
                break
        names = self._names
        for name in reversed(fresh):
            names[name] = None
            names.move_to_end(name)
        while len(names) > self.capacity:
            names.popitem(last=False)

    def __contains__(self, name: object) -> bool:
        if self._pending:
            self._settle()
        return name in self._names

    def __len__(self) -> int:
        if self._pending:
            self._settle()
        return len(self._names)

    def names(self) -> tuple[bytes, ...]:
        """Most recent first: what gossip carries."""
        if self._pending:
            self._settle()
        return tuple(reversed(self._names))


def encode_names(names: Sequence[bytes]) -> bytes:
    return b"".join(names[:MAX_NAMES])


def decode_names(blob: bytes) -> tuple[bytes, ...]:
    """Names from the wire, bounded; a ragged tail is dropped."""
    blob = blob[:MAX_NAMES * NAME_BYTES]
    whole = len(blob) - len(blob) % NAME_BYTES
    return tuple(blob[i:i + NAME_BYTES] for i in range(0, whole, NAME_BYTES))
