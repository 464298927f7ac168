"""Keys, rate limits and budgets on real node processes in front of the fake OpenAI upstream.

- 50 concurrent requests against a budget that affords 10, the upstream holding each call a
  second: at most 10 served, spend <= the limit, spend == the sum of the settled costs;
- SIGKILL with reservations open, restart: spend kept, open reservations charged in full, the
  period not reset;
- twice the RPM from one key: 429s with OpenAI's headers, the upstream never sees more;
- every route with no key, a wrong key, a revoked key, a non-admin key: 401/403 except /health/*;
- `meshnode keys create|revoke` against a running node's data_dir is honoured within seconds;
- planted secrets (API keys, the upstream's key) never appear in logs, error bodies or /metrics.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meshnode.api.protocol import parse_request
from meshnode.governance.gate import prompt_tokens
from meshnode.governance.keys import hash_secret
from meshnode.types import RequestKind
from tests.kit.fake_openai import Behaviour, FakeOpenAIProcess
from tests.kit.node_proc import REPO_ROOT, NodeProcess
from tests.kit.wait import wait_for

pytestmark = pytest.mark.slow
WAIT_S = 30.0  # a node honours a CLI key, and gossip carries a slot, within seconds

PRICE_PER_1K = 1.0
MAX_TOKENS = 10
CONTENT = "hello world"
ADMIN_SECRET = "sk-planted-admin-7f3a9c1e5b2d4f60"
USER_SECRET = "sk-planted-user-0b8e6d4c2a1f3957"
UPSTREAM_SECRET = "sk-planted-upstream-5c7e9a1b3d2f4e68"
PLANTED = (ADMIN_SECRET, USER_SECRET, UPSTREAM_SECRET)


def chat_body(**over: Any) -> dict[str, Any]:
    return {"model": "gpt-g", "messages": [{"role": "user", "content": CONTENT}],
            "max_tokens": MAX_TOKENS, **over}


def worst_case_tokens() -> int:
    """What the node reserves for `chat_body()`: computed by the node's own code path."""
    request = parse_request(RequestKind.CHAT, json.dumps(chat_body()).encode(),
                            request_id="t", timeout_s=1.0)
    return prompt_tokens(request) + MAX_TOKENS


def node_config(fake: FakeOpenAIProcess, **sections: Any) -> dict[str, Any]:
    return {
        "mesh": {"enabled": False, "mdns": False},
        "providers": {
            "cloud": {"type": "openai_compatible", "base_url": fake.base_url,
                      "credentials": {"api_key": UPSTREAM_SECRET},
                      "models": [{"name": "gpt-g", "openai_model": "gpt-g",
                                  "cost_per_1k_tokens": PRICE_PER_1K}]},
        },
        **sections,
    }


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAIProcess]:
    with FakeOpenAIProcess(require_key=UPSTREAM_SECRET) as f:
        yield f


async def get_json(session: aiohttp.ClientSession, url: str, **kw: Any) -> Any:
    async with session.get(url, **kw) as r:
        assert r.status == 200, await r.text()
        return await r.json()


# --------------------------------------------------------------------------- budget
async def test_fifty_concurrent_requests_against_a_budget_for_ten(
    fake: FakeOpenAIProcess, tmp_path: Path
) -> None:
    worst = worst_case_tokens()
    # The upstream bills exactly the worst case (prompt words + pieces = worst), so a settled
    # call frees nothing and "at most 10" does not depend on how fast 50 requests arrive.
    prompt_words = len(CONTENT.split())
    text = " ".join(["w"] * (worst - prompt_words))
    fake.reset()
    fake.script(Behaviour.ok(text=text, delay_s=1.0, times=-1))
    limit = 10 * worst * PRICE_PER_1K / 1000.0
    config = node_config(fake, budget={"daily_limit": limit, "scope": "node"})
    node = await NodeProcess(config, tmp_path, name="budget").astart()
    try:
        async with aiohttp.ClientSession() as session:
            async def one() -> tuple[int, Any]:
                async with session.post(node.base_url + "/chat/completions",
                                        json=chat_body()) as r:
                    return r.status, await r.json()

            results = await asyncio.gather(*[one() for _ in range(50)])
            served = [body for status, body in results if status == 200]
            refused = [body for status, body in results if status == 429]
            assert len(served) + len(refused) == 50, [s for s, _ in results]
            assert len(served) == 10  # each settles at exactly its reservation
            assert all(b["error"]["code"] == "budget_exceeded" for b in refused)
            budget = await get_json(session, node.url + "/admin/budget")
        settled = sum(b["x_aiproxy"]["cost"] for b in served)
        assert budget["spent_today"] <= limit + 1e-9
        assert budget["spent_today"] == pytest.approx(settled, abs=1e-7)
        assert budget["open_reservations"] == 0
        assert len(fake.requests()) == len(served)  # refused calls never reached the upstream
    finally:
        await node.astop()


async def test_sigkill_with_open_reservations_keeps_spend_and_charges_them(
    fake: FakeOpenAIProcess, tmp_path: Path
) -> None:
    fake.reset()
    config = node_config(fake, budget={"daily_limit": 100.0, "monthly_limit": 1000.0})
    node = await NodeProcess(config, tmp_path, name="crash").astart()
    pending: list[asyncio.Task[Any]] = []
    async with aiohttp.ClientSession() as session:
        try:
            async with session.post(node.base_url + "/chat/completions", json=chat_body()) as r:
                assert r.status == 200
                first_cost = (await r.json())["x_aiproxy"]["cost"]
            fake.script(Behaviour.hang(times=-1))

            async def hanging() -> None:
                try:
                    async with session.post(node.base_url + "/chat/completions",
                                            json=chat_body()) as r:
                        await r.read()
                except aiohttp.ClientError:
                    pass  # the node dies under it

            pending = [asyncio.create_task(hanging()) for _ in range(3)]

            async def three_open() -> bool:
                budget = await get_json(session, node.url + "/admin/budget")
                return bool(budget["open_reservations"] == 3)

            await wait_for(three_open, "three requests hold reservations", WAIT_S)
            before = await get_json(session, node.url + "/admin/budget")
            node.kill()
            await asyncio.gather(*pending)
        finally:
            await node.astop()
        fake.reset()
        again = await NodeProcess(config, tmp_path, name="crash").astart()
        try:
            after = await get_json(session, again.url + "/admin/budget")
        finally:
            await again.astop()
    worst_cost = worst_case_tokens() * PRICE_PER_1K / 1000.0
    assert before["spent_today"] == pytest.approx(first_cost)
    assert after["day"] == before["day"] or after["month"] == before["month"]
    if after["day"] == before["day"]:
        assert after["spent_today"] == pytest.approx(first_cost + 3 * worst_cost)
    assert after["spent_this_month"] == pytest.approx(first_cost + 3 * worst_cost)
    assert after["open_reservations"] == 0


# --------------------------------------------------------------------------- keys, limits
@pytest.fixture(scope="module")
def secured(fake: FakeOpenAIProcess, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[NodeProcess]:
    config = node_config(fake, auth={"enabled": True, "keys": [
        {"name": "root", "key_sha256": hash_secret(ADMIN_SECRET), "admin": True},
        {"name": "user", "key_sha256": hash_secret(USER_SECRET), "rpm": 5},
    ]})
    with NodeProcess(config, tmp_path_factory.mktemp("secured"), name="secured") as node:
        yield node


def keys_cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshnode", "keys", *args, "--json",
         "--data-dir", str(node.workdir / f"{node.name}-data")],
        capture_output=True, text=True, cwd=REPO_ROOT, env=node.env, timeout=60, check=False,
    )


async def test_twice_the_rpm_gets_429s_and_the_upstream_never_sees_more(
    fake: FakeOpenAIProcess, secured: NodeProcess
) -> None:
    fake.reset()
    auth = {"Authorization": f"Bearer {USER_SECRET}"}
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        started = loop.time()
        statuses, headers = [], []
        for _ in range(10):
            async with session.post(secured.base_url + "/chat/completions", json=chat_body(),
                                    headers=auth) as r:
                statuses.append(r.status)
                headers.append(r.headers)
                body = await r.json()
                if r.status == 429:
                    assert body["error"]["code"] == "rate_limit_exceeded"
                    assert int(r.headers["Retry-After"]) >= 1
        elapsed = loop.time() - started
    # A bucket of 5 refilling at 5 per minute: 5, plus what refilled while the test ran.
    allowed = 5 + int(elapsed * 5 / 60)
    assert 5 <= statuses.count(200) <= allowed
    assert statuses.count(429) == 10 - statuses.count(200)
    assert len(fake.requests()) == statuses.count(200)
    for h in headers:
        assert h["x-ratelimit-limit-requests"] == "5"
        assert 0 <= int(h["x-ratelimit-remaining-requests"]) <= 4
        assert h["x-ratelimit-reset-requests"]
    assert headers[-1]["x-ratelimit-remaining-requests"] == "0"
    # the request log line names the key (its name only), served and refused alike
    lines = [r for r in secured.log_records() if r.get("logger") == "meshnode.request"
             and r.get("key") == "user"]
    assert {line["status"] for line in lines} >= {200, 429}


ROUTES = [
    ("GET", "/v1/models"), ("GET", "/v1/models/gpt-g"), ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"), ("POST", "/v1/embeddings"), ("POST", "/v1/messages"),
    ("POST", "/v1/images/generations"), ("GET", "/admin/stats"),
    ("GET", "/admin/route?model=gpt-g"), ("GET", "/admin/mesh"), ("GET", "/admin/keys"),
    ("POST", "/admin/keys"), ("DELETE", "/admin/keys/user"), ("GET", "/admin/budget"),
    ("GET", "/metrics"), ("GET", "/nothing/here"),
]


async def test_every_route_needs_the_right_key_and_cli_changes_apply_within_seconds(
    secured: NodeProcess,
) -> None:
    created = keys_cli(secured, "create", "--name", "temp")
    assert created.returncode == 0, created.stderr
    temp = json.loads(created.stdout)["key"]
    doomed = json.loads(keys_cli(secured, "create", "--name", "doomed").stdout)["key"]
    async with aiohttp.ClientSession() as session:
        async def status_with(secret: str) -> int:
            async with session.get(secured.base_url + "/models",
                                   headers={"Authorization": f"Bearer {secret}"}) as r:
                return r.status

        async def accepted() -> bool:
            return await status_with(temp) == 200 and await status_with(doomed) == 200

        await wait_for(accepted, "the node honours the CLI's new key", WAIT_S)
        assert keys_cli(secured, "revoke", "doomed").returncode == 0

        async def refused() -> bool:
            return await status_with(doomed) == 401

        await wait_for(refused, "the node refuses the revoked key", WAIT_S)
        wrong = "sk-planted-wrong-1234567890abcdef"
        for method, path in ROUTES:
            for headers in ({}, {"Authorization": f"Bearer {wrong}"},
                            {"Authorization": f"Bearer {doomed}"}, {"x-api-key": wrong}):
                async with session.request(method, secured.url + path, headers=headers,
                                           json={}) as r:
                    assert r.status == 401, (method, path, headers, r.status)
                    text = await r.text()
                    assert wrong not in text and doomed not in text
            async with session.request(method, secured.url + path, json={},
                                       headers={"Authorization": f"Bearer {temp}"}) as r:
                if path.startswith("/admin") or path == "/metrics":
                    assert r.status == 403, (method, path)
                else:
                    assert r.status not in (401, 403), (method, path, r.status)
        for path in ("/health/live", "/health/ready"):
            async with session.get(secured.url + path) as r:
                assert r.status == 200
        async with session.get(secured.url + "/admin/keys",
                               headers={"Authorization": f"Bearer {ADMIN_SECRET}"}) as r:
            listed = await r.json()
            assert {k["name"] for k in listed["data"]} >= {"root", "user", "temp", "doomed"}


async def test_planted_secrets_never_leak(secured: NodeProcess) -> None:
    """Runs after the tests above on the same node: its log, /metrics and error bodies."""
    async with aiohttp.ClientSession() as session:
        bodies = []
        for secret in PLANTED:
            async with session.post(secured.base_url + "/chat/completions",
                                    headers={"Authorization": f"Bearer {secret}x"},
                                    json={"model": secret, "messages": []}) as r:
                bodies.append(await r.text())
        async with session.post(secured.base_url + "/chat/completions",
                                headers={"Authorization": f"Bearer {ADMIN_SECRET}"},
                                json={"model": USER_SECRET, "messages": []}) as r:
            bodies.append(await r.text())
        async with session.get(secured.url + "/metrics",
                               headers={"Authorization": f"Bearer {ADMIN_SECRET}"}) as r:
            assert r.status == 200
            bodies.append(await r.text())
    logs = secured.logs()
    for secret in PLANTED:
        assert secret not in logs
        assert hash_secret(secret) not in logs
        for body in bodies:
            assert secret not in body
            assert hash_secret(secret) not in body


# --------------------------------------------------------------------------- mesh-wide spend
async def test_mesh_scope_budget_counts_every_nodes_spend(
    fake: FakeOpenAIProcess, tmp_path: Path
) -> None:
    fake.reset()
    worst = worst_case_tokens()
    fake.script(Behaviour.ok(text=" ".join(["w"] * (worst - len(CONTENT.split()))), times=-1))
    worst_cost = worst * PRICE_PER_1K / 1000.0
    # Spend counters cross only an authenticated mesh (docs/security.md).
    mesh = {"enabled": True, "mdns": False, "gossip_interval_ms": 100,
            "probe_interval_ms": 250, "probe_timeout_ms": 250, "secret": "mesh-scope-secret"}
    # Room for one worst case and a half: after B spent one call, A cannot afford another.
    budget = {"daily_limit": 1.5 * worst_cost, "scope": "mesh"}
    a = await NodeProcess({**node_config(fake, budget=budget), "mesh": mesh}, tmp_path,
                          name="a", grpc_listen="127.0.0.1:0", node_id="a").astart()
    try:
        seed = a.refresh_announcements()["MESHNODE_GRPC"]
        b = await NodeProcess({**node_config(fake, budget=budget), "mesh": mesh}, tmp_path,
                              name="b", grpc_listen="127.0.0.1:0", node_id="b",
                              seeds=[seed]).astart()
        try:
            async with aiohttp.ClientSession() as session:
                async with session.post(b.base_url + "/chat/completions",
                                        json=chat_body()) as r:
                    assert r.status == 200
                    cost = (await r.json())["x_aiproxy"]["cost"]

                async def a_knows() -> bool:
                    got = await get_json(session, a.url + "/admin/budget")
                    return bool(abs(got["spent_today"] - cost) < 1e-9)

                await wait_for(a_knows, "B's budget slot reached A by gossip", WAIT_S)
                got = await get_json(session, a.url + "/admin/budget")
                assert got["spent_today_this_node"] == 0
                async with session.post(a.base_url + "/chat/completions",
                                        json=chat_body()) as r:
                    assert r.status == 429
                    assert (await r.json())["error"]["code"] == "budget_exceeded"
        finally:
            await b.astop()
    finally:
        await a.astop()


# --------------------------------------------------------------------------- keys across the mesh
async def test_a_key_created_on_one_node_works_on_another_and_revocation_travels(
    fake: FakeOpenAIProcess, tmp_path: Path
) -> None:
    """Key records travel in the owner's gossiped state, signed with the mesh secret: created
    on A, accepted by B; revoked on B, refused by A; a node with another secret learns nothing."""
    fake.reset()
    mesh = {"enabled": True, "mdns": False, "gossip_interval_ms": 100,
            "probe_interval_ms": 250, "probe_timeout_ms": 250, "secret": "mesh-secret-1"}
    auth = {"enabled": True, "keys": [
        {"name": "root", "key_sha256": hash_secret(ADMIN_SECRET), "admin": True}]}

    def config(secret: str) -> dict[str, Any]:
        return {**node_config(fake, auth=auth), "mesh": {**mesh, "secret": secret}}

    a = await NodeProcess(config("mesh-secret-1"), tmp_path, name="ka",
                          grpc_listen="127.0.0.1:0", node_id="ka").astart()
    try:
        seed = a.refresh_announcements()["MESHNODE_GRPC"]
        b = await NodeProcess(config("mesh-secret-1"), tmp_path, name="kb",
                              grpc_listen="127.0.0.1:0", node_id="kb", seeds=[seed]).astart()
        stranger = await NodeProcess(config("another-secret"), tmp_path, name="kc",
                                     grpc_listen="127.0.0.1:0", node_id="kc",
                                     seeds=[seed]).astart()
        try:
            created = keys_cli(a, "create", "--name", "travelling")
            assert created.returncode == 0, created.stderr
            secret = json.loads(created.stdout)["key"]
            async with aiohttp.ClientSession() as session:
                async def status_on(node: NodeProcess) -> int:
                    async with session.get(node.base_url + "/models",
                                           headers={"Authorization": f"Bearer {secret}"}) as r:
                        return r.status

                async def b_accepts() -> bool:
                    return await status_on(b) == 200

                await wait_for(b_accepts, "B accepts the key made on A", WAIT_S)
                assert keys_cli(b, "revoke", "travelling").returncode == 0

                async def a_refuses() -> bool:
                    return await status_on(a) == 401

                await wait_for(a_refuses, "A refuses the key revoked on B", WAIT_S)
                assert await status_on(stranger) == 401
        finally:
            await stranger.astop()
            await b.astop()
    finally:
        await a.astop()
