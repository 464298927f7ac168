"""Five real node processes on loopback, joined through one seed (issue 5).

One fake OpenAI server (in this test's event loop) is every node's upstream; what differs is the
model list in each node's config, so where a model is served is under the test's control:
- `only-c` is served by node C alone; `shared` by D and E; A (the seed, where clients talk)
  serves nothing itself.
The tests run in file order on one module-scoped cluster (starting processes is what costs):
join -> forward through A -> stream through A -> kill E under load -> SIGKILL C -> SIGTERM B.
Mesh timing is shortened (probe 250 ms) so the waits are short; the defaults are measured in
bench/mesh_failure.py. No assertion is timed: every wait is on a condition, with a generous cap.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio

from tests.kit.fake_openai import Behaviour, FakeOpenAI
from tests.kit.node_proc import NodeProcess
from tests.kit.wait import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240), pytest.mark.asyncio(loop_scope="module")]

NAMES = ("a", "b", "c", "d", "e")
MODELS = {"a": [], "b": ["b-model"], "c": ["only-c"], "d": ["shared"], "e": ["shared"]}
WAIT_S = 60.0


def node_config(models: list[str], upstream: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "mesh": {
            "mdns": False,
            "probe_interval_ms": 250,
            "probe_timeout_ms": 250,
            "suspicion_mult": 4,
            "gossip_interval_ms": 200,
            "max_hops": 2,
        },
        # round_robin: load through A spreads over D and E, so killing E hits requests.
        "routing": {"strategy": "round_robin",
                    "failover": {"backoff": {"initial_ms": 10, "max_ms": 50}}},
        "server": {"shutdown_grace_s": 5},
        "providers": {},
    }
    if models:
        config["providers"]["upstream"] = {
            "type": "openai_compatible",
            "base_url": upstream,
            "credentials": {"api_key": "sk-test"},
            "models": [{"name": m, "openai_model": m, "cost_per_1k_tokens": 0.001}
                       for m in models],
        }
    return config


class Cluster:
    def __init__(self, fake: FakeOpenAI, workdir: Path, http: aiohttp.ClientSession) -> None:
        self.fake = fake
        self.workdir = workdir
        self.http = http
        self.nodes: dict[str, NodeProcess] = {}
        self.gone: set[str] = set()

    def live(self) -> list[str]:
        return [n for n in self.nodes if n not in self.gone]

    async def start_node(self, name: str, seeds: list[str]) -> NodeProcess:
        node = NodeProcess(
            node_config(MODELS[name], self.fake.base_url), self.workdir, name=name,
            grpc_listen="127.0.0.1:0", seeds=seeds, node_id=name,
        )
        await node.astart()
        await wait_for(lambda: "MESHNODE_GRPC" in node.refresh_announcements(),
                       f"{name} announces its gRPC address", WAIT_S)
        self.nodes[name] = node
        return node

    async def mesh(self, name: str) -> dict[str, str]:
        """`/admin/mesh` of a node as {member id: status}."""
        async with self.http.get(self.nodes[name].url + "/admin/mesh") as resp:
            assert resp.status == 200
            body = orjson.loads(await resp.read())
        return {m["id"]: m["status"] for m in body["members"]}

    async def everyone_sees(self, subject: str, status: str) -> bool:
        views = await asyncio.gather(*(self.mesh(n) for n in self.live()))
        return all(v.get(subject) == status for v in views)

    async def chat(self, name: str, model: str, **extra: Any) -> tuple[int, dict[str, Any]]:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
        async with self.http.post(self.nodes[name].base_url + "/chat/completions",
                                  json=body) as resp:
            return resp.status, orjson.loads(await resp.read())


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    async with FakeOpenAI(models=["only-c", "shared", "b-model"]) as fake, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        c = Cluster(fake, tmp_path_factory.mktemp("mesh"), http)
        try:
            seed = await c.start_node("a", [])
            seed_addr = seed.announced["MESHNODE_GRPC"]
            await asyncio.gather(*(c.start_node(n, [seed_addr]) for n in NAMES[1:]))
            yield c
        finally:
            await asyncio.gather(*(n.astop(timeout=15) for n in c.nodes.values()))


async def test_five_nodes_join_through_one_seed(cluster: Cluster) -> None:
    for subject in NAMES:
        await wait_for(lambda s=subject: cluster.everyone_sees(s, "alive"),
                       f"every node sees {subject} alive", WAIT_S)
    view = await cluster.mesh("e")
    assert sorted(view) == list(NAMES)


async def test_model_served_only_by_c_is_answered_through_a(cluster: Cluster) -> None:
    async def offered() -> bool:
        async with cluster.http.get(cluster.nodes["a"].base_url + "/models") as resp:
            ids = [m["id"] for m in orjson.loads(await resp.read())["data"]]
        return "only-c" in ids

    await wait_for(offered, "A offers only-c through the mesh", WAIT_S)
    status, body = await cluster.chat("a", "only-c")
    assert status == 200, body
    assert body["x_aiproxy"]["node"] == "c"
    assert body["choices"][0]["message"]["content"]
    assert cluster.fake.requests[-1].json["model"] == "only-c"


async def test_stream_through_a_peer_relays_chunks_as_they_come(cluster: Cluster) -> None:
    cluster.fake.reset()
    cluster.fake.script(Behaviour.ok(text="alpha beta gamma delta", pause_after=2))
    body = {"model": "only-c", "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}
    seen: list[str] = []
    async with cluster.http.post(cluster.nodes["a"].base_url + "/chat/completions",
                                 json=body) as resp:
        assert resp.status == 200
        # The upstream paused after two events: those must reach us through C and A now,
        # before the rest exists.
        while len([s for s in seen if s]) < 1:
            line = (await asyncio.wait_for(resp.content.readline(), 30)).decode().strip()
            if line.startswith("data: {"):
                event = orjson.loads(line[6:])
                for choice in event.get("choices", []):
                    seen.append(choice["delta"].get("content") or "")
        assert "".join(seen).strip() == "alpha"
        cluster.fake.release()
        rest = (await resp.read()).decode()
    assert "gamma" in rest and rest.rstrip().endswith("data: [DONE]")
    last = [ln for ln in rest.splitlines() if ln.startswith("data: {")][-1]
    assert orjson.loads(last[6:])["x_aiproxy"]["node"] == "c"


async def test_peer_killed_under_load_costs_no_client_error(cluster: Cluster) -> None:
    cluster.fake.reset()

    async def served() -> bool:  # a (status, body) tuple is always truthy: test the status
        return (await cluster.chat("a", "shared"))[0] == 200

    await wait_for(served, "shared is served through A", WAIT_S)
    results: list[tuple[int, str]] = []
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            status, body = await cluster.chat("a", "shared")
            results.append((status, body.get("x_aiproxy", {}).get("node", "")))

    clients = [asyncio.create_task(client()) for _ in range(4)]
    try:
        await wait_for(lambda: {"d", "e"} <= {n for _, n in results}, "both D and E serve", WAIT_S)
        cluster.nodes["e"].kill()
        cluster.gone.add("e")
        killed_at = len(results)
        await wait_for(lambda: len(results) >= killed_at + 40, "40 requests after the kill", WAIT_S)
    finally:
        stop.set()
        outcomes = await asyncio.gather(*clients, return_exceptions=True)
    assert [o for o in outcomes if o is not None] == []
    errors = [r for r in results if r[0] != 200]
    assert errors == [], errors
    assert all(node == "d" for _, node in results[killed_at + 20:])


async def test_sigkilled_node_is_known_dead_by_all_and_not_chosen(cluster: Cluster) -> None:
    await wait_for(lambda: cluster.everyone_sees("e", "dead"), "E (killed) is dead for all", WAIT_S)
    cluster.nodes["c"].kill()
    cluster.gone.add("c")
    await wait_for(lambda: cluster.everyone_sees("c", "dead"), "C is dead for all", WAIT_S)
    cluster.fake.reset()
    status, body = await cluster.chat("a", "only-c")
    assert status in (404, 503), body
    assert cluster.fake.requests == []


async def test_sigterm_gives_a_graceful_leave_seen_by_all(cluster: Cluster) -> None:
    node = cluster.nodes["b"]
    node.terminate()
    cluster.gone.add("b")
    await wait_for(lambda: cluster.everyone_sees("b", "left"), "B has left for all", WAIT_S)
    assert await asyncio.to_thread(node.wait, 30) == 0
