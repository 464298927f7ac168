"""The benchmark's own parts over real loopback sockets: the fake backend, both load generators
and the keep-alive probe client. No timing assertions: speed is what `make bench` reports."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from bench.httpclient import KeepAliveClient
from bench.loadgen import run_load
from bench.procs import ProcessSet
from bench.targets import API_KEY, CHAT_PATH, SLOW_MODEL, Target, chat_body, start_backend

pytestmark = pytest.mark.slow


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessSet]:
    with ProcessSet(tmp_path / "logs") as group:
        yield group


@pytest.fixture
def backend(procs: ProcessSet) -> Target:
    return start_backend(procs, cores=None, chunk_delay_ms=5.0)


def test_backend_speaks_openai_to_the_official_client(backend: Target) -> None:
    client = openai.OpenAI(base_url=backend.base_url + "/v1", api_key=API_KEY, max_retries=0)
    answer = client.chat.completions.create(
        model="bench", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content == "Hello from the bench backend."
    assert answer.usage is not None and answer.usage.total_tokens == 15

    chunks = list(
        client.chat.completions.create(
            model="bench",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the bench backend."
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert [m.id for m in client.models.list()] == ["bench"]


def test_probe_client_reads_plain_and_chunked_answers_on_one_connection(backend: Target) -> None:
    with KeepAliveClient(backend.base_url) as client:
        plain = client.build_post(CHAT_PATH, chat_body())
        slow = client.build_post(CHAT_PATH, chat_body(SLOW_MODEL, stream=True))
        for _ in range(3):
            assert client.request(plain).status == 200
            timing = client.stream(slow)
            assert timing.status == 200
            assert timing.content == "Hello from the bench backend."
            assert timing.events == 7  # role, 3 content, finish, usage, [DONE]
            # The slow model pauses between chunks: the first token comes before the end.
            assert timing.ttft_s < timing.total_s
        missing = client.build_post("/v1/nothing", b"{}")
        assert client.request(missing).status == 404


def test_python_load_generator_counts_requests(procs: ProcessSet, backend: Target) -> None:
    result = run_load(procs, backend.chat_url, chat_body(), 4, 1.0, None, "pyload")
    assert result.tool == "pyload"
    assert result.requests > 0
    assert result.errors == 0
    assert result.rps > 0


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (make bench-setup)")
def test_wrk_load_generator_counts_requests(procs: ProcessSet, backend: Target) -> None:
    result = run_load(procs, backend.chat_url, chat_body(), 4, 1.0, None, "wrk")
    assert result.tool == "wrk"
    assert result.requests > 0
    assert result.errors == 0


def test_backend_refuses_a_non_loopback_host() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.backend", "--host", "0.0.0.0"],
        capture_output=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[3],
    )
    assert out.returncode == 2
