"""Five real nodes at default mesh timing, one of them CPU-starved for ~45 s: busy processes
pinned to the same core as every thread of the starved node (`os.sched_setaffinity`, what
`taskset -a` does).
No node may ever see another dead (SPEC §6: no false deaths while one node's CPU is saturated);
suspicions that are refuted in time are allowed. Every node's `/admin/mesh` is polled throughout.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.kit.node_proc import NodeProcess
from tests.kit.wait import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

NAMES = ("a", "b", "c", "d", "e")
STARVED = "e"
RUN_S = 45.0
BUSY = 3  # busy processes on the starved node's core: it gets about a quarter of it
CONFIG = {"mesh": {"mdns": False}, "providers": {}}  # default SWIM timing


def _can_pin() -> bool:
    return hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 1


async def _views(http: aiohttp.ClientSession, nodes: dict[str, NodeProcess]) -> dict[str, dict]:
    async def one(name: str) -> dict[str, str]:
        async with http.get(nodes[name].url + "/admin/mesh") as resp:
            body = orjson.loads(await resp.read())
        return {m["id"]: m["status"] for m in body["members"]}

    results = await asyncio.gather(*(one(n) for n in nodes))
    return dict(zip(nodes, results, strict=True))


@pytest.mark.skipif(not _can_pin(), reason="needs sched_setaffinity (Linux) to pin processes")
async def test_starved_node_causes_no_false_deaths(tmp_path: Path) -> None:
    nodes: dict[str, NodeProcess] = {}
    busy: list[subprocess.Popen[bytes]] = []
    try:
        seed = NodeProcess(CONFIG, tmp_path, name="a", grpc_listen="127.0.0.1:0", node_id="a")
        await seed.astart()
        nodes["a"] = seed
        await wait_for(lambda: "MESHNODE_GRPC" in seed.refresh_announcements(),
                       "the seed announces its gRPC address", 60)
        started = [NodeProcess(CONFIG, tmp_path, name=n, grpc_listen="127.0.0.1:0", node_id=n,
                               seeds=[seed.announced["MESHNODE_GRPC"]]) for n in NAMES[1:]]
        await asyncio.gather(*(p.astart() for p in started))
        nodes.update({p.name: p for p in started})
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            async def formed() -> dict[str, dict]:
                views = await _views(http, nodes)
                return views if all(set(v) == set(NAMES) and set(v.values()) == {"alive"}
                                    for v in views.values()) else {}

            await wait_for(formed, "the mesh forms, everyone alive for everyone", 60)
            # Starve e: all its threads share one core with processes that never sleep.
            core = min(os.sched_getaffinity(0))
            busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                    for _ in range(BUSY)]
            for proc in busy:
                os.sched_setaffinity(proc.pid, {core})
            pin_all_threads(nodes[STARVED].pid, core)
            deaths: list[tuple[str, str, str]] = []
            suspicions = 0
            end = time.monotonic() + RUN_S
            while time.monotonic() < end:
                views = await _views(http, nodes)
                for observer, view in views.items():
                    for subject, status in view.items():
                        if status == "dead":
                            deaths.append((observer, subject, status))
                        suspicions += status == "suspect"
                await asyncio.sleep(0.25)
            assert deaths == [], deaths
            # Still one mesh, everyone alive for everyone.
            views = await _views(http, nodes)
            assert all(set(v) == set(NAMES) for v in views.values()), views
            print(f"suspect observations while starved: {suspicions}")
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
        await asyncio.gather(*(n.astop(timeout=15) for n in nodes.values()))


def pin_all_threads(pid: int, core: int) -> None:
    """`taskset -a -p -c core pid`: every thread, gRPC's included, not only the main one."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {core})
        except ProcessLookupError:
            pass  # a thread that just ended

