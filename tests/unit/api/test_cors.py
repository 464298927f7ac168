"""CORS on the app factory: nothing without origins; with them, preflights on every API route
answered before auth, refused for other origins, headers on answers, never credentials with *."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from meshnode.api.app import add_routes, create_app
from meshnode.config import ConfigError, CorsConfig, ServerConfig, validate
from meshnode.providers.fake import FakeProvider
from tests.unit.api.conftest import make_router

ORIGIN = "http://127.0.0.1:5173"


async def _client(cors: dict[str, object]) -> TestClient:
    router = make_router([FakeProvider("fake", models=["m"])])
    app = create_app(router, node_id="n", server=ServerConfig(cors=CorsConfig(**cors)))  # type: ignore[arg-type]
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest.fixture
async def allowed() -> AsyncIterator[TestClient]:
    client = await _client({"allow_origins": [ORIGIN], "allow_credentials": True})
    yield client
    await client.close()


def _preflight(method: str = "POST") -> dict[str, str]:
    return {"Origin": ORIGIN, "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}


async def test_without_origins_nothing_changes() -> None:
    client = await _client({})
    try:
        resp = await client.options("/v1/chat/completions", headers=_preflight())
        assert resp.status == 405
        assert "Access-Control-Allow-Origin" not in resp.headers
        resp = await client.get("/v1/models", headers={"Origin": ORIGIN})
        assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers
    finally:
        await client.close()


def _api_routes() -> list[tuple[str, str]]:
    from aiohttp import web

    app = web.Application()
    add_routes(app)
    out = []
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if route.method in ("GET", "POST", "DELETE") and path.startswith("/v1/"):
            out.append((route.method, path.replace("{model_id:.+}", "m").replace(
                "{response_id}", "resp_1")))
    return out


@pytest.mark.parametrize(("method", "path"), _api_routes())
async def test_preflight_answered_on_every_api_route(
    allowed: TestClient, method: str, path: str
) -> None:
    resp = await allowed.options(path, headers=_preflight(method))
    assert resp.status == 204, path
    assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert method in resp.headers["Access-Control-Allow-Methods"]
    assert resp.headers["Access-Control-Allow-Headers"] == _preflight()[
        "Access-Control-Request-Headers"]
    assert resp.headers["Access-Control-Allow-Credentials"] == "true"
    assert resp.headers["Vary"] == "Origin"


async def test_other_origin_and_wrong_method_refused(allowed: TestClient) -> None:
    resp = await allowed.options("/v1/chat/completions", headers={
        **_preflight(), "Origin": "http://evil.example"})
    assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers
    resp = await allowed.options("/v1/chat/completions", headers=_preflight("DELETE"))
    assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers
    resp = await allowed.post("/v1/chat/completions", headers={"Origin": "http://evil.example"},
                              json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers


async def test_answers_and_errors_carry_the_headers(allowed: TestClient) -> None:
    ok = await allowed.post("/v1/chat/completions", headers={"Origin": ORIGIN},
                            json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert ok.status == 200 and ok.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "x-aiproxy-provider" in ok.headers["Access-Control-Expose-Headers"]
    bad = await allowed.post("/v1/chat/completions", headers={"Origin": ORIGIN}, data=b"{")
    assert bad.status == 400 and bad.headers["Access-Control-Allow-Origin"] == ORIGIN
    stream = await allowed.post("/v1/chat/completions", headers={"Origin": ORIGIN}, json={
        "model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    assert stream.headers["Access-Control-Allow-Origin"] == ORIGIN
    await stream.read()


async def test_star_never_allows_credentials() -> None:
    with pytest.raises(ConfigError) as caught:
        validate({"server": {"cors": {"allow_origins": ["*"], "allow_credentials": True}}})
    assert "server.cors" in str(caught.value)
    with pytest.raises(ConfigError):
        validate({"server": {"cors": {"allow_origins": ["http://x.example/"]}}})
    client = await _client({"allow_origins": ["*"]})
    try:
        resp = await client.options("/v1/messages", headers=_preflight())
        assert resp.status == 204 and resp.headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in resp.headers
    finally:
        await client.close()


async def test_private_network_access_preflight(allowed: TestClient) -> None:
    resp = await allowed.options("/v1/chat/completions", headers={
        **_preflight(), "Access-Control-Request-Private-Network": "true"})
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Private-Network"] == "true"
    plain = await allowed.options("/v1/chat/completions", headers=_preflight())
    assert "Access-Control-Allow-Private-Network" not in plain.headers
