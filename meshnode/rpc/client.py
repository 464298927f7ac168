"""The gRPC client side: one reusable channel per peer address, the signed calls made on it,
and the translation of gRPC failures into mesh errors.

`PeerChannels` is the only owner of client channels; `GrpcTransport` (membership traffic) and
`MeshProvider` (Infer) both take their `PeerStub` from it, so a peer costs one HTTP/2 connection.
`PeerStub` serializes each request once, itself, so that with `mesh.secret` the HMAC covers the
exact bytes on the wire (`meshnode.rpc.auth`); `credentials` carries mTLS (`meshnode.rpc.tls`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import DecodeError, Message

from meshnode.errors import MeshError, UpstreamTimeout, UpstreamUnavailable
from meshnode.observability import tracing
from meshnode.rpc.auth import AuthError, MeshAuth
from meshnode.rpc.generated import mesh_pb2 as pb
from meshnode.rpc.options import CHANNEL_OPTIONS

HEALTH = "/meshnode.v1.Mesh/Health"
GOSSIP = "/meshnode.v1.Mesh/Gossip"
INFER = "/meshnode.v1.Mesh/Infer"

M = TypeVar("M", bound=Message)


class PeerAnswerError(Exception):
    """A peer's answer that fails authentication or does not parse: treated as no answer."""


class PeerStub:
    """The three `Mesh` calls to one peer, signed when the mesh has a secret."""

    def __init__(self, channel: grpc.aio.Channel, node_id: str, auth: MeshAuth | None) -> None:
        self._node_id = node_id
        self._auth = auth
        self._health = channel.unary_unary(HEALTH)
        self._gossip = channel.unary_unary(GOSSIP)
        self._infer = channel.unary_stream(INFER, response_deserializer=pb.InferChunk.FromString)

    async def _unary(
        self, call: Any, method: str, request: Message, answer: type[M], timeout: float
    ) -> M:
        body = request.SerializeToString()
        if self._auth is None:
            data = await call(body, timeout=timeout)
        else:
            metadata, nonce = self._auth.sign_request(self._node_id, method, body)
            pending = call(body, timeout=timeout, metadata=metadata)
            data = await pending
            try:
                self._auth.verify_response(method, nonce, data, await pending.trailing_metadata())
            except AuthError as exc:
                raise PeerAnswerError(exc.reason) from None
        try:
            return answer.FromString(data)
        except DecodeError:
            raise PeerAnswerError("answer does not parse") from None

    async def Health(  # noqa: N802 - the gRPC method's name
        self, request: pb.HealthRequest, timeout: float
    ) -> pb.HealthResponse:
        return await self._unary(self._health, HEALTH, request, pb.HealthResponse, timeout)

    async def Gossip(  # noqa: N802 - the gRPC method's name
        self, request: pb.GossipRequest, timeout: float
    ) -> pb.GossipResponse:
        return await self._unary(self._gossip, GOSSIP, request, pb.GossipResponse, timeout)

    def Infer(  # noqa: N802 - the gRPC method's name
        self, request: pb.InferRequest, timeout: float, callee: str = ""
    ) -> grpc.aio.UnaryStreamCall:
        """`callee`: the serving node's id; the MAC binds it, so the call cannot be replayed
        to another node."""
        body = request.SerializeToString()
        metadata = None
        if self._auth is not None:
            metadata, _ = self._auth.sign_request(self._node_id, INFER, body, callee)
        trace = tracing.grpc_metadata()  # the attempt span's traceparent, when tracing is on
        if trace:
            metadata = [*(metadata or ()), *trace]
        return self._infer(body, timeout=timeout, metadata=metadata)  # type: ignore[no-any-return]


class PeerChannels:
    """Channels keyed by peer address, created on first use and kept for the process life."""

    def __init__(
        self,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        credentials: grpc.ChannelCredentials | None = None,
        *,
        node_id: str = "",
        auth: MeshAuth | None = None,
    ) -> None:
        self._interceptors = list(interceptors)
        self._credentials = credentials
        self._node_id = node_id
        self._auth = auth
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, PeerStub] = {}

    def stub(self, address: str) -> PeerStub:
        stub = self._stubs.get(address)
        if stub is None:
            if self._credentials is not None:
                channel = grpc.aio.secure_channel(
                    address, self._credentials, options=CHANNEL_OPTIONS,
                    interceptors=self._interceptors,
                )
            else:
                channel = grpc.aio.insecure_channel(
                    address, options=CHANNEL_OPTIONS, interceptors=self._interceptors
                )
            self._channels[address] = channel
            stub = self._stubs[address] = PeerStub(channel, self._node_id, self._auth)
        return stub

    async def drop(self, address: str) -> None:
        """Close the channel of a peer that is gone for good (forgotten by membership)."""
        channel = self._channels.pop(address, None)
        self._stubs.pop(address, None)
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        channels = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        for channel in channels:
            await channel.close(grace=None)

    def __len__(self) -> int:
        return len(self._channels)


def rpc_error(exc: grpc.aio.AioRpcError, address: str, provider: str = "mesh") -> MeshError:
    """A failed call before any answer: every such failure is safe to retry elsewhere."""
    code = exc.code()
    detail = exc.details() or code.name
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return UpstreamTimeout(f"peer {address}: deadline exceeded", provider=provider)
    return UpstreamUnavailable(f"peer {address}: {code.name.lower()}: {detail}", provider=provider)
