"""Governance over a real HTTP server: auth on every route, rate limits with OpenAI's headers,
budgets through the router gate, /admin/keys."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from meshnode.config import BudgetConfig, KeyConfig
from meshnode.governance.keys import KeyStore, hash_secret
from meshnode.providers.fake import Delay, FakeProvider
from tests.kit.wait import wait_for

from .conftest import ADMIN_SECRET

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


def chat(**over: Any) -> dict[str, Any]:
    return {**CHAT, **over}


ROUTES = [
    ("GET", "/v1/models"),
    ("GET", "/v1/models/m"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/responses"),
    ("GET", "/v1/responses/resp_1"),
    ("DELETE", "/v1/responses/resp_1"),
    ("GET", "/admin/stats"),
    ("GET", "/admin/route?model=m"),
    ("GET", "/admin/keys"),
    ("GET", "/admin/budget"),
    ("GET", "/metrics"),
    ("GET", "/no/such/route"),
]
ADMIN_ROUTES = {"/admin/stats", "/admin/route?model=m", "/admin/keys", "/admin/budget",
                "/metrics"}


async def test_every_route_refuses_missing_wrong_and_revoked_keys(stack: Any) -> None:
    s = await stack([FakeProvider("fake", models=["m"])])
    created = await s.client.post("/admin/keys", json={"name": "user"}, headers=s.auth())
    assert created.status == 201
    user = (await created.json())["key"]
    gone = await s.client.post("/admin/keys", json={"name": "gone"}, headers=s.auth())
    revoked = (await gone.json())["key"]
    assert (await s.client.delete("/admin/keys/gone", headers=s.auth())).status == 200
    for method, path in ROUTES:
        for headers in ({}, {"Authorization": "Bearer sk-wrong-0000000000000000"},
                        {"Authorization": "Basic dXNlcjpwYXNz"}, s.auth(revoked)):
            r = await s.client.request(method, path, headers=headers, json=chat())
            assert r.status == 401, (method, path, headers)
            body = await r.json()
            assert body["error"]["type"] == "authentication_error"
            assert revoked not in await r.text()
        r = await s.client.request(method, path, headers=s.auth(user), json=chat())
        if path in ADMIN_ROUTES:
            assert r.status == 403, path
            assert (await r.json())["error"]["code"] == "permission_denied"
        else:
            assert r.status not in (401, 403), path
        r = await s.client.request(method, path, headers=s.auth(), json=chat())
        assert r.status not in (401, 403), path
    for path in ("/health/live", "/health/ready"):
        assert (await s.client.get(path)).status == 200


async def test_anthropic_style_x_api_key_is_accepted(stack: Any) -> None:
    s = await stack([FakeProvider("fake", models=["m"])])
    r = await s.client.get("/v1/models", headers={"x-api-key": ADMIN_SECRET})
    assert r.status == 200


async def test_the_anthropic_door_refuses_in_anthropics_envelope(stack: Any) -> None:
    s = await stack([FakeProvider("fake", models=["m"])])
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    r = await s.client.post("/v1/messages", json=body)
    assert r.status == 401
    refused = await r.json()
    assert refused["type"] == "error"
    assert refused["error"]["type"] == "authentication_error"
    assert "x-api-key" in refused["error"]["message"]
    r = await s.client.post("/v1/messages", json=body, headers={"x-api-key": ADMIN_SECRET})
    assert r.status == 200


async def test_auth_off_lets_everything_through(stack: Any) -> None:
    s = await stack([FakeProvider("fake", models=["m"])], auth=False)
    assert (await s.client.post("/v1/chat/completions", json=chat())).status == 200
    assert (await s.client.get("/admin/stats")).status == 200


async def test_auth_off_does_not_serve_key_management(stack: Any) -> None:
    """A node that cannot tell who asks must not mint or revoke keys for the mesh."""
    s = await stack([FakeProvider("fake", models=["m"])], auth=False)
    for method, path in (("POST", "/admin/keys"), ("DELETE", "/admin/keys/user")):
        r = await s.client.request(method, path, json={"name": "evil", "admin": True})
        body = await r.json()
        assert r.status == 404 and body["error"]["code"] == "key_management_disabled"
        assert "auth.enabled: false" in body["error"]["message"]
    listed = await (await s.client.get("/admin/keys")).json()
    assert "evil" not in {k["name"] for k in listed["data"]}


async def test_model_allow_list(stack: Any) -> None:
    secret = "sk-only-m-0123456789abcdef"
    s = await stack([FakeProvider("fake", models=["m", "other"])],
                    keys=[KeyConfig(name="only-m", key_sha256=hash_secret(secret), models=["m"])])
    assert (await s.client.post("/v1/chat/completions", json=chat(),
                                headers=s.auth(secret))).status == 200
    r = await s.client.post("/v1/chat/completions", json=chat(model="other"),
                            headers=s.auth(secret))
    assert r.status == 403
    assert (await r.json())["error"]["param"] == "model"


async def test_twice_the_rpm_gets_429s_with_headers_and_upstream_sees_the_limit(
    stack: Any,
) -> None:
    fake = FakeProvider("fake", models=["m"])
    secret = "sk-limited-0123456789abcdef"
    s = await stack([fake], keys=[KeyConfig(name="ci", key_sha256=hash_secret(secret), rpm=5)])
    results = await asyncio.gather(*[
        s.client.post("/v1/chat/completions", json=chat(), headers=s.auth(secret))
        for _ in range(10)
    ])
    ok = [r for r in results if r.status == 200]
    refused = [r for r in results if r.status == 429]
    assert len(ok) + len(refused) == 10
    # The bucket refills 5/60 per second: a slow run may earn one more.
    assert 5 <= len(ok) <= 6
    assert len(fake.calls) == len(ok)
    for r in refused:
        body = await r.json()
        assert body["error"]["code"] == "rate_limit_exceeded"
        assert int(r.headers["Retry-After"]) >= 1
        assert r.headers["x-ratelimit-limit-requests"] == "5"
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        assert r.headers["x-ratelimit-reset-requests"].endswith("s")
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok)
    assert remaining[0] == 0 and remaining[-1] >= 4
    # Streams carry the headers too (set before the stream's headers leave).
    s2 = await stack([FakeProvider("f2", models=["m"])],
                     keys=[KeyConfig(name="s", key_sha256=hash_secret(secret + "s"), rpm=100)])
    r = await s2.client.post("/v1/chat/completions", json=chat(stream=True),
                             headers=s2.auth(secret + "s"))
    assert r.status == 200 and r.headers["x-ratelimit-remaining-requests"] == "99"
    await r.read()


async def test_tokens_per_minute_charges_real_usage(stack: Any) -> None:
    fake = FakeProvider("fake", models=["m"], text=" ".join(["w"] * 40))  # 50 tokens a call
    secret = "sk-tpm-0123456789abcdef"
    s = await stack([fake], keys=[KeyConfig(name="t", key_sha256=hash_secret(secret), tpm=60)])
    first = await s.client.post("/v1/chat/completions", json=chat(), headers=s.auth(secret))
    assert first.status == 200 and first.headers["x-ratelimit-limit-tokens"] == "60"
    second = await s.client.post("/v1/chat/completions", json=chat(), headers=s.auth(secret))
    assert second.status == 200  # 10 tokens were left: admitted, then 40 in debt
    third = await s.client.post("/v1/chat/completions", json=chat(), headers=s.auth(secret))
    assert third.status == 429
    assert third.headers["x-ratelimit-remaining-tokens"] == "0"
    assert len(fake.calls) == 2


async def test_concurrent_requests_never_overspend_the_budget(stack: Any) -> None:
    # Worst case of one call: the prompt estimate (3 + 4 + 10 tokens for 40 characters) +
    # max_tokens 10 = 27 tokens at $1/1k; the fake bills 10 + 3.
    fake = FakeProvider("fake", models=["m"], cost_per_1k=1.0)
    fake.script(*[Delay(0.3)] * 30)
    limit = 0.027 * 3
    s = await stack([fake], budget=BudgetConfig(daily_limit=limit))
    body = chat(messages=[{"role": "user", "content": "x" * 40}])
    results = await asyncio.gather(*[
        s.client.post("/v1/chat/completions", json=body, headers=s.auth())
        for _ in range(12)
    ])
    statuses = [r.status for r in results]
    assert statuses.count(200) == 3, statuses
    assert statuses.count(429) == 9
    costs = []
    for r in results:
        body = await r.json()
        if r.status == 200:
            costs.append(body["x_aiproxy"]["cost"])
        else:
            assert body["error"]["code"] == "budget_exceeded"
            assert r.headers["Retry-After"]
    spent = s.gov.ledger.spent()
    assert spent <= limit + 1e-12
    assert spent == pytest.approx(sum(costs), abs=1e-8)
    assert s.gov.ledger.open_reservations == 0
    budget = await (await s.client.get("/admin/budget", headers=s.auth())).json()
    assert budget["spent_today"] == pytest.approx(spent, abs=1e-8)


async def test_spent_budget_still_serves_from_free_providers(stack: Any) -> None:
    paid = FakeProvider("cloud", models=["m", "paid-only"], cost_per_1k=1.0, priority=1)
    free = FakeProvider("local", models=["m"], kind="local", priority=2)
    s = await stack([paid, free], budget=BudgetConfig(daily_limit=0.0),
                    routing={"strategy": "latency_optimized"})
    r = await s.client.post("/v1/chat/completions", json=chat(), headers=s.auth())
    assert r.status == 200
    assert r.headers["x-aiproxy-provider"] == "local"
    r = await s.client.post("/v1/chat/completions", json=chat(model="paid-only"),
                            headers=s.auth())
    assert r.status == 429
    assert (await r.json())["error"]["code"] == "budget_exceeded"
    assert paid.calls == []


async def test_per_key_budget(stack: Any) -> None:
    secret = "sk-budget-key-0123456789abcdef"
    fake = FakeProvider("fake", models=["m"], cost_per_1k=1.0)
    s = await stack([fake], keys=[KeyConfig(name="k", key_sha256=hash_secret(secret),
                                            daily_limit=0.02)])
    assert (await s.client.post("/v1/chat/completions", json=chat(),
                                headers=s.auth(secret))).status == 200
    r = await s.client.post("/v1/chat/completions", json=chat(), headers=s.auth(secret))
    assert r.status == 429 and "API key 'k'" in (await r.json())["error"]["message"]
    # The admin key has no key limit and the global budget is unlimited.
    assert (await s.client.post("/v1/chat/completions", json=chat(),
                                headers=s.auth())).status == 200


async def test_stream_cut_by_the_client_pays_what_was_incurred(stack: Any) -> None:
    fake = FakeProvider("fake", models=["m"], cost_per_1k=1.0, chunks=3)
    s = await stack([fake], budget=BudgetConfig(daily_limit=10.0))
    fake.script(Delay(0.0))
    r = await s.client.post("/v1/chat/completions", json=chat(stream=True), headers=s.auth())
    assert r.status == 200
    await r.read()
    await wait_for(lambda: s.gov.ledger.open_reservations == 0, "every reservation is settled")
    assert s.gov.ledger.spent() > 0


async def test_key_created_by_another_process_is_honoured_within_seconds(
    stack: Any, tmp_path: Any
) -> None:
    s = await stack([FakeProvider("fake", models=["m"])])
    cli = KeyStore(tmp_path / "keys.db", node_id="cli")
    cli.open()
    _, secret = cli.create("late")
    await wait_for(lambda: s.gov.keys.lookup(secret) is not None,
                   "the running node honours the new key")
    assert (await s.client.get("/v1/models", headers=s.auth(secret))).status == 200
    cli.revoke("late")
    await wait_for(lambda: s.gov.keys.lookup(secret) is None,
                   "the running node forgets the revoked key")
    assert (await s.client.get("/v1/models", headers=s.auth(secret))).status == 401
    listed = await (await s.client.get("/admin/keys", headers=s.auth())).json()
    late = next(k for k in listed["data"] if k["name"] == "late")
    assert late["revoked"] is True and "key_sha256" not in late


async def test_stored_responses_belong_to_the_key_that_made_them(stack: Any) -> None:
    s = await stack([FakeProvider("fake", models=["m"])])
    secrets = {}
    for name in ("alice", "bob"):
        created = await s.client.post("/admin/keys", json={"name": name}, headers=s.auth())
        secrets[name] = (await created.json())["key"]
    r = await s.client.post("/v1/responses", json={"model": "m", "input": "hi"},
                            headers=s.auth(secrets["alice"]))
    assert r.status == 200
    response_id = (await r.json())["id"]
    own = await s.client.get(f"/v1/responses/{response_id}", headers=s.auth(secrets["alice"]))
    assert own.status == 200
    for method, path, body in [
        ("GET", f"/v1/responses/{response_id}", None),
        ("GET", f"/v1/responses/{response_id}/input_items", None),
        ("DELETE", f"/v1/responses/{response_id}", None),
        ("POST", "/v1/responses",
         {"model": "m", "input": "more", "previous_response_id": response_id}),
    ]:
        other = await s.client.request(method, path, json=body, headers=s.auth(secrets["bob"]))
        assert other.status == 404, (method, path)  # not found, never "forbidden"
    assert (await s.client.get(f"/v1/responses/{response_id}")).status == 401
    still = await s.client.get(f"/v1/responses/{response_id}", headers=s.auth(secrets["alice"]))
    assert still.status == 200
