"""The mesh trust model (docs/security.md) against real node processes, attack by attack.

Each test plays one attack from issue 15 and asserts it is refused, with the log line an
operator needs. Nodes run on loopback with a fake OpenAI upstream (which counts its calls).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from meshnode.governance.gossip import encode_digest
from meshnode.governance.keys import KeyRecord, hash_secret
from meshnode.mesh.service import GOVERNANCE_BLOB
from meshnode.rpc.generated import mesh_pb2 as pb
from tests.kit.fake_openai import FakeOpenAIProcess
from tests.kit.node_proc import REPO_ROOT, NodeProcess, NodeStartError
from tests.kit.wait import wait_for_sync

pytestmark = pytest.mark.slow

ADMIN_SECRET = "sk-trust-admin-6b1f0c2d9e8a7342"
USER_SECRET = "sk-trust-user-1a2b3c4d5e6f7081"
MESH_SECRET = "trust-mesh-secret-90af"
MESH = {"mdns": False, "gossip_interval_ms": 100, "probe_interval_ms": 250,
        "probe_timeout_ms": 250}
AUTH = {"enabled": True, "keys": [
    {"name": "root", "key_sha256": hash_secret(ADMIN_SECRET), "admin": True},
    {"name": "user", "key_sha256": hash_secret(USER_SECRET)},
]}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAIProcess]:
    with FakeOpenAIProcess(models=["gpt-t"]) as f:
        yield f


def config(fake: FakeOpenAIProcess, *, price: float = 0.001, **sections: Any) -> dict[str, Any]:
    return {
        "mesh": MESH,
        "server": {"shutdown_grace_s": 1},
        "providers": {"cloud": {
            "type": "openai_compatible", "base_url": fake.base_url,
            "credentials": {"api_key": "sk-upstream"},
            "models": [{"name": "gpt-t", "openai_model": "gpt-t", "cost_per_1k_tokens": price}],
        }},
        **sections,
    }


def call(url: str, method: str = "GET", body: Any = None,
         key: str | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:  # noqa: S310 - loopback
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def keys_cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshnode", "keys", *args, "--json", "--config",
         str(node.workdir / f"{node.name}.json"),
         "--data-dir", str(node.workdir / f"{node.name}-data")],
        capture_output=True, text=True, cwd=REPO_ROOT, env=node.env, timeout=60, check=False,
    )


def logged(node: NodeProcess, fragment: str) -> bool:
    return any(fragment in str(r.get("msg", "")) for r in node.log_records())


# --------------------------------------------------------------------------- start-up rules
def test_auth_on_refuses_an_unauthenticated_mesh_even_on_loopback(
    fake: FakeOpenAIProcess, tmp_path: Path
) -> None:
    """The default mesh (no secret, loopback) under auth: one clear line, exit 2; --insecure
    starts it, and it says that nothing of governance crosses that mesh."""
    refused = NodeProcess(config(fake, auth=AUTH), tmp_path, name="refused",
                          grpc_listen="127.0.0.1:0")
    with pytest.raises(NodeStartError):
        refused.start()
    assert refused.returncode == 2
    assert "auth.enabled: true needs an authenticated mesh" in refused.logs()
    assert "--insecure" in refused.logs()
    with NodeProcess(config(fake, auth=AUTH), tmp_path, name="insecure",
                     grpc_listen="127.0.0.1:0", extra_args=["--insecure"]) as node:
        assert logged(node, "key records and spend counters are neither sent nor merged")
        assert call(node.base_url + "/models")[0] == 401
        assert call(node.base_url + "/models", key=USER_SECRET)[0] == 200


def test_the_default_config_auth_off_no_secret_loopback_still_serves(
    fake: FakeOpenAIProcess, tmp_path: Path
) -> None:
    with NodeProcess(config(fake), tmp_path, name="plain", grpc_listen="127.0.0.1:0") as node:
        status, body = call(node.base_url + "/chat/completions", "POST",
                            {"model": "gpt-t", "messages": [{"role": "user", "content": "hi"}]})
        assert status == 200, body
        assert body["x_aiproxy"]["provider"] == "cloud"


# --------------------------------------------------------------------------- key minting
def test_an_auth_off_member_cannot_mint_or_revoke_keys_for_the_mesh(
    fake: FakeOpenAIProcess, tmp_path: Path
) -> None:
    """Attack: anonymous POST/DELETE /admin/keys on an auth-off node A gave a working admin key
    on auth-on node B. Now A does not serve key management; a key A's own shell writes stays
    on A; B refuses the record and says from whom."""
    secured = {**MESH, "secret": MESH_SECRET}
    b = NodeProcess({**config(fake, auth=AUTH), "mesh": secured}, tmp_path, name="tb",
                    grpc_listen="127.0.0.1:0", node_id="tb").start()
    try:
        seed = b.refresh_announcements()["MESHNODE_GRPC"]
        a = NodeProcess({**config(fake), "mesh": secured}, tmp_path, name="ta",
                        grpc_listen="127.0.0.1:0", node_id="ta", seeds=[seed]).start()
        try:
            status, body = call(a.url + "/admin/keys", "POST", {"name": "evil", "admin": True})
            assert status == 404 and body["error"]["code"] == "key_management_disabled", body
            assert "auth.enabled: false" in body["error"]["message"]
            status, body = call(a.url + "/admin/keys/user", "DELETE")
            assert status == 404 and body["error"]["code"] == "key_management_disabled"
            # The operator's shell on A can still write one; it is marked not authorised.
            created = keys_cli(a, "create", "--name", "minted", "--admin")
            assert created.returncode == 0, created.stderr
            assert "this key stays on this node" in created.stderr
            minted = json.loads(created.stdout)["key"]
            # B learns the keys B's mesh makes; the one A minted never works there.
            travelled = keys_cli(b, "create", "--name", "from-b")
            assert travelled.returncode == 0, travelled.stderr
            wait_for_sync(lambda: "from-b" in {k["name"] for k in call(
                a.url + "/admin/keys")[1]["data"]}, "b's authorised record reaches a")
            assert call(b.url + "/admin/keys", key=minted)[0] == 401
            names = {k["name"] for k in call(b.url + "/admin/keys", key=ADMIN_SECRET)[1]["data"]}
            assert "minted" not in names
            # B's own keys still work: nothing was revoked.
            assert call(b.base_url + "/models", key=USER_SECRET)[0] == 200
        finally:
            a.stop()
    finally:
        b.stop()


def test_no_secret_mesh_merges_no_key_records_from_a_local_process(
    fake: FakeOpenAIProcess, tmp_path: Path
) -> None:
    """Attack: with no mesh.secret any local process was a member, and its key records (MAC'd
    with an empty secret) were merged. Now an auth-on node runs there only with --insecure, and
    then merges no governance at all."""
    with NodeProcess(config(fake, auth=AUTH), tmp_path, name="victim", node_id="victim",
                     grpc_listen="127.0.0.1:0", extra_args=["--insecure"]) as victim:
        address = victim.refresh_announcements()["MESHNODE_GRPC"]
        evil_secret = "sk-evil-0000000000000000"
        record = KeyRecord(name="evil", key_sha256=hash_secret(evil_secret), admin=True,
                           version=2**40, origin="intruder", authorized=True)
        blob = encode_digest([record], [], None)
        state = pb.NodeState(node_id="intruder", version=1, grpc_address="127.0.0.1:1",
                             status="alive", protocol_version=1,
                             blobs={GOVERNANCE_BLOB: blob})
        message = pb.GossipRequest(protocol_version=1, from_node="intruder", join=True, records=[
            pb.GossipRecord(member=pb.MemberUpdate(node_id="intruder", address="127.0.0.1:1",
                                                   incarnation=1, status=pb.ALIVE),
                            state=state)])
        channel = grpc.insecure_channel(address)
        try:
            gossip = channel.unary_unary("/meshnode.v1.Mesh/Gossip",
                                         request_serializer=pb.GossipRequest.SerializeToString,
                                         response_deserializer=pb.GossipResponse.FromString)
            gossip(message, timeout=5)
        finally:
            channel.close()
        # The intruder is a member (nothing can stop that without a secret) ...
        wait_for_sync(lambda: "intruder" in {m["id"] for m in call(
            victim.url + "/admin/mesh", key=ADMIN_SECRET)[1]["members"]}, "intruder joined")
        # ... but its key never works, however long we wait for a publish tick to merge it.
        wait_for_sync(lambda: logged(victim, "mesh: node victim serving gRPC"), "mesh started")
        for _ in range(5):
            assert call(victim.base_url + "/models", key=evil_secret)[0] == 401
        names = {k["name"] for k in call(victim.url + "/admin/keys", key=ADMIN_SECRET)[1]["data"]}
        assert "evil" not in names


# --------------------------------------------------------------------------- cache tenants
def test_the_cache_never_answers_one_key_with_anothers_answer(
    fake: FakeOpenAIProcess, tmp_path: Path
) -> None:
    other = "sk-trust-other-77aa88bb99cc00dd"
    auth = {"enabled": True, "keys": [*AUTH["keys"],  # type: ignore[list-item]
                                      {"name": "other", "key_sha256": hash_secret(other)}]}
    body = {"model": "gpt-t", "temperature": 0,
            "messages": [{"role": "user", "content": "the tenant question"}]}
    with NodeProcess({**config(fake, auth=auth), "mesh": {"enabled": False}}, tmp_path,
                     name="cached") as node:
        before = len(fake.requests())
        answers = [call(node.base_url + "/chat/completions", "POST", body, key=k)[1]
                   for k in (USER_SECRET, other, USER_SECRET, other)]
        assert [a["x_aiproxy"].get("cache") for a in answers] == [None, None, "hit", "hit"]
        assert len(fake.requests()) - before == 2  # one upstream call per tenant


# --------------------------------------------------------------------------- budgets across a hop
def serving_config(fake: FakeOpenAIProcess, price: float, *, secret: bool = True,
                   **sections: Any) -> dict[str, Any]:
    """A node whose cheapest provider for gpt-t is free but down, so it fails over to a paid
    one: the case where a peer's advertised price was the wrong thing to reserve."""
    return {
        "mesh": {**MESH, "secret": MESH_SECRET} if secret else MESH,
        "server": {"shutdown_grace_s": 1},
        # One retry: the free one fails, the paid one answers or is unaffordable.
        "routing": {"failover": {"max_retries": 1, "backoff": {"initial_ms": 1, "max_ms": 1}}},
        "providers": {
            "free": {"type": "openai_compatible", "base_url": "http://127.0.0.1:9/v1",
                     "priority": 1, "credentials": {"api_key": "x"},
                     "models": [{"name": "gpt-t", "openai_model": "gpt-t",
                                 "cost_per_1k_tokens": 0.0}]},
            "paid": {"type": "openai_compatible", "base_url": fake.base_url, "priority": 2,
                     "credentials": {"api_key": "x"},
                     "models": [{"name": "gpt-t", "openai_model": "gpt-t",
                                 "cost_per_1k_tokens": price}]},
        },
        **sections,
    }


def entry_config(*, secret: bool = True, **sections: Any) -> dict[str, Any]:
    return {"mesh": {**MESH, "secret": MESH_SECRET} if secret else MESH,
            "server": {"shutdown_grace_s": 1}, "providers": {}, **sections}


CHAT = {"model": "gpt-t", "max_tokens": 20,
        "messages": [{"role": "user", "content": "what does it cost"}]}


def two_nodes(tmp_path: Path, serving: dict[str, Any], entry: dict[str, Any],
              key: str | None = None) -> tuple[NodeProcess, NodeProcess]:
    b = NodeProcess(serving, tmp_path, name="tb", grpc_listen="127.0.0.1:0", node_id="tb").start()
    seed = b.refresh_announcements()["MESHNODE_GRPC"]
    a = NodeProcess(entry, tmp_path, name="ta", grpc_listen="127.0.0.1:0", node_id="ta",
                    seeds=[seed])
    try:
        a.start()
        wait_for_sync(lambda: "mesh:tb" in {p for m in call(a.base_url + "/models", key=key)[1][
            "data"] for p in m["providers"]}, "a routes gpt-t to tb")
    except BaseException:
        b.stop()
        raise
    return a, b


def stream(url: str, body: dict[str, Any]) -> dict[str, Any]:
    """A streamed chat; returns its last chunk before [DONE] (the one with x_aiproxy)."""
    request = urllib.request.Request(
        url, data=json.dumps({**body, "stream": True}).encode(), method="POST",
        headers={"Content-Type": "application/json"})
    last: dict[str, Any] = {}
    with urllib.request.urlopen(request, timeout=30) as r:  # noqa: S310 - loopback
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                last = json.loads(line[6:])
    assert "x_aiproxy" in last, last
    return last


def budget(node: NodeProcess) -> dict[str, Any]:
    status, body = call(node.url + "/admin/budget")
    assert status == 200, body
    return body  # type: ignore[no-any-return]


@pytest.mark.parametrize("secret", [True, False], ids=["secret", "default-no-secret"])
def test_forwarded_spend_is_reserved_at_the_peers_dearest_price_and_both_ledgers_agree(
    fake: FakeOpenAIProcess, tmp_path: Path, secret: bool
) -> None:
    """Attack: B advertised its free model, A reserved nothing, B served from its paid one: 60
    of 60 served past a $0.01 limit, both ledgers $0, clients told cost 0. Now A reserves at
    B's dearest price, settles with B's reported cost, and stops at its limit; on the default
    mesh (no secret) too, where no counters travel."""
    limit = 0.001
    a, b = two_nodes(tmp_path, serving_config(fake, 0.01, secret=secret,
                                              budget={"daily_limit": 5.0}),
                     entry_config(secret=secret, budget={"daily_limit": limit, "scope": "node"}))
    try:
        before = len(fake.requests())
        streamed = [stream(a.base_url + "/chat/completions", CHAT) for _ in range(3)]
        answers = [call(a.base_url + "/chat/completions", "POST", CHAT) for _ in range(20)]
        served = [body for status, body in answers if status == 200] + streamed
        refused = [body for status, body in answers if status != 200]
        assert served and refused, answers
        assert {b["error"]["code"] for b in refused} == {"budget_exceeded"}
        assert all(s["x_aiproxy"]["node"] == "tb" and s["x_aiproxy"]["cost"] > 0 for s in served)
        client_total = sum(s["x_aiproxy"]["cost"] for s in served)
        entry, serving = budget(a), budget(b)
        assert entry["spent_today"] == pytest.approx(client_total, abs=1e-8)
        assert serving["served_today_this_node"] == pytest.approx(client_total, abs=1e-8)
        assert serving["spent_today_this_node"] == 0.0  # the entry's charge counts once
        assert entry["spent_today"] <= limit
        assert len(fake.requests()) - before == len(served)  # the upstream's own count
        assert entry["open_reservations"] == serving["open_reservations"] == 0
    finally:
        a.stop()
        b.stop()


def test_a_serving_nodes_own_limit_bounds_what_peers_make_it_spend(
    fake: FakeOpenAIProcess, tmp_path: Path
) -> None:
    """A with no budget at all (it charges nothing, and caps nothing) cannot make B spend past
    B's own daily limit."""
    limit = 0.001
    a, b = two_nodes(tmp_path, serving_config(fake, 0.01, budget={"daily_limit": limit}),
                     entry_config(budget={"enabled": False}))
    try:
        before = len(fake.requests())
        answers = [call(a.base_url + "/chat/completions", "POST", CHAT) for _ in range(20)]
        served = [body for status, body in answers if status == 200]
        refused = [body for status, body in answers if status != 200]
        assert served and refused
        # B's paid provider is unaffordable; what the client hears depends on which of B's
        # candidates failed last (the free one, down, is retried after the paid one is skipped).
        assert {r["error"]["code"] for r in refused} <= {"budget_exceeded", "upstream_error"}
        assert all("tb" in r["error"]["message"] for r in refused)
        serving = budget(b)
        assert serving["served_today_this_node"] <= limit
        assert serving["served_today_this_node"] == pytest.approx(
            sum(s["x_aiproxy"]["cost"] for s in served), abs=1e-8)
        assert len(fake.requests()) - before == len(served)
    finally:
        a.stop()
        b.stop()


# --------------------------------------------------------------------------- who a forwarded call is for
NARROW, SLOW, ONLY_A = "sk-trust-narrow-5f5f5f5f5f5f", "sk-trust-slow-6e6e6e6e6e6e", \
    "sk-trust-only-a-7d7d7d7d7d7d"


def keyring(narrow_models: list[str] | None, slow_rpm: int | None,
            only_a: bool) -> dict[str, Any]:
    keys: list[dict[str, Any]] = [
        *AUTH["keys"],  # type: ignore[list-item]
        {"name": "narrow", "key_sha256": hash_secret(NARROW), "models": narrow_models},
        {"name": "slow", "key_sha256": hash_secret(SLOW), "rpm": slow_rpm},
    ]
    if only_a:
        keys.append({"name": "only-a", "key_sha256": hash_secret(ONLY_A)})
    return {"enabled": True, "keys": keys}


def raw_infer(b: NodeProcess, claim: Any = None, key_name: str = "root") -> Any:
    """A member (it holds the secret) calling B's Infer directly, as an old or hostile node."""
    from meshnode.rpc import convert
    from meshnode.rpc.auth import MeshAuth
    from meshnode.types import InferenceRequest, RequestKind

    request = InferenceRequest(kind=RequestKind.CHAT, model="gpt-t", body=dict(CHAT),
                               request_id="raw-1", deadline=0.0, key_name=key_name)
    body = convert.infer_request_to_pb(request, ("ta",), "ta", 10.0, claim).SerializeToString()
    metadata, _ = MeshAuth(MESH_SECRET).sign_request("ta", "/meshnode.v1.Mesh/Infer", body,
                                                     callee="tb")
    channel = grpc.insecure_channel(b.refresh_announcements()["MESHNODE_GRPC"])
    try:
        infer = channel.unary_stream("/meshnode.v1.Mesh/Infer",
                                     response_deserializer=pb.InferChunk.FromString)
        return list(infer(body, metadata=metadata, timeout=10))[-1]
    finally:
        channel.close()


def test_the_serving_node_checks_the_caller_against_its_own_view(
    fake: FakeOpenAIProcess, tmp_path: Path
) -> None:
    """Attack: gRPC Infer bypassed keys, allow-lists and rate limits, and the caller chose
    key_name (which also selects key-matched policies). Now B serves a forwarded call only for a
    key A authenticated and B knows, under B's own scope and rate limit."""
    from meshnode.rpc.caller import CallerClaim

    serving = {**config(fake, auth=keyring(["nothing"], 2, only_a=False)),
               "mesh": {**MESH, "secret": MESH_SECRET}}
    entry = {**entry_config(auth=keyring(None, None, only_a=True))}
    a, b = two_nodes(tmp_path, serving, entry, key=USER_SECRET)
    url = a.base_url + "/chat/completions"
    try:
        status, body = call(url, "POST", CHAT, key=USER_SECRET)
        assert status == 200 and body["x_aiproxy"]["node"] == "tb", body
        status, body = call(url, "POST", CHAT, key=NARROW)
        assert status == 403 and body["error"]["code"] == "permission_denied", body
        assert "on tb" in body["error"]["message"]
        statuses = [call(url, "POST", CHAT, key=SLOW)[0] for _ in range(3)]
        assert statuses == [200, 200, 429]
        status, body = call(url, "POST", CHAT, key=ONLY_A)
        assert status >= 500 and "not known on tb" in body["error"]["message"], body
        for reason in ("model_scope", "rate_limited", "unknown_key"):
            assert logged(b, f"refused ({reason})"), reason
        # A member calling B directly with a key name of its choosing and no assertion ...
        answer = raw_infer(b)
        assert answer.error.code == "forwarded_refused"
        assert logged(b, "forwarded request from ? for key - refused (no_caller)")
        # ... or with an assertion it made up without the mesh key.
        forged = CallerClaim(key_name="root", models=None, reservation_id=0, reserved_usd=None,
                             entry_node="ta", callee_node="tb", request_id="raw-1",
                             issued_ms=int(time.time() * 1000), mac=b"\x00" * 32)
        answer = raw_infer(b, forged)
        assert answer.error.code == "caller_assertion_invalid"
        assert logged(b, "caller assertion's MAC does not verify")
    finally:
        a.stop()
        b.stop()


# --------------------------------------------------------------------------- gossip at size
def test_six_hundred_keys_propagate_and_so_does_a_revocation(
    fake: FakeOpenAIProcess, tmp_path: Path
) -> None:
    """Attack: past ~64 KiB (500 keys) the governance blob was dropped without a word, and key
    creation and revocation stopped propagating (600 keys are ~74 KB). Now a node's own records
    travel as pages."""
    secured = {**MESH, "secret": MESH_SECRET}
    a = NodeProcess({**config(fake, auth=AUTH), "mesh": secured}, tmp_path, name="ga",
                    grpc_listen="127.0.0.1:0", node_id="ga").start()
    try:
        seed = a.refresh_announcements()["MESHNODE_GRPC"]
        b = NodeProcess({**config(fake, auth=AUTH), "mesh": secured}, tmp_path, name="gb",
                        grpc_listen="127.0.0.1:0", node_id="gb", seeds=[seed]).start()
        try:
            secrets = []
            for i in range(600):
                status, body = call(a.url + "/admin/keys", "POST",
                                    {"name": f"bulk-{i:03d}", "rpm": 600, "daily_limit": 5.0},
                                    key=ADMIN_SECRET)
                assert status == 201, body
                secrets.append(body["key"])
            wait_for_sync(lambda: call(b.base_url + "/models", key=secrets[-1])[0] == 200,
                          "the 600th key works on b")
            assert all(call(b.base_url + "/models", key=s)[0] == 200 for s in secrets[::50])
            status, _ = call(b.url + "/admin/keys/bulk-007", "DELETE", key=ADMIN_SECRET)
            assert status == 200
            wait_for_sync(lambda: call(a.base_url + "/models", key=secrets[7])[0] == 401,
                          "b's revocation reaches a")
            request = urllib.request.Request(
                b.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_SECRET}"})
            with urllib.request.urlopen(request, timeout=10) as r:  # noqa: S310 - loopback
                metrics = r.read().decode()
            assert "meshnode_gossip_dropped_total{" not in metrics  # nothing cut or refused
        finally:
            b.stop()
    finally:
        a.stop()
