"""The soak's cluster: three fake OpenAI upstreams and three real `meshnode run` processes.

Node A is the seed; B and C join through it. A and B offer the soak models at a price (their own
fake upstream, which the chaos script makes fail and rate-limit); C offers them free, from a
slow-streaming upstream, and is the node the chaos script kills, restarts and freezes. Clients
call A and B only: C's answers reach them forwarded over gRPC, so a kill of C breaks forwarded
streams and costs nothing, and every cent is charged by a node that is never killed (the node
the client called charges, docs/governance.md), which is what lets the ledger be compared with
the clients' log to the cent.
"""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.kit.fake_openai import Behaviour, FakeOpenAIProcess
from tests.kit.node_proc import NodeProcess

CHAT_MODEL = "soak-chat"
EMBED_MODEL = "soak-embed"
MESH_SECRET = "soak-mesh-secret"
# USD per 1k tokens: large enough that every request moves the ledger by cents.
PAID = {"chat_in": 0.5, "chat_out": 1.0, "embed": 0.1}
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def node_config(upstream: str, *, paid: bool) -> dict[str, Any]:
    price_in, price_out, price_embed = (
        (PAID["chat_in"], PAID["chat_out"], PAID["embed"]) if paid else (0.0, 0.0, 0.0)
    )
    return {
        "mesh": {"mdns": False, "secret": MESH_SECRET},
        "providers": {
            "upstream": {
                "type": "openai_compatible",
                "base_url": upstream,
                "credentials": {"api_key": "soak-key"},
                "models": [
                    {"name": CHAT_MODEL, "openai_model": CHAT_MODEL, "kind": "chat",
                     "cost_per_1k_input": price_in, "cost_per_1k_output": price_out},
                    {"name": EMBED_MODEL, "openai_model": EMBED_MODEL, "kind": "embedding",
                     "cost_per_1k_tokens": price_embed},
                ],
            }
        },
        # Round robin spreads every model over the local upstream and both peers.
        "routing": {"strategy": "round_robin", "failover": {"max_retries": 3}},
        "cache": {"enabled": True},
        "budget": {"enabled": True, "daily_limit": 1_000_000.0, "scope": "mesh"},
        "logging": {"level": "warning"},
    }


# The soak's nodes: clients enter through A and B; C is the one killed, frozen and restarted.
NODES = ("a", "b", "c")
ENTRY_NODES = ("a", "b")


@dataclass
class SoakCluster:
    workdir: Path
    fakes: dict[str, FakeOpenAIProcess]
    nodes: dict[str, NodeProcess]
    c_lives: int = 1

    @classmethod
    def start(cls, workdir: Path) -> SoakCluster:
        workdir.mkdir(parents=True, exist_ok=True)
        cluster = cls(workdir, {}, {})
        try:
            for name in NODES:
                cluster.fakes[name] = FakeOpenAIProcess(models=(CHAT_MODEL, EMBED_MODEL))
                cluster.fakes[name].start()
            # C's upstream streams slowly, so a kill of C finds streams in flight.
            cluster.fakes["c"].script(Behaviour.ok(chunk_delay_s=0.05, times=-1))
            cluster.nodes["a"] = cluster._node("a")
            seed = cluster.nodes["a"].announced["MESHNODE_GRPC"]
            cluster.nodes["b"] = cluster._node("b", seeds=[seed])
            cluster.nodes["c"] = cluster._node("c", seeds=[seed])
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _node(self, name: str, *, seeds: list[str] | None = None, life: int = 1) -> NodeProcess:
        node = NodeProcess(
            node_config(self.fakes[name].base_url, paid=name != "c"),
            self.workdir,
            name=name if life == 1 else f"{name}-life{life}",
            grpc_listen="127.0.0.1:0",
            seeds=seeds or [],
            node_id=name,
            # every life of a node keeps its data dir: its ledger and identity survive a kill
            extra_args=["--data-dir", str(self.workdir / f"{name}-data")],
            startup_timeout=120.0,
        )
        node.start()
        for _ in range(100):  # the gRPC line follows the HTTP one
            if "MESHNODE_GRPC" in node.refresh_announcements():
                break
            time.sleep(0.05)
        return node

    def seed(self) -> str:
        return self.nodes["a"].announced["MESHNODE_GRPC"]

    def restart_c(self) -> None:
        """Start C again (after a kill): same id, same data dir, a new process."""
        self.c_lives += 1
        self.nodes["c"] = self._node("c", seeds=[self.seed()], life=self.c_lives)

    def url(self, name: str) -> str:
        return self.nodes[name].url

    def get_json(self, name: str, path: str, timeout: float = 10.0) -> Any:
        with _OPENER.open(self.url(name) + path, timeout=timeout) as resp:  # noqa: S310
            return json.loads(resp.read())

    def stop(self) -> dict[str, int | None]:
        codes: dict[str, int | None] = {}
        for name, node in self.nodes.items():
            codes[name] = node.stop()
        for fake in self.fakes.values():
            fake.stop()
        return codes
