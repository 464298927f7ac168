"""What the router tells the front end about how a request was served.

These are the values behind `x_aiproxy` and the `x-aiproxy-*` headers (SPEC §4).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from meshnode.types import Completion, ModelOffer, StreamChunk, Usage, frozen_record


@frozen_record
class Attempt:
    """One try of one candidate."""

    provider: str
    node: str
    outcome: str  # "ok", or the MeshError code that ended it ("upstream_timeout", ...)
    latency_ms: float
    retryable: bool = False  # a failure after which another candidate may be tried
    cooled: bool = False  # a failure that left the candidate cooling down (breaker open)
    peer: str | None = None  # the peer the attempt was forwarded to (mesh candidates)

    def to_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "node": self.node,
            "outcome": self.outcome,
            "latency_ms": round(self.latency_ms, 3),
        }


@dataclass(slots=True)
class Served:
    """Who served a request, what it cost, how long it took, what was tried."""

    offer: ModelOffer
    node: str  # the node that ran the provider (this node, or the peer)
    strategy: str
    attempts: list[Attempt] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    cost: float = 0.0
    latency_ms: float = 0.0
    cache: str | None = None  # "hit" when answered from the cache
    policy: str | None = None
    chunks: int = 0  # stream chunks relayed (prices a stream cut short, with no usage)
    reported_cost: float | None = None  # a peer's own charge for the stream (its Final.cost)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "provider": self.offer.provider,
            "node": self.node,
            "model": self.offer.model,
            "cost": round(self.cost, 8),
            "latency_ms": round(self.latency_ms, 3),
            "attempts": [a.to_json() for a in self.attempts],
            "strategy": self.strategy,
        }
        if self.usage.estimated:
            out["cost_estimated"] = True
        if self.cache is not None:
            out["cache"] = self.cache
        if self.policy is not None:
            out["policy"] = self.policy
        return out


@dataclass(slots=True)
class RoutedCompletion:
    completion: Completion
    served: Served


class RoutedStream:
    """A stream whose first chunk has already arrived (so the route is committed).

    Iterate it for the chunks (the first one included); after the iteration ends, `served` holds
    the final usage, cost and latency. `aclose()` cancels the upstream call (client went away).

    A consumer that drives the source itself (the SSE relay: no generator step per chunk) does
    what the iteration does: `begin()` for the first chunk, `take(chunk)` for each chunk of
    `rest` (False: not one to relay), `end(error)` when `rest` ended or raised. Only for this
    class exactly: a subclass may iterate differently.
    """

    def __init__(
        self,
        first: StreamChunk,
        rest: AsyncIterator[StreamChunk],
        served: Served,
        on_finish: Any,
    ) -> None:
        self.first = first
        self.rest = rest
        self.served = served
        self._on_finish = on_finish  # callable(served, error | None) -> None, called once
        self._finished = False

    async def __aiter__(self) -> AsyncIterator[StreamChunk]:
        error: BaseException | None = None
        take = self.take
        try:
            yield self.begin()
            async for chunk in self.rest:
                if take(chunk):
                    yield chunk
        except BaseException as exc:  # noqa: BLE001 - re-raised; recorded for stats
            error = exc
            raise
        finally:
            self._finish(error)

    def begin(self) -> StreamChunk:
        """The first chunk, accounted."""
        first = self.first
        if first.usage is not None:
            self.served.usage = first.usage
        self.served.chunks = 1
        return first

    def take(self, chunk: StreamChunk) -> bool:
        """Account one chunk after the first; False for a peer's trailer (its charge, which
        the settlement uses; not a chunk)."""
        served = self.served
        if chunk.reported_cost is not None and not chunk.data:
            served.reported_cost = chunk.reported_cost
            if chunk.usage is not None:
                served.usage = chunk.usage
            return False
        if chunk.usage is not None:
            served.usage = chunk.usage
        served.chunks += 1
        return True

    def end(self, error: BaseException | None) -> None:
        """The source ended (None) or raised `error`: settle the route (once)."""
        self._finish(error)

    def _finish(self, error: BaseException | None) -> None:
        if not self._finished:
            self._finished = True
            self._on_finish(self.served, error)

    async def aclose(self) -> None:
        aclose = getattr(self.rest, "aclose", None)
        try:
            if aclose is not None:
                await aclose()
        finally:
            self._finish(None)
