"""The gRPC client side: one reusable channel per peer address, and the translation of gRPC
failures into mesh errors.

`PeerChannels` is the only owner of client channels; `GrpcTransport` (membership traffic) and
`MeshProvider` (Infer) both take their stubs from it, so a peer costs one HTTP/2 connection.
`interceptors` is the hook for authentication (issue 6: HMAC metadata or mTLS credentials).
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import grpc.aio

from meshnode.errors import MeshError, UpstreamTimeout, UpstreamUnavailable
from meshnode.rpc.generated import mesh_pb2_grpc
from meshnode.rpc.options import CHANNEL_OPTIONS


class PeerChannels:
    """Channels keyed by peer address, created on first use and kept for the process life."""

    def __init__(
        self,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self._interceptors = list(interceptors)
        self._credentials = credentials
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, mesh_pb2_grpc.MeshStub] = {}

    def stub(self, address: str) -> mesh_pb2_grpc.MeshStub:
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
            stub = self._stubs[address] = mesh_pb2_grpc.MeshStub(channel)
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
