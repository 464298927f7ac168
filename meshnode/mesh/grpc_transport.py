"""The real mesh transport: membership traffic over the `Mesh` gRPC service.

Every call has a deadline (the probe or gossip timeout); any gRPC failure, and any answer that
fails authentication or does not parse, becomes `TransportError` here, so the driver never sees
a gRPC type.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import grpc.aio

from meshnode.mesh.transport import (
    Ack,
    GossipMessage,
    GossipReply,
    Probe,
    Transport,
    TransportError,
)
from meshnode.rpc import convert
from meshnode.rpc.client import PeerAnswerError, PeerChannels


class GrpcTransport(Transport):
    def __init__(
        self, channels: PeerChannels,
        on_gossip: Callable[[str, int, int], object] | None = None,
    ) -> None:
        self._channels = channels
        # (peer id, bytes sent, bytes received) per exchange: the gossip-bytes metric.
        self._on_gossip = on_gossip

    async def probe(self, address: str, probe: Probe, timeout: float) -> Ack:
        try:
            reply = await self._channels.stub(address).Health(
                convert.probe_to_pb(probe), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise TransportError(f"{address}: {exc.code().name}") from None
        except PeerAnswerError as exc:
            raise TransportError(f"{address}: {exc}") from None
        return convert.ack_from_pb(reply)

    async def gossip(self, address: str, message: GossipMessage, timeout: float) -> GossipReply:
        request = convert.gossip_request_to_pb(message)
        try:
            reply = await self._channels.stub(address).Gossip(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            # The details tell a refusal (UNAUTHENTICATED) from an HTTP/1 server on the port.
            raise TransportError(f"{address}: {exc.code().name}: {exc.details()}") from None
        except PeerAnswerError as exc:
            raise TransportError(f"{address}: {exc}") from None
        answer = convert.gossip_reply_from_pb(reply)
        if self._on_gossip is not None:
            self._on_gossip(answer.from_node, request.ByteSize(), reply.ByteSize())
        return answer
