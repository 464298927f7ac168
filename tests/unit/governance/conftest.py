"""Fixtures for governance over HTTP: a real aiohttp server on loopback around a real Router
(with the budget gate) and in-process FakeProviders, governance installed the way the node
installs it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from meshnode.api.app import create_app
from meshnode.config import AuthConfig, BudgetConfig, KeyConfig, RoutingConfig
from meshnode.governance.keys import hash_secret
from meshnode.governance.service import Governance
from meshnode.providers.base import Provider
from meshnode.routing.router import Router

ADMIN_SECRET = "sk-test-admin-0123456789abcdef"


@dataclass
class Stack:
    client: TestClient
    gov: Governance
    router: Router

    def auth(self, secret: str = ADMIN_SECRET) -> dict[str, str]:
        return {"Authorization": f"Bearer {secret}"}


StackFactory = Callable[..., "AsyncIterator[Stack]"]


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    """`await stack(providers, auth=..., budget=...)` -> a started `Stack`."""
    started: list[Stack] = []

    async def start(
        providers: Sequence[Provider],
        *,
        auth: bool = True,
        keys: Sequence[KeyConfig] = (),
        budget: BudgetConfig | None = None,
        routing: dict[str, object] | None = None,
        refresh_interval_s: float = 0.05,
    ) -> Stack:
        admin = KeyConfig(name="root", key_sha256=hash_secret(ADMIN_SECRET), admin=True)
        gov = Governance(
            AuthConfig(enabled=auth, keys=[admin, *keys]),
            budget or BudgetConfig(),
            tmp_path,
            "node-test",
            mesh_secret="mesh-secret",
            refresh_interval_s=refresh_interval_s,
        )
        gov.open()
        router = Router(
            RoutingConfig.model_validate(routing or {}),
            [p.name for p in providers],
            providers,
            "node-test",
            spend=gov.spend_gate,
        )
        app = create_app(router, node_id="node-test", extra_routes=[gov.install])
        client = TestClient(TestServer(app, handler_cancellation=True))
        await client.start_server()
        s = Stack(client, gov, router)
        started.append(s)
        return s

    yield start
    for s in started:
        await s.client.close()
        s.gov.close()
