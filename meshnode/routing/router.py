"""The router: candidates, strategy, failover loop, per-candidate stats and cooldowns.

INTERFACE STUB — the implementation lands next; the signatures below are the contract the API
layer codes against.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from meshnode.config import RoutingConfig
from meshnode.providers.base import Provider
from meshnode.routing.outcome import RoutedCompletion, RoutedStream
from meshnode.types import InferenceRequest, RequestKind


class Router:
    def __init__(
        self,
        routing: RoutingConfig,
        chain: Sequence[str],
        providers: Sequence[Provider],
        node_id: str,
    ) -> None:
        raise NotImplementedError

    def add_provider(self, provider: Provider) -> None:
        """Providers may be added after start (the mesh provider)."""
        raise NotImplementedError

    @property
    def providers(self) -> Sequence[Provider]:
        raise NotImplementedError

    def models(self) -> list[dict[str, Any]]:
        """Distinct models for /v1/models: [{"id", "object": "model", "created", "owned_by",
        "kinds": [...], "providers": [...]}]."""
        raise NotImplementedError

    def has_model(self, model: str, kind: RequestKind | None = None) -> bool:
        raise NotImplementedError

    async def complete(self, request: InferenceRequest) -> RoutedCompletion:
        """Serve a non-stream request with failover. Raises MeshError."""
        raise NotImplementedError

    async def open_stream(self, request: InferenceRequest) -> RoutedStream:
        """Fail over until a candidate yields its first chunk, then commit to it."""
        raise NotImplementedError

    def explain(self, model: str, headers: dict[str, str] | None = None,
                key_name: str | None = None) -> dict[str, Any]:
        """For /admin/route: every candidate with score and why the winner won."""
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        """For /admin/stats: per provider and model counters."""
        raise NotImplementedError
