"""SPEC §6: a provider killed under load costs zero client-visible errors on non-streamed
requests. Two upstream processes behind one real node; 16 clients keep asking while one upstream
is SIGKILLed mid-request; every request gets its answer (the in-flight ones fail over)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from tests.kit.fake_openai import Behaviour, FakeOpenAIProcess
from tests.kit.node_proc import NodeProcess
from tests.kit.wait import wait_for

pytestmark = pytest.mark.slow

CLIENTS = 16
REQUESTS_PER_CLIENT = 40


async def test_killing_a_provider_under_load_loses_no_request(tmp_path: Path) -> None:
    with FakeOpenAIProcess() as doomed, FakeOpenAIProcess() as survivor:
        # The doomed upstream holds each answer a little, so the kill lands on requests in flight.
        doomed.script(Behaviour.ok(text="from doomed", delay_s=0.05, times=-1))
        survivor.script(Behaviour.ok(text="from survivor", times=-1))
        config = {
            "mesh": {"enabled": False, "mdns": False},
            "routing": {"strategy": "round_robin",
                        "failover": {"max_retries": 2, "backoff": {"initial_ms": 5, "max_ms": 20}},
                        "timeouts": {"connect_ms": 500, "first_byte_ms": 5000, "total_ms": 20000}},
            "providers": {
                name: {"type": "openai_compatible", "base_url": fake.base_url,
                       "credentials": {"api_key": "sk-test"},
                       "models": [{"name": "m", "openai_model": "m"}]}
                for name, fake in (("doomed", doomed), ("survivor", survivor))
            },
        }
        with NodeProcess(config, tmp_path) as node:
            served: dict[str, int] = {}
            failures: list[str] = []
            done = 0

            async def client(session: aiohttp.ClientSession) -> None:
                nonlocal done
                for _ in range(REQUESTS_PER_CLIENT):
                    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
                    async with session.post(node.base_url + "/chat/completions", json=body) as r:
                        if r.status != 200:
                            failures.append(f"{r.status} {await r.text()}")
                            continue
                        provider = (await r.json())["x_aiproxy"]["provider"]
                        served[provider] = served.get(provider, 0) + 1
                        done += 1

            async def killer() -> None:
                await wait_for(lambda: served.get("doomed", 0) >= 20, "doomed served 20", 60)
                await asyncio.to_thread(doomed.kill)

            async with aiohttp.ClientSession() as session:
                await asyncio.gather(killer(), *(client(session) for _ in range(CLIENTS)))
            assert failures == []
            assert done == CLIENTS * REQUESTS_PER_CLIENT
            assert served["doomed"] >= 20 and served["survivor"] > served["doomed"]
            recovered = [r for r in node.log_records()
                         if r.get("logger") == "meshnode.request" and r.get("attempts", 1) > 1]
            assert recovered, "the kill should have caught requests in flight and failed them over"
