"""The response cache as one service: `lookup(request) -> Lookup`, `store(lookup, ...)`, and
`complete()` / `open_stream()` that wrap a router with both.

It owns the memory store, the optional SQLite file, the semantic index and the cache's metrics.
It never touches HTTP (the handler passes the `Cache-Control` header value in) and never routes
(it is handed a router). What it decides:

- a request is *eligible* when the cache is on, the client did not turn it off, and the answer is
  deterministic (embeddings, temperature 0, a seed) or the client opted in (`"cache": true`);
- an eligible request reads the exact key first; on a miss, and when the model is opted in to
  the semantic cache, it embeds the final prompt and takes the nearest kept answer in the same
  context whose similarity is at least the threshold;
- a hit is served here: cost 0, provider `cache`, `x_aiproxy.cache = "hit"` (with the match kind,
  and the similarity for a semantic hit); it never reaches the router, so it spends no budget;
- an eligible miss goes to the router and its answer is kept (a stream once it ended well).

The body's `cache` field is ours, not OpenAI's: it is removed before the request goes upstream,
whether the cache is on or not. A cache failure (an embedding model down) never fails a request:
it only costs a miss.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from meshnode.cache.entry import CachedAnswer
from meshnode.cache.key import (
    CACHE_HEADER,
    CacheDirective,
    SemanticParts,
    directive,
    exact_key,
    is_deterministic,
    semantic_parts,
)
from meshnode.cache.persist import SqliteStore, StoredRow
from meshnode.cache.replay import assemble, chunks_of
from meshnode.cache.semantic import Embedder, SemanticIndex, unit_vector, vector_bytes
from meshnode.cache.store import MemoryStore
from meshnode.config import CacheConfig
from meshnode.errors import MeshError
from meshnode.observability.loopmetrics import LoopCounter, LoopGauge
from meshnode.routing.outcome import Attempt, RoutedCompletion, RoutedStream, Served
from meshnode.types import Completion, InferenceRequest, ModelOffer, StreamChunk, Usage

log = logging.getLogger(__name__)

CACHE_PROVIDER = "cache"


class Routes(Protocol):
    """The part of the router the cache wraps."""

    async def complete(self, request: InferenceRequest) -> RoutedCompletion: ...

    async def open_stream(self, request: InferenceRequest) -> RoutedStream: ...


@dataclass(slots=True)
class CacheServed(Served):
    """`Served` for an answer from the cache: `x_aiproxy` also says how it matched."""

    match: str = "exact"  # exact | semantic
    similarity: float | None = None
    cached_provider: str | None = None  # who served it the first time

    def to_json(self) -> dict[str, Any]:
        # Served.to_json(self), not super(): slotted dataclasses break zero-argument super().
        out = Served.to_json(self)
        out["cache_match"] = self.match
        if self.similarity is not None:
            out["similarity"] = round(self.similarity, 4)
        if self.cached_provider is not None:
            out["cached_provider"] = self.cached_provider
        return out


@dataclass(frozen=True, slots=True)
class CacheHit:
    key: str
    answer: CachedAnswer
    match: str  # exact | semantic
    similarity: float | None = None


@dataclass(slots=True)
class Lookup:
    """The outcome of `lookup()`, carried to `store()` on a miss."""

    request: InferenceRequest  # what goes upstream: the body without our `cache` field
    directive: CacheDirective
    eligible: bool
    key: str | None = None
    hit: CacheHit | None = None
    semantic: SemanticParts | None = None
    vector: Any = None  # the prompt's unit vector, kept so a miss is indexed without re-embedding
    started: float = field(default_factory=time.perf_counter)

    @property
    def stores(self) -> bool:
        return self.eligible and self.hit is None and self.directive.writes


class CacheMetrics:
    """The cache's series (lock-free: `observability.loopmetrics`), on the node's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.lookups = LoopCounter(
            "meshnode_cache_lookups",
            "Response-cache lookups by result (hit, semantic_hit, miss, bypass, uncacheable)",
            ("result",), registry=registry,
        )
        self.saved = LoopCounter(
            "meshnode_cache_saved_usd", "Upstream cost avoided by cache hits, USD",
            registry=registry,
        )
        self.entries = LoopGauge("meshnode_cache_entries", "Answers kept", registry=registry)
        self.evictions = LoopCounter(
            "meshnode_cache_evictions", "Answers dropped for size or age", registry=registry
        )
        self.errors = LoopCounter(
            "meshnode_cache_errors", "Cache failures that cost a miss (embedding failed, ...)",
            ("stage",), registry=registry,
        )
        # Pre-resolved children: the hot path does no label lookup.
        self.result = {
            r: self.lookups.labels(r)
            for r in ("hit", "semantic_hit", "miss", "bypass", "uncacheable")
        }


def strip_cache_field(request: InferenceRequest) -> InferenceRequest:
    """The request without the body's `cache` field (copied only when the field is there)."""
    if "cache" not in request.body:
        return request
    return replace(request, body={k: v for k, v in request.body.items() if k != "cache"})


def _uncached(request: InferenceRequest, cache_control: str | None) -> InferenceRequest:
    """The request as the router gets it with the cache off: the client's directive is still
    checked (a malformed one is refused) and the body's `cache` field dropped. Without body
    field, header or Cache-Control there is nothing to check (the directive is AUTO)."""
    if "cache" in request.body or cache_control or CACHE_HEADER in request.headers:
        directive(request, cache_control)
        return strip_cache_field(request)
    return request


class ResponseCache:
    def __init__(
        self,
        config: CacheConfig,
        *,
        node_id: str,
        data_dir: Path | None = None,
        embedder: Embedder | None = None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.node_id = node_id
        self.embedder = embedder
        self._clock = clock
        self.memory = MemoryStore(config.max_entries, config.ttl_s, clock)
        self.index = SemanticIndex()
        self.persist = SqliteStore(data_dir) if config.persist and data_dir is not None else None
        self.metrics = CacheMetrics(registry if registry is not None else CollectorRegistry())
        semantic = config.semantic
        self._semantic_all = semantic.enabled and not semantic.models
        self._semantic_models = frozenset(semantic.models) if semantic.enabled else frozenset()
        self._on = config.enabled and config.max_entries > 0

    # ------------------------------------------------------------------ lifetime
    async def start(self) -> None:
        """Load the persistent store, when there is one."""
        if self.persist is None:
            return
        oldest = self._clock() - self.config.ttl_s if self.config.ttl_s > 0 else None
        rows = await self.persist.open(max(1, self.config.max_entries), oldest)
        for row in rows:
            self.memory.put(row.key, row.answer)
            if row.context is not None and row.vector is not None:
                self.index.add(row.key, row.context, unit_vector(row.vector))
        self.metrics.entries.set(len(self.memory))
        log.info("response cache: %d answers loaded from %s", len(rows), self.persist.path)

    async def close(self) -> None:
        """Flush and close the persistent store. Safe to call more than once."""
        persist, self.persist = self.persist, None
        if persist is not None:
            await persist.close()

    def semantic_enabled_for(self, model: str) -> bool:
        return self.embedder is not None and (self._semantic_all or model in self._semantic_models)

    # ------------------------------------------------------------------ the two verbs
    async def lookup(
        self, request: InferenceRequest, cache_control: str | None = None
    ) -> Lookup:
        """Decide and look: `Lookup.hit` is set on a hit. Raises InvalidRequest only for a
        malformed directive (`"cache": "yes"`)."""
        found = self._lookup_exact(request, cache_control)
        if found.eligible and found.hit is None:
            await self._semantic_or_miss(found)
        return found

    def _lookup_exact(self, request: InferenceRequest, cache_control: str | None) -> Lookup:
        """The directive, eligibility and the exact key's answer, without awaiting anything:
        the whole lookup but for an eligible miss (`_semantic_or_miss` finishes that one)."""
        wish = directive(request, cache_control)
        upstream = strip_cache_field(request)
        metrics = self.metrics
        if not self._on:
            return Lookup(upstream, wish, eligible=False)
        if wish is CacheDirective.OFF:
            metrics.result["bypass"].inc()
            return Lookup(upstream, wish, eligible=False)
        if wish is not CacheDirective.FORCE and not is_deterministic(request):
            metrics.result["uncacheable"].inc()
            return Lookup(upstream, wish, eligible=False)
        key = exact_key(upstream)
        found = Lookup(upstream, wish, eligible=True, key=key)
        if wish.reads:
            answer = self._get(key)
            if answer is not None:
                found.hit = CacheHit(key, answer, "exact")
                metrics.result["hit"].inc()
                metrics.saved.inc(answer.cost)
        return found

    async def _semantic_or_miss(self, found: Lookup) -> None:
        """An eligible request the exact key missed: the semantic index when the model is
        opted in, else (or when it misses too) a miss."""
        metrics = self.metrics
        if self.semantic_enabled_for(found.request.model):
            await self._semantic_lookup(found)
            if found.hit is not None:
                metrics.result["semantic_hit"].inc()
                metrics.saved.inc(found.hit.answer.cost)
                return
        metrics.result["miss" if found.directive.reads else "bypass"].inc()

    def store(
        self,
        lookup: Lookup,
        body: dict[str, Any],
        usage: Usage,
        *,
        provider: str,
        cost: float,
    ) -> bool:
        """Keep the answer of an eligible miss. Returns whether it was kept."""
        if not lookup.stores or lookup.key is None:
            return False
        if "x_aiproxy" in body:
            body = {k: v for k, v in body.items() if k != "x_aiproxy"}
        request = lookup.request
        answer = CachedAnswer(
            kind=request.kind, model=request.model, body=body, usage=usage,
            provider=provider, cost=cost, created_at=self._clock(),
        )
        key = lookup.key
        evicted = self.memory.put(key, answer)
        self._dropped(evicted)
        if key in evicted:
            return False
        context: str | None = None
        vector_raw: bytes | None = None
        if lookup.vector is not None and lookup.semantic is not None:
            context = lookup.semantic.context
            self.index.add(key, context, lookup.vector)
            vector_raw = vector_bytes(lookup.vector)
        if self.persist is not None:
            self.persist.put(StoredRow(key, answer, context, vector_raw))
        self.metrics.entries.set(len(self.memory))
        return True

    # ------------------------------------------------------------------ wrapping a router
    def complete(
        self, router: Routes, request: InferenceRequest, cache_control: str | None = None
    ) -> Awaitable[RoutedCompletion]:
        """`router.complete(request)`, answered from the cache when it can be (await it).

        With the cache off it is the router's own coroutine (no frame of this module on every
        resumption of the request)."""
        if not self._on:
            return router.complete(_uncached(request, cache_control))
        return self._complete(router, request, cache_control)

    async def _complete(
        self, router: Routes, request: InferenceRequest, cache_control: str | None
    ) -> RoutedCompletion:
        lookup = self._lookup_exact(request, cache_control)
        if lookup.eligible and lookup.hit is None:
            await self._semantic_or_miss(lookup)
        if lookup.hit is not None:
            answer = lookup.hit.answer
            return RoutedCompletion(
                Completion(body=answer.body, usage=answer.usage), self._served(lookup)
            )
        routed = await router.complete(lookup.request)
        if lookup.stores and routed.served.cache is None:
            self.store(
                lookup, routed.completion.body, routed.completion.usage,
                provider=routed.served.offer.provider, cost=routed.served.cost,
            )
        return routed

    def open_stream(
        self, router: Routes, request: InferenceRequest, cache_control: str | None = None
    ) -> Awaitable[RoutedStream]:
        """`router.open_stream(request)`; a hit replays the kept answer as a normal stream,
        an eligible miss is recorded and kept once it ended well (await it)."""
        if not self._on:
            return router.open_stream(_uncached(request, cache_control))
        return self._open_stream(router, request, cache_control)

    async def _open_stream(
        self, router: Routes, request: InferenceRequest, cache_control: str | None
    ) -> RoutedStream:
        lookup = await self.lookup(request, cache_control)
        if lookup.hit is not None:
            answer = lookup.hit.answer
            chunks = chunks_of(answer.kind, answer.body, answer.usage)
            return RoutedStream(chunks[0], _replay(chunks[1:]), self._served(lookup), _no_finish)
        routed = await router.open_stream(lookup.request)
        if not lookup.stores:
            return routed
        return _RecordingStream(routed, lambda chunks, served: self._store_stream(
            lookup, chunks, served))

    # ------------------------------------------------------------------ internals
    def _get(self, key: str) -> CachedAnswer | None:
        had = key in self.memory
        answer = self.memory.get(key)
        if answer is None and had:
            self._dropped([key])  # expired
        return answer

    def _dropped(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        for key in keys:
            self.index.remove(key)
        if self.persist is not None:
            self.persist.delete(keys)
        self.metrics.evictions.inc(len(keys))
        self.metrics.entries.set(len(self.memory))

    async def _semantic_lookup(self, found: Lookup) -> None:
        request = found.request
        parts = semantic_parts(request)
        if parts is None or self.embedder is None:
            return
        try:
            vectors = await self.embedder.embed([parts.text], request=request)
        except MeshError as exc:
            self.metrics.errors.labels("embed").inc()
            log.warning("semantic cache: embedding failed (%s); treating as a miss", exc.code)
            return
        found.semantic = parts
        found.vector = unit_vector(vectors[0])
        if not found.directive.reads:
            return
        match = self.index.nearest(parts.context, found.vector)
        if match is None or match.similarity < self.config.semantic.threshold:
            return
        answer = self._get(match.key)
        if answer is None:
            self.index.remove(match.key)
            return
        found.hit = CacheHit(match.key, answer, "semantic", match.similarity)

    def _served(self, lookup: Lookup) -> CacheServed:
        assert lookup.hit is not None
        hit = lookup.hit
        request = lookup.request
        latency_ms = (time.perf_counter() - lookup.started) * 1000.0
        offer = ModelOffer(
            model=request.model,
            provider=CACHE_PROVIDER,
            provider_kind=CACHE_PROVIDER,
            upstream_model=str(hit.answer.body.get("model") or request.model),
            kinds=frozenset({request.kind}),
        )
        return CacheServed(
            offer=offer,
            node=self.node_id,
            strategy=CACHE_PROVIDER,
            attempts=[Attempt(CACHE_PROVIDER, self.node_id, "hit", latency_ms)],
            usage=hit.answer.usage,
            cost=0.0,
            latency_ms=latency_ms,
            cache="hit",
            match=hit.match,
            similarity=hit.similarity,
            cached_provider=hit.answer.provider,
        )

    def _store_stream(
        self, lookup: Lookup, chunks: list[dict[str, Any]], served: Served
    ) -> None:
        if served.cache is not None:
            return
        body = assemble(lookup.request.kind, chunks, served.usage)
        if body is None:
            return
        self.store(lookup, body, served.usage, provider=served.offer.provider, cost=served.cost)


def _no_finish(served: Served, error: BaseException | None) -> None:
    """A hit has no upstream call to account for."""


async def _replay(chunks: list[StreamChunk]) -> AsyncIterator[StreamChunk]:
    for chunk in chunks:
        yield chunk


class _RecordingStream(RoutedStream):
    """A routed stream that also collects its chunks and hands them on once it ended well
    (never after an error or a client that went away: half an answer is not kept)."""

    def __init__(
        self,
        inner: RoutedStream,
        on_complete: Callable[[list[dict[str, Any]], Served], None],
    ) -> None:
        # Not calling RoutedStream.__init__: the inner stream does the iterating and accounting.
        self.first = inner.first
        self.served = inner.served
        self._inner = inner
        self._on_complete = on_complete

    async def __aiter__(self) -> AsyncIterator[StreamChunk]:
        chunks: list[dict[str, Any]] = []
        async for chunk in self._inner:
            chunks.append(chunk.data)
            yield chunk
        # The inner stream has finished its own accounting (usage, cost) by now.
        self._on_complete(chunks, self.served)

    async def aclose(self) -> None:
        await self._inner.aclose()


__all__ = [
    "CACHE_PROVIDER",
    "CacheHit",
    "CacheServed",
    "Lookup",
    "ResponseCache",
    "Routes",
    "strip_cache_field",
]
