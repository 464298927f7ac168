"""`MeshGuard`: the server interceptor every mesh call passes before the servicer sees it.

In order, on the raw request bytes: a size bound per method (a gossip message is far smaller
than an OpenAI body, so a flood of records is refused before it is parsed), the HMAC check when
the mesh has a secret (`meshnode.rpc.auth`; it must see the exact bytes, which is why the guard
takes the request undeserialized), then parsing (garbage is `INVALID_ARGUMENT`, never a crash).
Answers to unary calls are MAC'd in trailing metadata when the mesh has a secret.

Refusals are counted in `MeshGuard.refused` by reason (for tests and `/admin`); the first of
each reason is logged at warning, the rest at debug, so a hostile peer cannot flood the logs.

Memory: a refused call's bytes (up to 16 MB) must not outlive the call. `_admit` returns its
refusal instead of raising it (a raised one's traceback kept the frames holding the bytes in a
cycle, which the node's rarely-running collector left for good: 40 unauthenticated 15 MB calls
took a node from 73 MB to 695 MB RSS). After refusing a large message the guard also hands the
freed heap back to the OS (`release_memory`, shortly after, one pending at a time): glibc keeps freed blocks of
that size in its heap, so RSS would otherwise stay at its high-water mark.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from meshnode.memory import release_memory
from meshnode.rpc.auth import AuthError, MeshAuth
from meshnode.rpc.options import MAX_GOSSIP_BYTES, MAX_HEALTH_BYTES, MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

LIMITS = {
    "/meshnode.v1.Mesh/Health": MAX_HEALTH_BYTES,
    "/meshnode.v1.Mesh/Gossip": MAX_GOSSIP_BYTES,
    "/meshnode.v1.Mesh/Infer": MAX_MESSAGE_BYTES,
}


# A refused message at least this large is worth handing its memory back for.
RELEASE_AFTER_BYTES = 1024 * 1024
# The release runs this long after a refusal (the call's own buffers are gone by then); one is
# pending at a time, so a flood costs one release per interval.
RELEASE_DELAY_S = 0.2


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
        self._release_pending: asyncio.TimerHandle | None = None
        self.releases = 0

    def _release_after(self, size: int) -> None:
        if size >= RELEASE_AFTER_BYTES and self._release_pending is None:
            self._release_pending = asyncio.get_running_loop().call_later(
                RELEASE_DELAY_S, self._release)

    def _release(self) -> None:
        self._release_pending = None
        self.releases += 1
        release_memory()

    def _admit(
        self, method: str, raw: bytes, context: grpc.aio.ServicerContext,
        deserialize: Callable[[bytes], Any],
    ) -> tuple[Any, str] | Refused:
        """The parsed request and the caller's nonce ("" without auth), or why it is refused.

        Returned, not raised: a raised refusal's traceback holds the frames that hold `raw`
        (up to 16 MB), in a cycle only the cyclic collector frees, and the node's collector
        runs rarely (`meshnode.memory.tune_for_serving`). Refused calls by the dozen kept gigabytes.
        """
        if len(raw) > LIMITS.get(method, MAX_MESSAGE_BYTES):
            return Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "oversized")
        nonce = ""
        if self.auth is not None:
            try:
                _, nonce = self.auth.verify_request(
                    context.invocation_metadata(), method, raw, self.node_id
                )
            except AuthError as exc:
                return Refused(grpc.StatusCode.UNAUTHENTICATED, exc.reason)
        try:
            return deserialize(raw), nonce
        except DecodeError:
            return Refused(grpc.StatusCode.INVALID_ARGUMENT, "garbage")

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
            admitted = self._admit(method, raw, context, deserialize)
            if isinstance(admitted, Refused):
                size = len(raw)
                del raw  # the abort's traceback holds this frame until gRPC lets it go
                self._release_after(size)
                await self._refuse(admitted, context)
            request, nonce = admitted
            answer: bytes = serialize(await behaviour(request, context))
            if self.auth is not None:
                context.set_trailing_metadata(self.auth.sign_response(method, nonce, answer))
            return answer

        return call

    def _stream(self, method: str, handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
        deserialize = handler.request_deserializer
        behaviour = handler.unary_stream

        async def call(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            admitted = self._admit(method, raw, context, deserialize)
            if isinstance(admitted, Refused):
                size = len(raw)
                del raw
                self._release_after(size)
                await self._refuse(admitted, context)
            request, _ = admitted
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
