"""An in-process, scriptable Provider: the test double beside `base.py`.

It answers with deterministic OpenAI-shaped bodies and can be scripted, call by call, to fail,
hang or break a stream. Router and front-end unit tests use it; tests of real adapters use the
loopback servers in `tests/kit/` instead (real wire).

    fake = FakeProvider("a", models=["m"], cost_per_1k=0.01)
    fake.script(UpstreamUnavailable("boom"), "ok")   # first call fails, second answers
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from meshnode.config import TimeoutsConfig
from meshnode.errors import MeshError, StreamBroken
from meshnode.providers.base import Provider
from meshnode.types import (
    Capacity,
    Completion,
    InferenceRequest,
    ModelOffer,
    RequestKind,
    StreamChunk,
    Usage,
)


@dataclass(frozen=True, slots=True)
class Hang:
    """Never answer (until cancelled)."""


@dataclass(frozen=True, slots=True)
class Delay:
    seconds: float


@dataclass(frozen=True, slots=True)
class BreakAfter:
    """Stream `chunks` chunks, then fail."""

    chunks: int


Behaviour = str | MeshError | Hang | Delay | BreakAfter


class FakeProvider(Provider):
    def __init__(
        self,
        name: str,
        models: Sequence[str] = ("m",),
        *,
        kind: str = "openai_compatible",
        cost_per_1k: float = 0.0,
        kinds: frozenset[RequestKind] = frozenset(
            {RequestKind.CHAT, RequestKind.COMPLETION, RequestKind.EMBEDDING}
        ),
        text: str = "hello from fake",
        chunks: int = 3,
        capacity: Capacity | None = None,
        node: str | None = None,
        priority: int = 100,
    ) -> None:
        self.name = name
        self.kind = kind
        self._offers = [
            ModelOffer(
                model=m,
                provider=name,
                provider_kind=kind,
                upstream_model=m,
                kinds=kinds,
                cost_per_1k_input=cost_per_1k,
                cost_per_1k_output=cost_per_1k,
                node=node,
                priority=priority,
            )
            for m in models
        ]
        self.text = text
        self.chunks = chunks
        self._capacity = capacity
        self._script: deque[Behaviour] = deque()
        self.calls: list[InferenceRequest] = []
        self.cancelled = 0
        self.closed_streams = 0

    def script(self, *behaviours: Behaviour) -> None:
        self._script.extend(behaviours)

    def offers(self) -> Sequence[ModelOffer]:
        return self._offers

    def capacity(self) -> Capacity | None:
        return self._capacity

    async def _behave(self) -> Behaviour:
        behaviour: Behaviour = self._script.popleft() if self._script else "ok"
        if isinstance(behaviour, MeshError):
            raise behaviour
        if isinstance(behaviour, Hang):
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if isinstance(behaviour, Delay):
            await asyncio.sleep(behaviour.seconds)
        return behaviour

    def _usage(self, request: InferenceRequest) -> Usage:
        return Usage(prompt_tokens=10, completion_tokens=len(self.text.split()))

    async def complete(
        self, request: InferenceRequest, offer: ModelOffer, timeouts: TimeoutsConfig
    ) -> Completion:
        self.calls.append(request)
        await self._behave()
        usage = self._usage(request)
        body: dict[str, Any]
        if request.kind is RequestKind.EMBEDDING:
            inputs = request.body.get("input")
            n = len(inputs) if isinstance(inputs, list) else 1
            body = {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": [0.1 * (i + 1), 0.2, 0.3]}
                    for i in range(n)
                ],
                "model": offer.model,
                "usage": {"prompt_tokens": 10, "total_tokens": 10},
            }
            return Completion(body, Usage(prompt_tokens=10))
        body = {
            "id": f"chatcmpl-{request.request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": offer.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.text},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage.to_openai(),
        }
        return Completion(body, usage)

    async def stream(
        self, request: InferenceRequest, offer: ModelOffer, timeouts: TimeoutsConfig
    ) -> AsyncIterator[StreamChunk]:
        self.calls.append(request)
        behaviour = await self._behave()
        words = self.text.split()
        per = max(1, len(words) // max(1, self.chunks))
        pieces = [" ".join(words[i : i + per]) for i in range(0, len(words), per)]
        created = int(time.time())
        try:
            for i, piece in enumerate(pieces):
                if isinstance(behaviour, BreakAfter) and i >= behaviour.chunks:
                    raise StreamBroken("fake stream broke", provider=self.name)
                yield StreamChunk(
                    {
                        "id": f"chatcmpl-{request.request_id}",
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": offer.model,
                        "choices": [
                            {"index": 0, "delta": {"content": piece if i == 0 else " " + piece},
                             "finish_reason": None}
                        ],
                    },
                    node=offer.node,
                )
            yield StreamChunk(
                {
                    "id": f"chatcmpl-{request.request_id}",
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": offer.model,
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                },
                node=offer.node,
            )
            usage = self._usage(request)
            yield StreamChunk(
                {
                    "id": f"chatcmpl-{request.request_id}",
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": offer.model,
                    "choices": [],
                    "usage": usage.to_openai(),
                },
                usage=usage,
                node=offer.node,
            )
        finally:
            self.closed_streams += 1
