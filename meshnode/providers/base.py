"""The Provider interface: what the router calls to get an answer.

A provider is anything that can serve a model: a cloud adapter, the local worker pool, or a peer
node (`mesh`). Its fake lives beside it in `providers/fake.py`.

Concurrency rules (the router relies on them):
- `complete()` and `stream()` are called concurrently from many tasks on one event loop; an
  implementation must not block the loop (no model code, no sync I/O).
- Every failure leaves as a `MeshError` subclass, translated at this edge; `retryable` on it says
  whether another candidate may be tried. A raw `aiohttp`/`grpc`/`OSError` escaping is a bug.
- `stream()` is an async generator. If it fails before yielding its first chunk, the router may
  fail over; once a chunk has been yielded, a failure must raise `StreamBroken`-like errors and
  the router never retries. The generator is closed (`aclose()`) when the client goes away: the
  implementation must then cancel its upstream call.
- Cancellation (the client disconnected, the deadline passed) arrives as `CancelledError` and must
  release whatever the call held.
- `request.deadline` (a `time.monotonic()` value) bounds the whole call; `timeouts` bound connect
  and first byte.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence

from meshnode.config import TimeoutsConfig
from meshnode.types import Capacity, Completion, InferenceRequest, ModelOffer, StreamChunk


class Provider(abc.ABC):
    """One source of answers. Subclasses: one per adapter file."""

    #: the provider's name: its config key (`openai`, `together`, `local`, `mesh`)
    name: str
    #: its effective type (`openai_compatible`, `anthropic`, `cloudflare`, `local`, `mesh`)
    kind: str
    #: True when every call is bounded by `request.deadline` by the provider itself (an HTTP
    #: client timeout, a gRPC deadline). The router then skips its own timer, which costs a
    #: timer handle per request on the hot path; otherwise the router enforces the deadline.
    enforces_deadline: bool = False
    #: True when `offers()` gives the same offers for the provider's whole life (made from its
    #: config when it is built). A router whose providers all say so reads them once, not on
    #: every routing decision (`Router._offers_now`).
    fixed_offers: bool = False

    @abc.abstractmethod
    def offers(self) -> Sequence[ModelOffer]:
        """The models this provider serves now. Cheap; called on every routing decision
        (unless `fixed_offers`)."""

    async def start(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Open long-lived resources (client sessions, worker processes). Called once."""

    async def close(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Release everything `start` opened. Called once, after in-flight calls drained."""

    @abc.abstractmethod
    async def complete(
        self, request: InferenceRequest, offer: ModelOffer, timeouts: TimeoutsConfig
    ) -> Completion:
        """A whole answer for a non-stream chat, completion, embedding or image request."""

    @abc.abstractmethod
    def stream(
        self, request: InferenceRequest, offer: ModelOffer, timeouts: TimeoutsConfig
    ) -> AsyncIterator[StreamChunk]:
        """Chunks of a streamed chat or completion, as they arrive from upstream."""

    def capacity(self) -> Capacity | None:
        """What this provider can take now, or None when it does not know (clouds)."""
        return None

    def capacity_for(self, offer: ModelOffer) -> Capacity | None:
        """Capacity behind one offer: the provider's own by default; a provider that fronts
        several machines (the mesh) answers for the machine serving `offer`."""
        return self.capacity()

    def latency_ms_for(self, offer: ModelOffer) -> float | None:
        """A latency estimate for `offer` before this node has measured it itself (the mesh
        knows peers' RTT and their own model latency); None when there is none."""
        return None

    def ready(self) -> tuple[bool, str]:
        """(can serve now, why not). Feeds `/health/ready`."""
        return True, ""
