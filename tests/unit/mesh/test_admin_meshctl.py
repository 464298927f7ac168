"""/admin/mesh served by a real MeshService pair, read by meshctl over real HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from meshnode.cli import meshctl
from tests.unit.rpc.test_forwarding import Pair


@pytest.fixture
async def admin_url() -> AsyncIterator[tuple[str, Pair]]:
    pair = Pair()
    await pair.start()
    assert pair.a is not None
    app = web.Application()
    app.router.add_get("/admin/mesh", pair.a.admin_handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", pair
    await runner.cleanup()
    await pair.stop()


async def test_peers_and_topology_json(
    admin_url: tuple[str, Pair], capsys: pytest.CaptureFixture[str]
) -> None:
    url, pair = admin_url
    rc = await asyncio.to_thread(meshctl.main, ["--node", url, "peers", "--json"])
    assert rc == 0
    peers = json.loads(capsys.readouterr().out)
    assert peers["node"] == "node-a"
    assert [p["id"] for p in peers["peers"]] == ["node-b"]
    peer = peers["peers"][0]
    assert peer["status"] == "alive" and peer["incarnation"] == 0
    assert peer["addresses"]["grpc"] == pair.b.advertise_address
    assert peer["models"][0]["cost_per_1k_input"] == 0.5

    rc = await asyncio.to_thread(meshctl.main, ["--node", url, "topology", "--json"])
    assert rc == 0
    topo = json.loads(capsys.readouterr().out)
    assert [n["id"] for n in topo["nodes"]] == ["node-a", "node-b"]
    assert topo["models"] == {"m": ["node-b"]}


async def test_tables_are_readable(
    admin_url: tuple[str, Pair], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = admin_url
    assert await asyncio.to_thread(meshctl.main, ["--node", url, "peers"]) == 0
    out = capsys.readouterr().out
    assert "node-b" in out and "alive" in out
    assert await asyncio.to_thread(meshctl.main, ["--node", url, "topology"]) == 0
    out = capsys.readouterr().out
    assert "node-a" in out and "(this node)" in out and "m  [openai_compatible]" in out


def test_unreachable_node_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    # 3: node unreachable (meshctl_http.ExitCode, issue 8)
    assert meshctl.main(["--node", "http://127.0.0.1:9", "peers"]) == 3
    assert "meshctl:" in capsys.readouterr().err
