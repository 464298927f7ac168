"""`MeshGuard`: the server interceptor every mesh call passes before the servicer sees it.

In order, on the raw request bytes: a size bound per method (a gossip message is far smaller
than an OpenAI body, so a flood of records is refused before it is parsed), the HMAC check when
the mesh has a secret (`meshnode.rpc.auth`; it must see the exact bytes, which is why the guard
takes the request undeserialized), then parsing (garbage is `INVALID_ARGUMENT`, never a crash).
Answers to unary calls are MAC'd in trailing metadata when the mesh has a secret.

Refusals are counted in `MeshGuard.refused` by reason (for tests and `/admin`); the first of
each reason is logged at warning, the rest at debug, so a hostile peer cannot flood the logs.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from meshnode.rpc.auth import AuthError, MeshAuth
from meshnode.rpc.options import MAX_GOSSIP_BYTES, MAX_HEALTH_BYTES, MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

LIMITS = {
    "/meshnode.v1.Mesh/Health": MAX_HEALTH_BYTES,
    "/meshnode.v1.Mesh/Gossip": MAX_GOSSIP_BYTES,
    "/meshnode.v1.Mesh/Infer": MAX_MESSAGE_BYTES,
}


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class MeshGuard(grpc.aio.ServerInterceptor):
    def __init__(self, auth: MeshAuth | None = None, node_id: str = "") -> None:
        self.auth = auth
        self.node_id = node_id  # calls addressed to another node id are refused
        self.refused: collections.Counter[str] = collections.Counter()

    def _admit(
        self, method: str, raw: bytes, context: grpc.aio.ServicerContext,
        deserialize: Callable[[bytes], Any],
    ) -> tuple[Any, str]:
        """The parsed request and the caller's nonce ("" without auth); raises `Refused`."""
        if len(raw) > LIMITS.get(method, MAX_MESSAGE_BYTES):
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "oversized")
        nonce = ""
        if self.auth is not None:
            try:
                _, nonce = self.auth.verify_request(
                    context.invocation_metadata(), method, raw, self.node_id
                )
            except AuthError as exc:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, exc.reason) from None
        try:
            return deserialize(raw), nonce
        except DecodeError:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "garbage") from None

    async def _refuse(self, exc: Refused, context: grpc.aio.ServicerContext) -> NoReturn:
        first = self.refused[exc.reason] == 0
        self.refused[exc.reason] += 1
        log.log(logging.WARNING if first else logging.DEBUG,
                "mesh: refused a call from %s (%s)", context.peer(), exc.reason)
        message = ("mesh authentication failed" if exc.code is grpc.StatusCode.UNAUTHENTICATED
                   else f"refused: {exc.reason}")
        await context.abort(exc.code, message)
        raise AssertionError("unreachable: abort raises")

    def _unary(self, method: str, handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
        deserialize = handler.request_deserializer
        serialize = handler.response_serializer
        behaviour = handler.unary_unary

        async def call(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                request, nonce = self._admit(method, raw, context, deserialize)
            except Refused as exc:
                await self._refuse(exc, context)
            answer: bytes = serialize(await behaviour(request, context))
            if self.auth is not None:
                context.set_trailing_metadata(self.auth.sign_response(method, nonce, answer))
            return answer

        return call

    def _stream(self, method: str, handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
        deserialize = handler.request_deserializer
        behaviour = handler.unary_stream

        async def call(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            try:
                request, _ = self._admit(method, raw, context, deserialize)
            except Refused as exc:
                await self._refuse(exc, context)
            async for item in behaviour(request, context):
                yield item

        return call

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # unknown method: gRPC answers UNIMPLEMENTED
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary(method, handler))
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler), response_serializer=handler.response_serializer
            )
        return handler
