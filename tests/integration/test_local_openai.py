"""The local worker through a real node process and the official `openai` client."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.kit.node_proc import NodeProcess

pytestmark = pytest.mark.slow

CONFIG = {
    "mesh": {"enabled": False},
    "providers": {
        "local": {
            "device": "cpu",
            "max_batch": 16,
            "models": [
                {"name": "tiny-gpt2", "builtin": "tiny-gpt2", "kind": "chat"},
                {"name": "minilm", "builtin": "minilm", "kind": "embedding"},
            ],
        }
    },
}


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health/ready", timeout=5) as r:  # noqa: S310
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _wait_ready(node: NodeProcess, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not _ready(node.url):
        assert time.monotonic() < deadline, node.log_tail()
        time.sleep(0.1)


def _worker_pids(node_pid: int) -> list[int]:
    path = Path(f"/proc/{node_pid}/task/{node_pid}/children")
    return [int(p) for p in path.read_text().split()]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    with NodeProcess(CONFIG, tmp_path_factory.mktemp("local-node"), startup_timeout=120) as n:
        _wait_ready(n)
        yield n


async def test_sixteen_clients_stream_and_not_with_exact_max_tokens(node: NodeProcess) -> None:
    client = openai.AsyncOpenAI(base_url=node.base_url, api_key="unused", max_retries=0)

    async def one(i: int) -> tuple[int, int, str | None]:
        wanted = 2 + i % 6
        messages = [{"role": "user", "content": f"hello {i}"}]
        if i % 2:
            answer = await client.chat.completions.create(
                model="tiny-gpt2", messages=messages, max_tokens=wanted)  # type: ignore[arg-type]
            assert answer.usage is not None
            return answer.usage.completion_tokens, wanted, answer.choices[0].finish_reason
        stream = await client.chat.completions.create(
            model="tiny-gpt2", messages=messages, max_tokens=wanted,  # type: ignore[arg-type]
            stream=True, stream_options={"include_usage": True})
        finish = None
        used = 0
        async for chunk in stream:
            for choice in chunk.choices:
                finish = choice.finish_reason or finish
            if chunk.usage is not None:
                used = chunk.usage.completion_tokens
        return used, wanted, finish

    try:
        results = await asyncio.gather(*(one(i) for i in range(16)))
    finally:
        await client.close()
    assert all(got == wanted and finish == "length" for got, wanted, finish in results)


async def test_bad_sampling_value_is_a_400(node: NodeProcess) -> None:
    client = openai.AsyncOpenAI(base_url=node.base_url, api_key="unused", max_retries=0)
    try:
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(
                model="tiny-gpt2", messages=[{"role": "user", "content": "x"}],
                max_tokens=2, temperature=5)
    finally:
        await client.close()


async def test_embeddings_through_the_node(node: NodeProcess) -> None:
    client = openai.AsyncOpenAI(base_url=node.base_url, api_key="unused", max_retries=0)
    try:
        answer = await client.embeddings.create(model="minilm", input=[
            "a cat sits on the mat", "a kitten rests on the rug",
            "quarterly tax filing deadlines"])
    finally:
        await client.close()
    v = [d.embedding for d in answer.data]

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
            sum(x * x for x in a) * sum(y * y for y in b))

    assert len(v[0]) == 384
    assert cos(v[0], v[1]) > cos(v[0], v[2])


async def test_killed_worker_gives_a_clean_error_and_comes_back(node: NodeProcess) -> None:
    client = openai.AsyncOpenAI(base_url=node.base_url, api_key="unused", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="tiny-gpt2", messages=[{"role": "user", "content": "go"}],
            max_tokens=400, stream=True)
        first = await stream.__anext__()
        assert first.choices
        [worker_pid] = _worker_pids(node.pid)
        os.kill(worker_pid, signal.SIGKILL)
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
        await asyncio.to_thread(_wait_ready, node)
        answer = await client.chat.completions.create(
            model="tiny-gpt2", messages=[{"role": "user", "content": "again"}], max_tokens=3)
        assert answer.usage is not None and answer.usage.completion_tokens == 3
        assert _worker_pids(node.pid) != [worker_pid]
    finally:
        await client.close()
