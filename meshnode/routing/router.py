"""The router: candidates, strategy, failover loop, per-candidate stats and cooldowns.

For one request it
1. collects the offers of every provider for the model and request kind, keeps those the fallback
   chain and the applying policy allow (and, for peers, those not already visited and within
   `max_hops`). That shortlist depends only on the offers, so it is computed once per (model,
   kind, policy, origin constraint, path) and kept until some provider's offers change;
2. ranks them with the strategy (pure functions in `strategies.py`) over what is measured right
   now, cooled-down ones last (a lone candidate is its own ranking: nothing is ranked);
3. tries them in order until one answers, at most `1 + max_retries` attempts, all before the
   first byte reaches the client and within one overall deadline. A non-retryable error (the
   client's bad request) ends the loop at once. Backoff with jitter is slept only before trying
   a candidate that already failed this request: moving on to another provider is immediate.

Provider faults that are not the client's:
- any exception a provider raises that is not a MeshError (a bug, a library's error) is a failed
  attempt like an upstream 5xx: logged once with its traceback, counted against the candidate,
  and the next candidate is tried. Only cancellation is "the client went away";
- an upstream 401/403 (`UpstreamAuthError`) is the operator's key: the candidate is cooled down
  at once, the next candidate is tried, an ERROR line is logged and the provider is reported in
  `provider_problems()` (readiness, metrics) until it answers again;
- a model that was offered recently but has no live provider now (its only peer died) is
  `NoCapacity` (503 with Retry-After), not `ModelNotFound` (`missing_model`).

It never touches HTTP: the front end hands it an `InferenceRequest` and gets back a
`RoutedCompletion` or a `RoutedStream` (see `outcome.py`), or a `MeshError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from meshnode.config import PolicyConfig, RoutingConfig
from meshnode.errors import (
    BudgetExceeded,
    DeadlineExceeded,
    MeshError,
    ModelNotFound,
    NoCapacity,
    UpstreamAuthError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from meshnode.governance.gate import FREE, UNCAPPED, Hold, SpendGate, prompt_tokens
from meshnode.observability import tracing
from meshnode.providers.base import Provider
from meshnode.routing.outcome import Attempt, RoutedCompletion, RoutedStream, Served
from meshnode.routing.policy import allows, carried_constraint, constraint_allows, match_policy
from meshnode.routing.prefix import (
    PrefixIndex,
    RequestPrefix,
    leading_hits,
    prompt_chain,
    request_prefix,
)
from meshnode.routing.stats import CandidateStats
from meshnode.routing.strategies import NO_AFFINITY, Affinity, Candidate, Ranked, demote, rank
from meshnode.types import (
    Capacity,
    Completion,
    InferenceRequest,
    ModelOffer,
    PolicyConstraint,
    RequestKind,
    StreamChunk,
    Usage,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Entry:
    """A candidate past the filters that change only with the offers: its provider, offer,
    stats key, place in the fallback chain, stats (kept as long as the router lives) and
    concurrency bound (config)."""

    provider: Provider
    offer: ModelOffer
    key: tuple[str, str]
    chain_index: int
    stats: CandidateStats
    max_concurrency: int  # the provider's bound on calls in flight (least_loaded's divisor)
    enforces_deadline: bool  # the provider's own (else the loop bounds each call)


@dataclass(frozen=True, slots=True)
class _Shortlist:
    """The routing plan for one (model, kind, policy, origin constraint, path) while no
    provider's offers change: the candidates, why the others were left out, and what follows
    from the policy alone (the strategy, the policy's name; with at most one candidate, nothing
    to rank: the attempts themselves)."""

    known: bool  # some provider offers the model at all
    entries: tuple[_Entry, ...]
    excluded: tuple[str, ...]
    strategy: str
    policy_name: str | None  # this node's rule's name, else the origin's
    # The attempts in order when there are fewer than two candidates (one is its own ranking
    # under every strategy, and no demotion moves it); None: ranked per request (`_order`).
    fixed_plan: tuple[_Entry, ...] | None


DEFAULT_OUTPUT_TOKENS = 256  # for ranking by cost when the client gives no max_tokens
# Errors that say nothing about the candidate's health: they neither cool it down nor count
# in its error rate.
NEUTRAL_CODES = frozenset({"local_queue_full", "local_not_ready"})
# A model offered this recently that has no live provider now is "come back later" (503), not
# "no such model" (404): its peer died or restarts, and gossip will bring it back.
MODEL_MEMORY_S = 900.0
MODEL_GONE_RETRY_AFTER_S = 5.0
# Shortlists kept at most (one per model, kind, policy, origin constraint and path seen since
# the offers last changed); past it they are all recomputed.
MAX_SHORTLISTS = 1024

# The attempt that answered, as the failover loop hands it back (a tuple: no record made and
# unpacked per request): its result, its candidate, its budget hold (still open), when it
# started, when it answered (the first chunk for a stream), when the request's first attempt
# started, the attempts that failed before it, and the plan (strategy, policy name).
_Won = tuple[T, _Entry, Hold, float, float, float, list[Attempt], _Shortlist]


def _abandon(hold: Hold) -> None:
    hold.abandon()


# An attempt's span while tracing is off (reusable).
_NO_SPAN = contextlib.nullcontext()


class Router:
    def __init__(
        self,
        routing: RoutingConfig,
        chain: Sequence[str],
        providers: Sequence[Provider],
        node_id: str,
        *,
        max_hops: int = 2,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        spend: SpendGate | None = None,
    ) -> None:
        self._config = routing
        # Read per request, kept here: attribute reads on a config model (pydantic) are not
        # specialised by the interpreter (its __getattr__), ~500 instructions each.
        self._policies = routing.policies
        self._timeouts = routing.timeouts
        timeouts = self._timeouts
        # A non-stream attempt: the provider's coroutine itself (awaited by the failover loop),
        # not one that awaits it: one frame less on every resumption of the request. Made once
        # (a bound method read as a value per request is not specialised either).
        self._complete_call: Callable[[Provider, ModelOffer, InferenceRequest],
                                      Awaitable[Completion]] = (
            lambda provider, offer, req: provider.complete(req, offer, timeouts))
        self._chain = list(chain)
        self._providers: list[Provider] = list(providers)
        self._fixed_offers = self._all_fixed()
        self.node_id = node_id
        self._max_hops = max_hops
        # Called through a local where it runs per request (`clock = self._clock; clock()`):
        # `self._clock()` reads an instance attribute the way a method is read, which the
        # interpreter does not specialise (~400 instructions a call).
        self._clock = clock
        self._rng = rng or random.Random()
        # Budget hook: reserve before each attempt, settle or release after (governance/gate.py).
        self._spend = spend
        self._stats: dict[tuple[str, str], CandidateStats] = {}
        self._turn = 0
        self._created = int(time.time())
        self._offered_at: dict[str, float] = {}  # model -> when an offer for it was last seen
        # provider -> why: its upstream rejected this node's credentials (until it answers again)
        self._rejected_credentials: dict[str, str] = {}
        # The prompt prefixes this node's local providers served, for those that cannot tell
        # what their engine holds (a local worker reports that itself: `Capacity.prefix_recent`).
        self.prefix_index = PrefixIndex()
        # The routing plan: shortlists computed once per model, policy, ... and offers seen
        # (`_shortlist`); every provider's offers when they were computed.
        self._shortlists: dict[tuple[Any, ...], _Shortlist] = {}
        self._offers_seen: tuple[tuple[ModelOffer, ...], ...] = ()
        # What those offers serve: model names, and (model, kind) pairs (`has_model`).
        self._served_index: tuple[frozenset[str], frozenset[tuple[str, RequestKind]]] | None = None

    # ------------------------------------------------------------------ providers
    def add_provider(self, provider: Provider) -> None:
        """Providers may be added after start (the mesh provider)."""
        self._providers.append(provider)
        self._fixed_offers = self._all_fixed()
        self._offers_seen = ()  # read again, the new provider's with the rest (fixed or not)

    def _all_fixed(self) -> bool:
        """Whether every provider's offers are fixed for its life (`Provider.fixed_offers`)."""
        return all(getattr(p, "fixed_offers", False) for p in self._providers)

    @property
    def providers(self) -> Sequence[Provider]:
        return tuple(self._providers)

    @property
    def timeouts(self) -> Any:
        return self._config.timeouts

    def _all_offers(self) -> list[tuple[Provider, ModelOffer]]:
        return [(p, o) for p in self._providers for o in p.offers()]

    def models(self) -> list[dict[str, Any]]:
        """Distinct models for /v1/models, each with the kinds and providers offering it."""
        by_name: dict[str, dict[str, Any]] = {}
        for _, offer in self._all_offers():
            entry = by_name.get(offer.model)
            if entry is None:
                entry = by_name[offer.model] = {
                    "id": offer.model,
                    "object": "model",
                    "created": self._created,
                    "owned_by": "meshnode",
                    "kinds": set(),
                    "providers": [],
                }
            entry["kinds"].update(k.value for k in offer.kinds)
            where = offer.provider if offer.node is None else f"{offer.provider}:{offer.node}"
            if where not in entry["providers"]:
                entry["providers"].append(where)
        now = self._clock()
        out = []
        for entry in by_name.values():
            entry["kinds"] = sorted(entry["kinds"])
            self._offered_at[entry["id"]] = now
            out.append(entry)
        out.sort(key=lambda e: e["id"])
        return out

    def has_model(self, model: str, kind: RequestKind | None = None) -> bool:
        self._offers_now()
        index = self._served_index
        if index is None:
            index = self._served_index = (
                frozenset(o.model for offered in self._offers_seen for o in offered),
                frozenset((o.model, k) for offered in self._offers_seen for o in offered
                          for k in o.kinds),
            )
        if model in index[0] if kind is None else (model, kind) in index[1]:
            clock = self._clock
            self._offered_at[model] = clock()
            return True
        return False

    def _offers_now(self) -> tuple[tuple[ModelOffer, ...], ...]:
        """Every provider's offers now; what was derived from them (shortlists, the served
        index) is dropped when some provider's changed: an identity check per offer when
        nothing moved. Offers that are all fixed (`Provider.fixed_offers`) are read once."""
        if self._fixed_offers and self._offers_seen:
            return self._offers_seen
        # (a list comprehension: map() over a methodcaller reads `offers` generically and calls
        # into Python from C, ~1,500 instructions more per provider)
        offers = tuple([tuple(p.offers()) for p in self._providers])
        if offers != self._offers_seen:
            self._offers_seen = offers
            self._shortlists.clear()
            self._served_index = None
        return offers

    def missing_model(self, model: str) -> MeshError:
        """The error for a request naming a model nothing offers now: 503 with Retry-After when
        it was offered within MODEL_MEMORY_S (its provider or peer is gone for now), else 404."""
        seen = self._offered_at.get(model)
        if seen is not None and self._clock() - seen <= MODEL_MEMORY_S:
            ago = self._clock() - seen
            return NoCapacity(
                f"no live provider serves the model {model!r} now (it was offered {ago:.0f} s "
                "ago; the provider or peer serving it is gone); retry shortly",
                retry_after=MODEL_GONE_RETRY_AFTER_S,
            )
        return ModelNotFound(
            f"the model {model!r} does not exist on this node or its mesh; "
            "GET /v1/models lists what is served",
            param="model",
        )

    def provider_problems(self) -> dict[str, str]:
        """Providers that cannot serve for a reason the operator must fix, with the reason (for
        /health/ready and metrics): today, credentials their upstream rejected."""
        return dict(self._rejected_credentials)

    # ------------------------------------------------------------------ stats
    def _stats_for(self, offer: ModelOffer) -> CandidateStats:
        key = offer.key
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = CandidateStats(provider=key[0], model=offer.model)
        return stats

    def stats(self) -> dict[str, Any]:
        """For /admin/stats: `{"candidates": [per provider and model], "totals": {...}}`."""
        now = self._clock()
        rows = [s.snapshot(now) for s in self._stats.values()]
        rows.sort(key=lambda r: (r["provider"], r["model"]))
        return {
            "candidates": rows,
            "totals": {
                "requests": sum(r["requests"] for r in rows),
                "errors": sum(r["errors"] for r in rows),
                "cost": round(sum(r["cost"] for r in rows), 8),
                "tokens": sum(r["tokens"]["total"] for r in rows),
            },
        }

    def latency_snapshot(self) -> dict[str, dict[str, float | None]]:
        """Per model, this node's own measured latency over its non-mesh providers (for gossip)."""
        out: dict[str, dict[str, float | None]] = {}
        for (provider, model), s in self._stats.items():
            if provider.startswith("mesh") or s.latency_ewma_ms is None:
                continue
            lat = sorted(s.latencies)
            cur = out.get(model)
            if cur is None or (cur["ewma_ms"] or 1e18) > s.latency_ewma_ms:
                out[model] = {
                    "ewma_ms": s.latency_ewma_ms,
                    "p95_ms": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))] if lat else None,
                    "ttft_ms": s.ttft_ewma_ms,
                }
        return out

    # ------------------------------------------------------------------ candidates
    def _chain_index(self, offer: ModelOffer) -> int | None:
        for i, entry in enumerate(self._chain):
            if entry == offer.provider or entry == offer.provider_kind:
                return i
        return None

    def _shortlist(self, request: InferenceRequest, policy: PolicyConfig | None,
                   incoming: PolicyConstraint | None) -> _Shortlist:
        """The candidates that pass the filters which change only with the offers (kind, chain,
        policies, the request's path), computed once per (model, kind, policy, origin
        constraint, path) and kept until some provider's offers change: comparing the offers
        with the last ones seen is an identity check per offer when nothing moved."""
        offers = self._offers_now()
        # The policy is one of this node's config objects, alive as long as the router.
        key = (request.model, request.kind, id(policy), incoming, request.visited)
        found = self._shortlists.get(key)
        if found is None:
            found = self._build_shortlist(request, policy, incoming, offers)
            if found.known:  # a made-up model name is not kept
                if len(self._shortlists) >= MAX_SHORTLISTS:
                    self._shortlists.clear()
                self._shortlists[key] = found
        return found

    def _build_shortlist(
        self, request: InferenceRequest, policy: PolicyConfig | None,
        incoming: PolicyConstraint | None, offers: tuple[tuple[ModelOffer, ...], ...],
    ) -> _Shortlist:
        entries: list[_Entry] = []
        excluded: list[str] = []
        known = False
        for provider, offered in zip(self._providers, offers, strict=True):
            for offer in offered:
                if offer.model != request.model:
                    continue
                known = True
                label = offer.provider if offer.node is None else f"{offer.provider}:{offer.node}"
                if request.kind not in offer.kinds:
                    excluded.append(f"{label}: does not serve {request.kind.value}")
                    continue
                idx = self._chain_index(offer)
                if idx is None:
                    excluded.append(f"{label}: not in the fallback chain")
                    continue
                if not allows(policy, offer):
                    excluded.append(
                        f"{label}: forbidden by policy {policy.name if policy else ''}")
                    continue
                if not constraint_allows(incoming, offer):
                    excluded.append(
                        f"{label}: forbidden by policy {incoming.name if incoming else ''} "
                        "(from the origin)"
                    )
                    continue
                if offer.node is not None:
                    if offer.node in request.visited or offer.node == self.node_id:
                        excluded.append(f"{label}: already on this request's path")
                        continue
                    if len(request.visited) >= self._max_hops:
                        excluded.append(f"{label}: max_hops {self._max_hops} reached")
                        continue
                entries.append(_Entry(provider, offer, offer.key, idx, self._stats_for(offer),
                                      getattr(provider, "max_concurrency", 256),
                                      provider.enforces_deadline))
        strategy = (policy.strategy if policy and policy.strategy else None) or self._config.strategy
        name = policy.name if policy else (incoming.name if incoming else None)
        fixed = tuple(self._attempt_plan(entries)) if len(entries) <= 1 else None
        return _Shortlist(known, tuple(entries), tuple(excluded), strategy, name, fixed)

    def _choose(self, request: InferenceRequest) -> tuple[_Shortlist, PolicyConfig | None]:
        """The plan (`_Shortlist`) for a request and this node's rule that matched it (None:
        none); counts it as a routing turn."""
        policies = self._policies
        policy = match_policy(
            policies,
            request.model,
            request.headers,
            request.key_name,
            request.prompt_tokens_estimate,
        ) if policies else None
        # request.policy: the origin's constraints, when a peer forwarded this
        shortlist = self._shortlist(request, policy, request.policy)
        if not shortlist.known:
            raise self.missing_model(request.model)
        clock = self._clock
        self._offered_at[request.model] = clock()
        self._turn += 1
        return shortlist, policy

    def _plan(
        self, request: InferenceRequest
    ) -> tuple[list[Ranked], str, str | None, list[str], PolicyConfig | None]:
        """Rank the candidates for a request. Returns (ranking, strategy, policy name, excluded
        with reasons, the rule of this node that matched)."""
        shortlist, rule = self._choose(request)
        ranking, _ = self._rank(request, shortlist.entries, shortlist.strategy, self._clock())
        return (ranking, shortlist.strategy, shortlist.policy_name, list(shortlist.excluded),
                rule)

    def _rank(
        self, request: InferenceRequest, entries: Sequence[_Entry], strategy: str, now: float
    ) -> tuple[list[Ranked], RequestPrefix | None]:
        """The strategy's ranking over what is known of each candidate right now (measured
        latency, errors, load, cooldowns, queues), and the request's prefix when the strategy
        read it."""
        out_tokens = (DEFAULT_OUTPUT_TOKENS if request.max_output_tokens is None
                      else request.max_output_tokens)
        candidates: list[Candidate] = []
        queues: dict[tuple[str, str], int] = {}
        prefix = self._prefix(request) if strategy == "cache_aware" else None
        prompt_tokens = request.prompt_tokens_estimate
        prefix_blocks = len(prefix.chain) if prefix else 0
        for entry in entries:
            provider, offer, stats = entry.provider, entry.offer, entry.stats
            capacity = provider.capacity_for(offer)
            # What this node measured itself outweighs an estimate (a peer's gossip).
            latency = stats.latency_ewma_ms
            if latency is None:
                latency = provider.latency_ms_for(offer)
            estimated_cost = (prompt_tokens * offer.cost_per_1k_input
                              + out_tokens * offer.cost_per_1k_output) / 1000.0
            prefix_hit = 0 if prefix is None else self._prefix_hit(prefix, offer, capacity)
            if capacity is not None:
                queues[entry.key] = capacity.queue_depth
            candidates.append(
                Candidate(
                    offer=offer,
                    chain_index=entry.chain_index,
                    estimated_cost=estimated_cost,
                    latency_ms=latency,
                    error_rate=stats.error_rate,
                    in_flight=stats.in_flight,
                    load=capacity.load if capacity is not None else None,
                    max_concurrency=entry.max_concurrency,
                    node_id=offer.node or self.node_id,
                    prefix_hit=prefix_hit,
                    prefix_blocks=prefix_blocks,
                    slots_free=capacity.slots_free if capacity is not None else None,
                    queue_depth=capacity.queue_depth if capacity is not None else 0,
                    slots_total=capacity.slots_total if capacity is not None else 0,
                    tokens_per_s=capacity.tokens_per_s if capacity is not None else 0.0,
                    prefill_tokens_per_s=(capacity.prefill_tokens_per_s
                                          if capacity is not None else 0.0),
                    decode_tokens_per_s=(capacity.decode_tokens_per_s
                                         if capacity is not None else 0.0),
                    prompt_tokens=prompt_tokens,
                    output_tokens=out_tokens,
                )
            )
        affinity = Affinity(prefix.affinity, prefix.source) if prefix else NO_AFFINITY
        ranking = rank(strategy, candidates, self._turn, affinity)
        cooled = {e.key for e in entries if e.stats.cooled_down(now)}
        if cooled:
            ranking = demote(ranking, cooled, "cooling down after failures")
        # A provider whose queue is over the bound overflows to the next candidate instead of
        # queueing the request behind it (it stays as the last resort).
        bound = self._config.overflow_queue_depth
        overflowing = {k for k, q in queues.items() if q > bound}
        if overflowing and len(overflowing) < len(ranking):
            ranking = demote(ranking, overflowing, f"queue over {bound}: overflow")
        return ranking, prefix

    def _order(
        self, request: InferenceRequest, shortlist: _Shortlist
    ) -> tuple[list[_Entry], RequestPrefix | None]:
        """The candidates best first, for serving (two or more: fewer have their plan fixed)."""
        entries = shortlist.entries
        ranking, prefix = self._rank(request, entries, shortlist.strategy, self._clock())
        by_offer = {id(e.offer): e for e in entries}
        return [by_offer[id(r.candidate.offer)] for r in ranking], prefix

    @staticmethod
    def _prefix(request: InferenceRequest) -> RequestPrefix | None:
        if request.kind not in (RequestKind.CHAT, RequestKind.COMPLETION):
            return None
        return request_prefix(request.model, request.body, request.headers)

    def _record_prefix(self, request: InferenceRequest, prefix: RequestPrefix | None) -> None:
        """The local worker served this prompt: into the prefix index, named now when the
        ranking already named it, else only once someone reads the index."""
        if prefix is not None:
            self.prefix_index.record(prefix.chain)
        elif request.kind in (RequestKind.CHAT, RequestKind.COMPLETION):
            model, body = request.model, request.body
            self.prefix_index.record_later(lambda: prompt_chain(model, body))

    def _prefix_hit(self, prefix: RequestPrefix | None, offer: ModelOffer,
                    capacity: Capacity | None) -> int:
        """Leading blocks of the request's prefix the serving node holds: what a local worker
        reports its engine holds (or, for a local provider that cannot tell, what this router
        saw it serve), a peer's gossiped names for the peer."""
        if prefix is None:
            return 0
        if offer.node is None and offer.provider_kind != "local":
            return 0
        if capacity is not None and (offer.node is not None or capacity.prefix_recent is not None):
            return leading_hits(prefix.chain, capacity.prefix_names)
        # A local provider that cannot tell what its engine holds: what it served.
        return leading_hits(prefix.chain, self.prefix_index) if offer.node is None else 0

    @staticmethod
    def _records(provider: Provider) -> bool:
        """Whether this router keeps the provider's prefixes itself: a local worker reports what
        its engine holds (and drops what it evicts), anything else cannot tell."""
        capacity = provider.capacity()
        return capacity is None or capacity.prefix_recent is None

    def _attempt_plan(self, order: list[_Entry]) -> list[_Entry]:
        """The sequence of candidates to try: the ranking, cycled, capped by max_retries."""
        if not order:
            return []
        failover = self._config.failover
        total = 1 + failover.max_retries if failover.enabled else 1
        return (order * (total // len(order) + 1))[:total]  # order[i % len(order)], i < total

    def _backoff_s(self, retry_no: int) -> float:
        b = self._config.failover.backoff
        delay = min(b.max_ms, b.initial_ms * (b.multiplier ** max(0, retry_no - 1))) / 1000.0
        return max(0.0, delay * (1.0 + self._rng.uniform(-b.jitter, b.jitter)))

    def _no_candidates(self, request: InferenceRequest, policy: str | None,
                       excluded: Sequence[str]) -> MeshError:
        why = "; ".join(excluded) if excluded else "no provider offers it now"
        if policy is not None:
            return NoCapacity(
                f"No allowed provider can serve '{request.model}' under policy '{policy}' ({why})",
                retry_after=1.0,
            )
        return NoCapacity(f"Nothing can serve '{request.model}' now ({why})", retry_after=1.0)

    # ------------------------------------------------------------------ serving
    async def complete(self, request: InferenceRequest) -> RoutedCompletion:
        """Serve a non-stream request with failover. Raises MeshError."""
        # A client gone mid-call: the upstream may finish and bill it anyway.
        completion, entry, hold, t0, t1, start, attempts, plan = await self._failover(
            request, self._complete_call, "was answering", _abandon)
        offer, stats = entry.offer, entry.stats
        latency_ms = (t1 - t0) * 1000.0
        # A peer reports what it charged (docs/security.md); both ledgers settle on it.
        cost = offer.cost(completion.usage) if completion.cost is None else completion.cost
        hold.settle(completion.usage, cost=completion.cost)
        stats.in_flight -= 1
        stats.record_success(latency_ms, completion.usage, cost)
        node = completion.node or offer.node or self.node_id
        # (Records built per request take their fields by position: keywords would cost a
        # dict each.) Attempt: outcome "ok", not retryable, not cooled, the peer if any.
        attempts.append(Attempt(offer.provider, node, "ok", latency_ms, False, False, offer.node))
        # Served: the offer, node, strategy, attempts, usage, cost, latency, cache (none), policy.
        served = Served(offer, node, plan.strategy, attempts, completion.usage, cost,
                        (t1 - start) * 1000.0, None, plan.policy_name)
        return RoutedCompletion(completion, served)

    async def open_stream(self, request: InferenceRequest) -> RoutedStream:
        """Fail over until a candidate yields its first chunk, then commit to it."""

        async def call(
            provider: Provider, offer: ModelOffer, req: InferenceRequest
        ) -> tuple[StreamChunk, AsyncIterator[StreamChunk]]:
            agen = provider.stream(req, offer, self._timeouts)
            try:
                first = await agen.__anext__()
            except StopAsyncIteration:
                raise UpstreamError(
                    f"{offer.provider} ended the stream before any chunk", provider=offer.provider
                ) from None
            except BaseException:
                await _close_quietly(agen)
                raise
            return first, agen

        # A client gone before the first chunk: the prompt was read, nothing generated.
        (first, agen), entry, hold, t0, t1, start, attempts, plan = await self._failover(
            request, call, "sent a first chunk", lambda hold: hold.settle(None)
        )
        offer, stats = entry.offer, entry.stats
        stats.record_ttft((t1 - t0) * 1000.0)
        node = first.node or offer.node or self.node_id
        attempts.append(Attempt(offer.provider, node, "ok", (t1 - t0) * 1000.0, peer=offer.node))
        served = Served(
            offer=offer, node=node, strategy=plan.strategy, attempts=attempts,
            policy=plan.policy_name,
        )
        # in_flight stays counted until the stream ends (the finisher releases it).
        return RoutedStream(
            first, agen, served, self._stream_finisher(request, stats, offer, start, t0, hold),
        )

    async def _failover(
        self,
        request: InferenceRequest,
        call: Callable[[Provider, ModelOffer, InferenceRequest], Awaitable[T]],
        doing: str,
        on_client_gone: Callable[[Hold], object],
    ) -> _Won[T]:
        """The failover loop shared by both verbs: try the ranked candidates until `call`
        returns. The winner comes back still counted in flight, its budget hold open."""
        shortlist, rule = self._choose(request)
        plan: Sequence[_Entry] | None = shortlist.fixed_plan
        prefix = None
        if plan is None:
            order, prefix = self._order(request, shortlist)
            plan = self._attempt_plan(order)
        if rule is not None or request.policy is not None:  # else both keep it as it is
            request = self._bounded_by_policy(request, rule)
            request = self._carrying_policy(request, rule)
        policy, excluded = shortlist.policy_name, shortlist.excluded
        if not plan:
            raise self._no_candidates(request, policy, excluded)
        attempts: list[Attempt] = []
        # The attempts, in this frame (not a coroutine it awaits: one frame less on every
        # resumption of the request).
        try:
            clock = self._clock
            start = clock()
            spend = self._spend  # the budget: reserve before each attempt, settle after
            tried: set[tuple[str, str]] = set()
            last: MeshError | None = None
            # Made only on a failure (a request whose first attempt answers makes neither).
            unaffordable: frozenset[tuple[str, str]] = frozenset()
            told_to_wait: frozenset[tuple[str, str]] = frozenset()  # answered 429, Retry-After
            for entry in plan:
                offer, provider, stats, key = entry.offer, entry.provider, entry.stats, entry.key
                if tried or unaffordable:  # (before a first attempt: nothing to skip or wait for)
                    if key in unaffordable:
                        continue
                    if key in told_to_wait and stats.cooled_down(clock()):
                        continue  # never re-sent before its Retry-After; the next one goes now
                    if key in tried:
                        await self._pause_before(len(attempts), request)
                try:
                    hold = UNCAPPED if spend is None else spend.reserve(request, offer)
                except BudgetExceeded as exc:
                    # Spent budget: skip paid candidates, free ones may still serve.
                    last = exc
                    unaffordable |= {key}
                    continue
                tried.add(key)
                # A peer attempt carries what this node holds for it (the peer's spending cap);
                # a local worker's, the names cache_aware made of its prompt (made once).
                if offer.node is not None:
                    attempt = dataclasses.replace(request, held=hold.held())
                elif prefix is not None and offer.provider_kind == "local":
                    attempt = dataclasses.replace(request, prefix=prefix)
                else:
                    attempt = request
                t0 = clock()
                stats.in_flight += 1
                try:
                    with (tracing.attempt_span(offer.provider, offer.model, offer.node,
                                               len(attempts) + 1)
                          if tracing.enabled() else _NO_SPAN):
                        if entry.enforces_deadline:
                            result = await call(provider, offer, attempt)
                        else:
                            async with asyncio.timeout(max(0.0, request.deadline - t0)):
                                result = await call(provider, offer, attempt)
                except TimeoutError:
                    hold.release()
                    stats.in_flight -= 1
                    last = DeadlineExceeded(
                        f"The request's deadline passed before {offer.provider} {doing}",
                        provider=offer.provider,
                    )
                    self._failed(stats, offer, last, attempts, t0)
                    raise self._final_error(last, attempts) from None
                except MeshError as exc:
                    hold.release()
                    stats.in_flight -= 1
                    last = exc
                    self._failed(stats, offer, exc, attempts, t0)
                    if isinstance(exc, UpstreamAuthError):
                        self._credentials_rejected(offer, exc)
                        continue  # the operator's key, not the client's request: try the next
                    if not exc.retryable:
                        raise
                    if isinstance(exc, UpstreamRateLimited) and exc.retry_after:
                        told_to_wait |= {key}
                    continue
                except Exception as exc:  # noqa: BLE001 - a provider's bug is a failed attempt
                    hold.release()
                    stats.in_flight -= 1
                    last = self._provider_raised(offer, exc)
                    self._failed(stats, offer, last, attempts, t0)
                    continue
                except BaseException:  # cancelled: the client went away
                    on_client_gone(hold)
                    stats.in_flight -= 1
                    raise
                if self._rejected_credentials:
                    self._rejected_credentials.pop(offer.provider, None)
                if (offer.node is None and offer.provider_kind == "local"
                        and self._records(provider)):
                    self._record_prefix(request, prefix)
                return (result, entry, hold, t0, clock(), start, attempts, shortlist)
            raise self._final_error(last, attempts, request, policy, excluded)
        except MeshError as exc:
            # The log line and metrics of a failed request say what was tried.
            exc.attempts = tuple(attempts)
            raise

    def _stream_finisher(
        self, request: InferenceRequest, stats: CandidateStats, offer: ModelOffer, start: float,
        t0: float, hold: Hold = FREE,
    ) -> Callable[[Served, BaseException | None], None]:
        def finish(served: Served, error: BaseException | None) -> None:
            stats.in_flight -= 1
            now = self._clock()
            served.latency_ms = (now - start) * 1000.0
            if served.reported_cost is not None:
                # A peer's stream: its charge is the cost, in both ledgers.
                served.cost = served.reported_cost
                hold.settle(served.usage, served.chunks, cost=served.reported_cost)
            elif served.usage.total_tokens:
                served.cost = offer.cost(served.usage)
                hold.settle(served.usage, served.chunks)
            else:
                # A stream cut short has no usage: it pays its prompt and the chunks relayed,
                # and says so (estimated), so the log line and x_aiproxy agree with the charge.
                served.usage = Usage(prompt_tokens=prompt_tokens(request),
                                     completion_tokens=served.chunks, estimated=True)
                charged = hold.settle(None, served.chunks)
                served.cost = charged if hold not in (FREE, UNCAPPED) else offer.cost(served.usage)
            if error is None or isinstance(error, (GeneratorExit, asyncio.CancelledError)):
                stats.record_success((now - t0) * 1000.0, served.usage, served.cost)
            else:
                code = error.code if isinstance(error, MeshError) and error.code else "error"
                stats.record_failure(str(code), now, self._config.failover.cooldown)

        return finish

    def _carrying_policy(
        self, request: InferenceRequest, rule: PolicyConfig | None
    ) -> InferenceRequest:
        """Attach the constraints a forwarded copy must carry (this node's matched rule merged
        with the one the request arrived with), so a peer honours them too."""
        carried = carried_constraint(rule, request.policy)
        return request if carried == request.policy else dataclasses.replace(request, policy=carried)

    def _bounded_by_policy(
        self, request: InferenceRequest, rule: PolicyConfig | None
    ) -> InferenceRequest:
        """A policy's `deadline_ms` shortens the request's deadline (never lengthens it)."""
        if rule is None or rule.deadline_ms is None:
            return request
        deadline = min(request.deadline, self._clock() + rule.deadline_ms / 1000.0)
        if deadline == request.deadline:
            return request
        return dataclasses.replace(request, deadline=deadline)

    async def _pause_before(self, n_attempts: int, request: InferenceRequest) -> None:
        """Back off before re-trying a candidate this request already tried."""
        delay = self._backoff_s(n_attempts)
        remaining = request.deadline - self._clock()
        if delay >= remaining:
            raise DeadlineExceeded("The request's deadline passed while retrying")
        await asyncio.sleep(delay)

    def _provider_raised(self, offer: ModelOffer, exc: BaseException) -> MeshError:
        """An exception that is not a MeshError, from a provider: a bug or an untranslated
        library error. Logged here, once, with its traceback; an upstream failure from then
        on (retryable: the request was not the problem)."""
        log.error(
            "provider %s raised %s serving %s; counted as a failed attempt, trying the next "
            "candidate", offer.provider, type(exc).__name__, offer.model, exc_info=exc,
        )
        return UpstreamUnavailable(
            f"{offer.provider} failed unexpectedly ({type(exc).__name__})",
            code="provider_error", provider=offer.provider,
        )

    def _credentials_rejected(self, offer: ModelOffer, exc: UpstreamAuthError) -> None:
        """The upstream refused this node's credentials: cooled down (in `_failed`), reported
        until the provider answers again, and logged at ERROR."""
        self._rejected_credentials[offer.provider] = exc.message
        log.error(
            "provider %s: %s; it is cooled down and the next candidate is tried",
            offer.provider, exc.message,
        )

    def _failed(
        self,
        stats: CandidateStats,
        offer: ModelOffer,
        exc: MeshError,
        attempts: list[Attempt],
        t0: float,
    ) -> None:
        now = self._clock()
        code = exc.code or type(exc).__name__
        retry_after = exc.retry_after if isinstance(exc, UpstreamRateLimited) else None
        if isinstance(exc, UpstreamAuthError):
            # Bad credentials do not heal by retrying: cool down at once, for the longest an
            # upstream may ask for.
            retry_after = self._config.failover.cooldown.max_retry_after_s
        # Rejected credentials fail over too (see _credentials_rejected).
        fails_over = exc.retryable or isinstance(exc, UpstreamAuthError)
        # The client's bad request says nothing about the provider's health.
        counts = fails_over and code not in NEUTRAL_CODES
        stats.record_failure(code, now, self._config.failover.cooldown, retry_after, counts)
        attempts.append(Attempt(
            offer.provider, offer.node or self.node_id, code, (now - t0) * 1000,
            retryable=fails_over, cooled=counts and stats.cooled_down(now), peer=offer.node,
        ))
        log.info(
            "attempt failed: provider=%s model=%s code=%s retryable=%s",
            offer.provider, offer.model, code, exc.retryable,
        )

    def _final_error(
        self,
        last: MeshError | None,
        attempts: list[Attempt],
        request: InferenceRequest | None = None,
        policy: str | None = None,
        excluded: Sequence[str] | None = None,
    ) -> MeshError:
        if last is None:
            assert request is not None
            return self._no_candidates(request, policy, excluded or ())
        if request is not None and policy is not None and attempts and not isinstance(
            last, DeadlineExceeded | BudgetExceeded
        ):
            # A policy narrowed the choice and everything it allowed failed (here, or on the
            # peer it was forwarded to): say which policy, so the client knows why nothing
            # else was tried.
            forbidden = [e for e in excluded or [] if "forbidden by policy" in e]
            tried = ", ".join(f"{a.provider}:{a.outcome}" for a in attempts)
            kept_out = f"; not tried: {'; '.join(forbidden)}" if forbidden else ""
            return NoCapacity(
                f"No provider allowed by policy '{policy}' could serve '{request.model}': "
                f"all {len(attempts)} attempts failed ({tried}); last: {last.message}{kept_out}",
                retry_after=1.0,
            )
        if len(attempts) <= 1 or isinstance(last, DeadlineExceeded):
            return last
        tried = ", ".join(f"{a.provider}:{a.outcome}" for a in attempts)
        cls = type(last)
        err = cls(
            f"All {len(attempts)} attempts failed ({tried}); last: {last.message}",
            code=last.code,
            retry_after=last.retry_after,
            provider=last.provider,
        )
        err.upstream_wire = last.upstream_wire
        return err

    # ------------------------------------------------------------------ explaining
    def explain(
        self,
        model: str,
        headers: dict[str, str] | None = None,
        key_name: str | None = None,
        kind: RequestKind = RequestKind.CHAT,
        body: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """For /admin/route: every candidate with its score and why the winner won (`body`, a
        request's body, for what `cache_aware` matches: its prefix)."""
        request = InferenceRequest(
            kind=kind,
            model=model,
            body=body or {},
            request_id="explain",
            deadline=self._clock() + 1.0,
            headers=headers or {},
            key_name=key_name,
        )
        turn = self._turn
        ranking, strategy, policy, excluded, _ = self._plan(request)
        self._turn = turn  # explaining is not a request: round robin keeps its place
        now = self._clock()
        rows = []
        for pos, r in enumerate(ranking):
            o = r.candidate.offer
            rows.append(
                {
                    "rank": pos + 1,
                    "provider": o.provider,
                    "provider_kind": o.provider_kind,
                    "node": o.node or self.node_id,
                    "model": o.model,
                    "upstream_model": o.upstream_model,
                    "score": round(r.score, 8),
                    "reason": r.reason,
                    "cost_per_1k_input": o.cost_per_1k_input,
                    "cost_per_1k_output": o.cost_per_1k_output,
                    "latency_ewma_ms": r.candidate.latency_ms,
                    "error_rate": r.candidate.error_rate,
                    "in_flight": r.candidate.in_flight,
                    "load": r.candidate.load,
                    "prefix_hit_blocks": r.candidate.prefix_hit,
                    "prefix_blocks": r.candidate.prefix_blocks,
                    "slots_free": r.candidate.slots_free,
                    "queue_depth": r.candidate.queue_depth,
                    "tokens_per_s": r.candidate.tokens_per_s,
                    "prefill_tokens_per_s": r.candidate.prefill_tokens_per_s,
                    "decode_tokens_per_s": r.candidate.decode_tokens_per_s,
                    "cooling_down": self._stats_for(o).cooled_down(now),
                }
            )
        winner = rows[0] if rows else None
        why = (
            f"{winner['provider']} ranks first by {strategy}: {winner['reason']}"
            if winner
            else "no candidate can serve this model now"
        )
        return {
            "model": model,
            "strategy": strategy,
            "policy": policy,
            "fallback_chain": list(self._chain),
            "candidates": rows,
            "excluded": excluded,
            "winner": winner,
            "why": why,
        }


async def _close_quietly(agen: Any) -> None:
    aclose = getattr(agen, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:  # noqa: BLE001 - the attempt already failed; closing is best effort
        log.debug("closing a failed stream raised", exc_info=True)

