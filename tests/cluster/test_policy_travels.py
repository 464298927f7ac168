"""A routing policy travels with a forwarded request (issue 10): node A tags `pii` requests as
allowed only on `[local, mesh]`; node B offers the model only through a cloud provider. A may
forward to B (the mesh is allowed), but B must honour A's constraint: the cloud never sees the
request and the client gets the policy's 503. Without the tag, the same request is served by B's
cloud through A."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.kit.fake_openai import FakeOpenAI
from tests.kit.node_proc import NodeProcess
from tests.kit.wait import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MESH = {"mdns": False, "probe_interval_ms": 250, "probe_timeout_ms": 250,
        "gossip_interval_ms": 200}
BODY = {"model": "cloud-only", "messages": [{"role": "user", "content": "my card is 4111..."}]}


async def test_a_pii_request_forwarded_to_a_peer_never_reaches_the_peers_cloud(
    tmp_path: Path,
) -> None:
    async with FakeOpenAI() as cloud:
        a_config: dict[str, Any] = {
            "mesh": MESH,
            "providers": {},
            "routing": {"policies": [{"name": "pii-stays-home",
                                      "match": {"header": {"x-aiproxy-tags": "pii"}},
                                      "allow": ["local", "mesh"]}]},
        }
        b_config: dict[str, Any] = {
            "mesh": MESH,
            "providers": {"cloud": {"type": "openai_compatible", "base_url": cloud.base_url,
                                    "credentials": {"api_key": "sk-test"},
                                    "models": [{"name": "cloud-only", "openai_model": "gpt"}]}},
        }
        a = await NodeProcess(a_config, tmp_path, name="a", grpc_listen="127.0.0.1:0",
                              node_id="a").astart()
        try:
            seed = a.refresh_announcements()["MESHNODE_GRPC"]
            b = await NodeProcess(b_config, tmp_path, name="b", grpc_listen="127.0.0.1:0",
                                  node_id="b", seeds=[seed]).astart()
            try:
                async with aiohttp.ClientSession() as http:
                    async def a_offers() -> bool:
                        async with http.get(a.base_url + "/models") as r:
                            return "cloud-only" in {m["id"] for m in (await r.json())["data"]}

                    await wait_for(a_offers, "A learns B's model by gossip", 60)
                    async with http.post(a.base_url + "/chat/completions", json=BODY,
                                         headers={"x-aiproxy-tags": "pii"}) as r:
                        assert r.status == 503, await r.text()
                        error = (await r.json())["error"]
                    assert "pii-stays-home" in error["message"]
                    assert cloud.request_count == 0
                    async with http.post(a.base_url + "/chat/completions", json=BODY) as r:
                        assert r.status == 200, await r.text()
                        served = (await r.json())["x_aiproxy"]
                    assert served["node"] == "b" and cloud.request_count == 1
            finally:
                await b.astop()
        finally:
            await a.astop()
