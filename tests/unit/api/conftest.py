"""Fixtures for the HTTP front end: a real aiohttp server on loopback around a real Router and
in-process FakeProviders (the test double beside `providers/base.py`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence

import pytest
from aiohttp.test_utils import TestClient, TestServer

from meshnode.api.app import create_app
from meshnode.config import RoutingConfig, ServerConfig
from meshnode.providers.base import Provider
from meshnode.providers.fake import FakeProvider
from meshnode.routing.router import Router

AppFactory = Callable[..., "AsyncIterator[TestClient]"]


def make_router(providers: Sequence[Provider], **routing: object) -> Router:
    config = RoutingConfig.model_validate(routing)
    return Router(config, [p.name for p in providers], providers, "node-test")


@pytest.fixture
async def api_client() -> AsyncIterator[Callable[..., object]]:
    """`await api_client(providers, max_body_bytes=..., **routing)` -> a started TestClient."""
    clients: list[TestClient] = []

    async def start(
        providers: Sequence[Provider], *, max_body_bytes: int = 1 << 20, **routing: object
    ) -> TestClient:
        router = make_router(providers, **routing)
        app = create_app(
            router, node_id="node-test", server=ServerConfig(max_body_bytes=max_body_bytes)
        )
        client = TestClient(TestServer(app, handler_cancellation=True))
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()


@pytest.fixture
def fake() -> FakeProvider:
    return FakeProvider("fake", models=["m"], cost_per_1k=0.01, text="one two three four")
