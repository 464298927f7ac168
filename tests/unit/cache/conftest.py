"""Shared helpers for the cache tests: a router over FakeProviders and request builders."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from meshnode.config import CacheConfig, RoutingConfig
from meshnode.providers.fake import FakeProvider
from meshnode.routing.router import Router
from meshnode.types import InferenceRequest, RequestKind


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def chat(content: str = "hi", *, stream: bool = False, headers: dict[str, str] | None = None,
         include_usage: bool = False, **params: Any) -> InferenceRequest:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": content}],
                            **params}
    if stream:
        body["stream"] = True
    return InferenceRequest(
        kind=RequestKind.CHAT, model="m", body=body, request_id="r1",
        deadline=time.monotonic() + 10, stream=stream, include_usage=include_usage,
        headers=headers or {},
    )


def embedding(text: str = "hello") -> InferenceRequest:
    return InferenceRequest(
        kind=RequestKind.EMBEDDING, model="m", body={"model": "m", "input": text},
        request_id="r1", deadline=time.monotonic() + 10,
    )


def make_router(providers: Sequence[FakeProvider]) -> Router:
    return Router(RoutingConfig(), [p.name for p in providers], list(providers), "n1")


def cache_config(**kw: Any) -> CacheConfig:
    return CacheConfig(**kw)
