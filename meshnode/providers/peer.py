"""The `mesh` provider: models offered by alive peers, served by forwarding over gRPC `Infer`.

Offers come from gossip (one per peer and model, at the peer's cheapest price for it, with its
dearest as the worst case a call there is reserved against); the router ranks them beside local
and cloud offers and skips peers already on the request's path. Every call carries a caller
assertion (`rpc.caller`: the key, its model scope, the budget held for the attempt) bound to the
callee, and comes back with the peer's own charge (`Completion.cost`, or a stream's trailer
chunk), which both ledgers settle on (docs/security.md).
A forwarded call carries the remaining deadline (as the gRPC deadline and in the message) and the
visited node ids with this node appended, so no request loops or exceeds `max_hops`.

Errors: anything before the first chunk is retryable elsewhere unless the peer said otherwise
(a peer dying is `UpstreamUnavailable`); anything after it is `StreamBroken`, never retried.

Concurrency: `offers()` is cached per membership generation (cheap on every routing decision);
calls share one channel per peer through `PeerChannels`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace

import grpc
import grpc.aio

from meshnode.config import TimeoutsConfig
from meshnode.errors import DeadlineExceeded, StreamBroken, UpstreamTimeout, UpstreamUnavailable
from meshnode.mesh.membership import Membership, MemberStatus
from meshnode.mesh.state import LatencyAd, NodeState
from meshnode.providers.base import Provider
from meshnode.rpc import convert
from meshnode.rpc.caller import CallerAuthority
from meshnode.rpc.client import PeerChannels, rpc_error
from meshnode.types import (
    Capacity,
    Completion,
    InferenceRequest,
    ModelOffer,
    StreamChunk,
)


@dataclass(frozen=True, slots=True)
class PeerLatency:
    """What `latency_optimized` needs about one peer and model (milliseconds)."""

    rtt_ms: float | None
    ewma_ms: float
    p95_ms: float
    ttft_ms: float


class MeshProvider(Provider):
    name = "mesh"
    kind = "mesh"
    enforces_deadline = True  # every forwarded call carries the request's gRPC deadline

    def __init__(
        self,
        node_id: str,
        membership: Membership,
        channels: PeerChannels,
        rtt_ms: Callable[[str], float | None] = lambda _node: None,
        callers: CallerAuthority | None = None,
        key_models: Callable[[str], tuple[str, ...] | None] = lambda _name: None,
    ) -> None:
        self._node_id = node_id
        self._callers = callers or CallerAuthority(node_id, None, authenticated=False)
        self._key_models = key_models
        self._membership = membership
        self._channels = channels
        self._rtt_ms = rtt_ms
        self._cache_generation = -1
        self._offers: list[ModelOffer] = []
        self._states: dict[str, NodeState] = {}

    # ------------------------------------------------------------------ offers
    def _refresh(self) -> None:
        generation = self._membership.generation
        if generation == self._cache_generation:
            return
        offers: list[ModelOffer] = []
        states: dict[str, NodeState] = {}
        for member in self._membership.peers((MemberStatus.ALIVE,)):
            state = member.state
            if state is None or state.status != "alive":
                continue
            states[member.node_id] = state
            best: dict[str, ModelOffer] = {}
            # The peer's dearest price per model: what a call there is reserved against.
            worst: dict[str, tuple[float, float]] = {}
            for ad in state.models:
                if ad.provider_kind == "mesh":
                    continue
                w_in, w_out = worst.get(ad.name, (0.0, 0.0))
                worst[ad.name] = (
                    max(w_in, ad.cost_per_1k_input, ad.max_cost_per_1k_input or 0.0),
                    max(w_out, ad.cost_per_1k_output, ad.max_cost_per_1k_output or 0.0),
                )
                offer = ModelOffer(
                    model=ad.name,
                    provider=self.name,
                    provider_kind=self.kind,
                    upstream_model=ad.name,
                    kinds=ad.kinds,
                    cost_per_1k_input=ad.cost_per_1k_input,
                    cost_per_1k_output=ad.cost_per_1k_output,
                    max_context_tokens=ad.max_context_tokens,
                    node=member.node_id,
                )
                known = best.get(ad.name)
                if known is None or _price(offer) < _price(known):
                    if known is not None:
                        offer = _merge_kinds(offer, known)
                    best[ad.name] = offer
                elif known is not None:
                    best[ad.name] = _merge_kinds(known, offer)
            offers.extend(
                replace(o, worst_cost_per_1k_input=worst[o.model][0],
                        worst_cost_per_1k_output=worst[o.model][1])
                for o in best.values()
            )
        self._offers = offers
        self._states = states
        self._cache_generation = generation

    def offers(self) -> Sequence[ModelOffer]:
        self._refresh()
        return self._offers

    def peer_capacity(self, node: str) -> Capacity | None:
        """The peer's gossiped capacity (for `least_loaded`)."""
        self._refresh()
        state = self._states.get(node)
        if state is None:
            return None
        c = state.capacity
        return Capacity(c.slots_total, c.slots_free, c.queue_depth, c.tokens_per_s,
                        prefix_names=frozenset(c.prefix_names),
                        prefill_tokens_per_s=c.prefill_tokens_per_s,
                        decode_tokens_per_s=c.decode_tokens_per_s)

    def peer_latency(self, node: str, model: str) -> PeerLatency | None:
        """Measured RTT to the peer plus the peer's own latency for the model."""
        self._refresh()
        state = self._states.get(node)
        if state is None:
            return None
        ad = state.latency_for(model) or LatencyAd(model)
        return PeerLatency(self._rtt_ms(node), ad.ewma_ms, ad.p95_ms, ad.ttft_ms)

    def capacity_for(self, offer: ModelOffer) -> Capacity | None:
        """Per-offer capacity for `least_loaded`: the serving peer's gossiped capacity."""
        return self.peer_capacity(offer.node or "")

    def latency_ms_for(self, offer: ModelOffer) -> float | None:
        """Per-offer latency for `latency_optimized`: measured RTT to the peer plus the peer's
        own EWMA for the model. None until the peer has measured the model."""
        latency = self.peer_latency(offer.node or "", offer.model)
        if latency is None or latency.ewma_ms <= 0:
            return None
        return (latency.rtt_ms or 0.0) + latency.ewma_ms

    def ready(self) -> tuple[bool, str]:
        return True, ""

    # ------------------------------------------------------------------ calls
    def _address(self, offer: ModelOffer) -> str:
        member = self._membership.get(offer.node or "")
        if member is None or member.status is not MemberStatus.ALIVE:
            raise UpstreamUnavailable(f"peer {offer.node} is not alive", provider=self.name)
        return member.address

    def _call(self, request: InferenceRequest, offer: ModelOffer) -> tuple[str, float, object]:
        address = self._address(offer)
        remaining = request.deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("deadline passed before forwarding to a peer")
        visited = request.visited
        if self._node_id not in visited:
            visited = (*visited, self._node_id)
        callee = offer.node or ""
        key = request.key_name
        claim = self._callers.claim(
            request, callee, self._key_models(key) if key is not None else None)
        message = convert.infer_request_to_pb(request, visited, self._node_id, remaining, claim)
        call = self._channels.stub(address).Infer(message, timeout=remaining, callee=callee)
        return address, remaining, call

    async def complete(
        self, request: InferenceRequest, offer: ModelOffer, timeouts: TimeoutsConfig
    ) -> Completion:
        address, _, call = self._call(request, offer)
        assert isinstance(call, grpc.aio.UnaryStreamCall)
        try:
            async for msg in call:
                which = msg.WhichOneof("payload")
                if which == "final":
                    final = msg.final
                    return Completion(
                        body=convert.unpack(final.body),
                        usage=convert.usage_from_pb(final.usage),
                        node=final.node or offer.node,
                        cost=convert.reported_cost(final),
                    )
                if which == "error":
                    raise convert.error_from_pb(msg.error, self.name, after_first_chunk=False)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(exc, address, self.name) from None
        finally:
            call.cancel()
        raise UpstreamUnavailable(f"peer {address} ended the call without an answer",
                                  provider=self.name)

    async def stream(
        self, request: InferenceRequest, offer: ModelOffer, timeouts: TimeoutsConfig
    ) -> AsyncIterator[StreamChunk]:
        address, remaining, call = self._call(request, offer)
        assert isinstance(call, grpc.aio.UnaryStreamCall)
        first_byte_s = min(remaining, timeouts.first_byte_ms / 1000.0)
        yielded = False
        node = offer.node
        try:
            while True:
                try:
                    if yielded:
                        msg = await call.read()
                    else:
                        async with asyncio.timeout(first_byte_s):
                            msg = await call.read()
                except TimeoutError:
                    raise UpstreamTimeout(
                        f"peer {address}: no first chunk in {first_byte_s:.1f}s",
                        provider=self.name,
                    ) from None
                except grpc.aio.AioRpcError as exc:
                    if yielded:
                        raise StreamBroken(
                            f"peer {address} broke the stream: {exc.code().name.lower()}",
                            provider=self.name,
                        ) from None
                    raise rpc_error(exc, address, self.name) from None
                if msg is grpc.aio.EOF:
                    if yielded:
                        raise StreamBroken(f"peer {address} ended the stream early",
                                           provider=self.name)
                    raise UpstreamUnavailable(f"peer {address} ended the call without an answer",
                                              provider=self.name)
                which = msg.WhichOneof("payload")
                if which == "chunk":
                    chunk = msg.chunk
                    if chunk.node:
                        node = chunk.node
                    yield StreamChunk(
                        data=convert.unpack(chunk.data),
                        usage=convert.usage_from_pb(chunk.usage) if chunk.HasField("usage")
                        else None,
                        node=node,
                    )
                    yielded = True
                elif which == "final":
                    if yielded:
                        # The trailer: the peer's charge, for the settlement (never relayed).
                        final = msg.final
                        yield StreamChunk(
                            data={}, node=node, reported_cost=convert.reported_cost(final),
                            usage=convert.usage_from_pb(final.usage)
                            if final.HasField("usage") else None,
                        )
                    return
                elif which == "error":
                    raise convert.error_from_pb(msg.error, self.name, after_first_chunk=yielded)
        finally:
            call.cancel()  # the client went away or we are done: stop the peer's work


def _price(offer: ModelOffer) -> float:
    return offer.cost_per_1k_input + offer.cost_per_1k_output


def _merge_kinds(winner: ModelOffer, other: ModelOffer) -> ModelOffer:
    return replace(winner, kinds=winner.kinds | other.kinds)
