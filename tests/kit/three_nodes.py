"""A real three-node mesh on loopback for the meshctl and dashboard tests (blocking, no loop).

    with ThreeNodes(tmp_path, auth_on_a=True) as mesh:   # or auth_on=("a", "b")
        mesh.a.url, mesh.b.url, mesh.c.url         # NodeProcess each; a is the seed
        mesh.chat("a", "shared", key=ADMIN_SECRET)  # one chat through a node
        wait_for_sync(lambda: ..., "what")          # poll a condition, generous cap

One fake OpenAI upstream process serves every node; what differs is each node's model list:
a offers `m1`, b offers `m2` and `shared`, c offers `shared` (so `shared` has two candidates
seen from a, both through the mesh). Mesh timing is shortened (probe 250 ms) so deaths are
known in about a second; every wait is on a condition. Node a may run with auth on: an admin
key (`ADMIN_SECRET`) and a plain one (`USER_SECRET`). Budget: $5 a day, $50 a month.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from meshnode.governance.keys import hash_secret
from tests.kit.fake_openai import FakeOpenAIProcess
from tests.kit.node_proc import NodeProcess
from tests.kit.wait import wait_for_sync

ADMIN_SECRET = "sk-meshctl-admin-3f9a7c51e2b84d60"
USER_SECRET = "sk-meshctl-user-8d2e6b04a9c17f35"
MESH_SECRET = "three-nodes-mesh-secret-5e1c"
MODELS = {"a": ["m1"], "b": ["m2", "shared"], "c": ["shared"]}
DAILY_LIMIT = 5.0
MONTHLY_LIMIT = 50.0


def node_config(models: list[str], upstream: str, auth: bool) -> dict[str, Any]:
    config: dict[str, Any] = {
        # A secret: node a may run with auth on, which needs an authenticated mesh.
        "mesh": {"mdns": False, "probe_interval_ms": 250, "probe_timeout_ms": 250,
                 "suspicion_mult": 4, "gossip_interval_ms": 200, "secret": MESH_SECRET},
        "server": {"shutdown_grace_s": 2},
        "budget": {"daily_limit": DAILY_LIMIT, "monthly_limit": MONTHLY_LIMIT},
        "providers": {"upstream": {
            "type": "openai_compatible", "base_url": upstream,
            "credentials": {"api_key": "sk-upstream"},
            "models": [{"name": m, "openai_model": m, "cost_per_1k_tokens": 0.001}
                       for m in models],
        }},
    }
    if auth:
        config["auth"] = {"enabled": True, "keys": [
            {"name": "ops", "key_sha256": hash_secret(ADMIN_SECRET), "admin": True},
            {"name": "ci", "key_sha256": hash_secret(USER_SECRET)},
        ]}
    return config


class ThreeNodes:
    def __init__(
        self, workdir: Path, *, auth_on_a: bool = False, auth_on: tuple[str, ...] = (),
        env: Callable[[str], dict[str, str]] | None = None,
    ) -> None:
        """`auth_on`: the nodes that run with auth on (`auth_on_a`: just a). A node with auth
        on serves only requests its peers forwarded for a key (docs/security.md), so traffic
        from b to a needs auth on b too."""
        self.workdir = workdir
        self.auth_on = set(auth_on) | ({"a"} if auth_on_a else set())
        self.auth_on_a = "a" in self.auth_on
        self._env = env  # extra environment per node name (e.g. a traces file)
        self.fake = FakeOpenAIProcess(models=["m1", "m2", "shared"])
        self.nodes: dict[str, NodeProcess] = {}

    @property
    def a(self) -> NodeProcess:
        return self.nodes["a"]

    @property
    def b(self) -> NodeProcess:
        return self.nodes["b"]

    @property
    def c(self) -> NodeProcess:
        return self.nodes["c"]

    def _node(self, name: str, seeds: list[str]) -> NodeProcess:
        auth = name in self.auth_on
        node = NodeProcess(node_config(MODELS[name], self.fake.base_url, auth), self.workdir,
                           name=name, grpc_listen="127.0.0.1:0", seeds=seeds, node_id=name,
                           env=self._env(name) if self._env is not None else None)
        self.nodes[name] = node
        node.start()
        wait_for_sync(lambda: "MESHNODE_GRPC" in node.refresh_announcements(),
                      f"{name} announces its gRPC address")
        return node

    def start(self) -> ThreeNodes:
        self.fake.start()
        try:
            seed = self._node("a", []).announced["MESHNODE_GRPC"]
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(lambda n: self._node(n, [seed]), ["b", "c"]))
            wait_for_sync(self.converged, "a sees b and c alive and routes shared to both")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda n: n.stop(timeout=15), self.nodes.values()))
        self.fake.stop()

    def __enter__(self) -> ThreeNodes:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ HTTP
    def key_for(self, name: str) -> str | None:
        return ADMIN_SECRET if name in self.auth_on else None

    def get(self, name: str, path: str) -> Any:
        request = urllib.request.Request(self.nodes[name].url + path)
        key = self.key_for(name)
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return json.loads(response.read())

    def statuses(self, name: str) -> dict[str, str]:
        return {m["id"]: m["status"] for m in self.get(name, "/admin/mesh")["members"]}

    def converged(self) -> bool:
        if self.statuses("a") != {"a": "alive", "b": "alive", "c": "alive"}:
            return False
        models = {m["id"]: m["providers"] for m in self.get("a", "/v1/models")["data"]}
        return {"mesh:b", "mesh:c"} <= set(models.get("shared", [])) and "m2" in models

    def chat(self, name: str, model: str) -> dict[str, Any]:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
        request = urllib.request.Request(
            self.nodes[name].url + "/v1/chat/completions", data=body.encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        key = self.key_for(name)
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return json.loads(response.read())

