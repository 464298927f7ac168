"""The gRPC server side: the `Mesh` servicer and the server it runs in.

`Infer` first decides whom the request is for: the caller assertion is verified
(`rpc.caller.CallerAuthority`) and the node's own checks applied (`governance.forwarded`: key
live here, model scope, rate limit); then it hands the forwarded request to this node's router (which may serve it locally or, within
`max_hops`, forward it again); `Gossip` and `Health` go to the membership driver through the
`MeshHandler` interface. Nothing here decides anything: it converts and delegates.

The servicer never lets an exception escape as a gRPC status for a request it understood: errors
travel in-band as an `Error` chunk carrying the OpenAI error type and whether retrying elsewhere
is safe. gRPC statuses are left for transport-level failures.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Protocol

import grpc
import grpc.aio

from meshnode.errors import DeadlineExceeded, MeshError, UpstreamUnavailable
from meshnode.mesh.state import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION
from meshnode.mesh.transport import MeshHandler
from meshnode.observability import tracing
from meshnode.routing.outcome import RoutedCompletion, RoutedStream
from meshnode.rpc import convert
from meshnode.rpc.caller import CallerAuthority, CallerRefused
from meshnode.rpc.generated import mesh_pb2 as pb
from meshnode.rpc.generated import mesh_pb2_grpc
from meshnode.rpc.options import SERVER_OPTIONS
from meshnode.types import Caller, InferenceRequest

log = logging.getLogger(__name__)


class InferBackend(Protocol):
    """What `Infer` needs from this node: the router's two entry points."""

    async def complete(self, request: InferenceRequest) -> RoutedCompletion: ...

    async def open_stream(self, request: InferenceRequest) -> RoutedStream: ...


async def check_version(version: int, context: grpc.aio.ServicerContext) -> None:
    """Versioning (docs/protocol.md): any version from MIN_PROTOCOL_VERSION up is read, newer
    ones included (they only add fields, which protobuf skips); below it (0: the field is
    missing, so not a meshnode message) is refused."""
    if version < MIN_PROTOCOL_VERSION:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"protocol_version {version} is not supported (this node speaks {PROTOCOL_VERSION}, "
            f"reads {MIN_PROTOCOL_VERSION} and newer)",
        )


class PeerTraffic(Protocol):
    """What the servicer reports per peer (observability.metrics.Metrics); must not block."""

    def record_received(self, peer: str, kind: str) -> None: ...

    def record_gossip(self, peer: str, sent: int, received: int) -> None: ...


class Admission(Protocol):
    """The serving node's checks on a forwarded request (`governance.forwarded`)."""

    def admit(self, request: InferenceRequest, caller: Caller | None) -> InferenceRequest: ...

    def done(self, request: InferenceRequest, tokens: int) -> None: ...


class MeshServicer(mesh_pb2_grpc.MeshServicer):
    def __init__(
        self, node_id: str, handler: MeshHandler, backend: InferBackend | None,
        metrics: PeerTraffic | None = None,
        callers: CallerAuthority | None = None, admission: Admission | None = None,
    ) -> None:
        self._node_id = node_id
        self._handler = handler
        self._backend = backend
        self._metrics = metrics
        self._callers = callers
        self._admission = admission
        self._warned: set[str] = set()

    def set_backend(self, backend: InferBackend) -> None:
        self._backend = backend

    def set_handler(self, handler: MeshHandler) -> None:
        self._handler = handler

    async def Health(  # noqa: N802 - gRPC method name
        self, request: pb.HealthRequest, context: grpc.aio.ServicerContext
    ) -> pb.HealthResponse:
        await check_version(request.protocol_version, context)
        ack = await self._handler.on_probe(convert.probe_from_pb(request))
        return convert.ack_to_pb(ack)

    async def Gossip(  # noqa: N802 - gRPC method name
        self, request: pb.GossipRequest, context: grpc.aio.ServicerContext
    ) -> pb.GossipResponse:
        await check_version(request.protocol_version, context)
        message = convert.gossip_request_from_pb(request)
        reply = convert.gossip_reply_to_pb(await self._handler.on_gossip(message))
        if self._metrics is not None:
            self._metrics.record_gossip(message.from_node, reply.ByteSize(), request.ByteSize())
        return reply

    async def Infer(  # noqa: N802 - gRPC method name
        self, request: pb.InferRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.InferChunk]:
        await check_version(request.protocol_version, context)
        if not tracing.enabled():
            async for chunk in self._infer(request, context):
                yield chunk
            return
        async for chunk in tracing.peer_stream(
            self._infer(request, context), context.invocation_metadata(),
            {"meshnode.node": self._node_id, "meshnode.model": request.model,
             "meshnode.request_id": request.request_id},
        ):
            yield chunk

    async def _infer(
        self, request: pb.InferRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[pb.InferChunk, None]:
        try:
            if self._backend is None:
                raise UpstreamUnavailable(f"{self._node_id}: not serving yet")
            req = convert.infer_request_from_pb(request, self._node_id, context.time_remaining())
            if self._metrics is not None and len(req.visited) >= 2:
                # visited ends with this node; the one before it is the caller.
                self._metrics.record_received(req.visited[-2], req.kind.value)
            req = self._admit(req, request)
            if req.deadline <= time.monotonic():
                raise DeadlineExceeded("deadline passed before the peer started")
            if request.stream:
                async for chunk in self._stream(req):
                    yield chunk
            else:
                routed = await self._backend.complete(req)
                served = routed.served
                if self._admission is not None:
                    self._admission.done(req, served.usage.total_tokens)
                yield pb.InferChunk(
                    protocol_version=PROTOCOL_VERSION,
                    final=pb.Final(
                        usage=convert.usage_to_pb(served.usage),
                        cost=served.cost,
                        node=served.node or self._node_id,
                        provider=served.offer.provider,
                        model=served.offer.model,
                        latency_ms=served.latency_ms,
                        body=convert.pack(routed.completion.body),
                    ),
                )
        except MeshError as exc:
            yield pb.InferChunk(
                protocol_version=PROTOCOL_VERSION, error=convert.error_to_pb(exc, self._node_id)
            )

    def _admit(self, req: InferenceRequest, request: pb.InferRequest) -> InferenceRequest:
        """Whom the request is for (verified), and this node's own checks on it."""
        claim = convert.caller_from_pb(request.caller) if request.HasField("caller") else None
        caller = None
        if self._callers is not None:
            try:
                caller = self._callers.verify(claim, req)
            except CallerRefused as exc:
                first = exc.message not in self._warned
                self._warned.add(exc.message)
                log.log(logging.WARNING if first else logging.DEBUG,
                        "mesh: forwarded request %s from %s refused: %s", req.request_id,
                        request.origin_node or "?", exc.message)
                raise
        if self._admission is not None:
            return self._admission.admit(req, caller)
        if caller is None:
            return req
        return dataclasses.replace(req, key_name=caller.key_name, caller=caller)

    async def _stream(self, req: InferenceRequest) -> AsyncIterator[pb.InferChunk]:
        assert self._backend is not None
        routed = await self._backend.open_stream(req)
        served = routed.served
        try:
            first = True
            async for chunk in routed:
                msg = pb.Chunk(data=convert.pack(chunk.data))
                if chunk.usage is not None:
                    msg.usage.CopyFrom(convert.usage_to_pb(chunk.usage))
                if first:
                    msg.node = chunk.node or served.node or self._node_id
                    first = False
                yield pb.InferChunk(protocol_version=PROTOCOL_VERSION, chunk=msg)
        finally:
            # The caller went away (or we finished): release the upstream stream.
            await routed.aclose()
            if self._admission is not None:
                self._admission.done(req, served.usage.total_tokens)
        yield pb.InferChunk(
            protocol_version=PROTOCOL_VERSION,
            final=pb.Final(
                usage=convert.usage_to_pb(served.usage),
                cost=served.cost,
                node=served.node or self._node_id,
                provider=served.offer.provider,
                model=served.offer.model,
                latency_ms=served.latency_ms,
            ),
        )


async def start_server(
    listen_addr: str,
    servicer: MeshServicer,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start serving; returns the server and the port it bound (listen port 0 picks one).
    `interceptors` is the authentication hook (issue 6)."""
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=list(interceptors))
    mesh_pb2_grpc.add_MeshServicer_to_server(servicer, server)
    try:
        if credentials is not None:
            port = server.add_secure_port(listen_addr, credentials)
        else:
            port = server.add_insecure_port(listen_addr)
    except RuntimeError:
        # grpcio says "Failed to bind" with a RuntimeError; the CLI reports OSErrors plainly.
        port = 0
    if port == 0:
        raise OSError(
            errno.EADDRINUSE,
            f"cannot bind gRPC on {listen_addr} (address in use, or not an address of this "
            "host); set mesh.listen_addr or --grpc-listen",
        )
    await server.start()
    return server, port
