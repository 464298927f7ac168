"""Failover through a real node process between two fake OpenAI upstreams (two providers).

Provider `a` is cheaper, so `cost_optimized` tries it first; `b` is the fallback. Each case
scripts `a` to fail one way and asserts which provider served, the attempts the node reports,
how many requests each upstream saw, and that the client saw exactly one outcome.

Every case uses its own model name: stats and cooldowns are kept per provider and model, so one
case's failures never reorder another's candidates.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from email.utils import formatdate
from typing import Any

import openai
import pytest

from tests.kit.fake_openai import Behaviour, FakeOpenAIProcess
from tests.kit.node_proc import NodeProcess

pytestmark = pytest.mark.slow

MSG = [{"role": "user", "content": "hi"}]
CASES = [
    "c-500", "c-hang", "c-reset", "c-notjson", "c-429-seconds", "c-429-date", "c-429-absurd",
    "c-429-garbage", "c-429-cooldown", "c-400", "c-stream-reset-before", "c-stream-reset-after", "c-stream-500",
]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeOpenAIProcess, FakeOpenAIProcess]]:
    with FakeOpenAIProcess() as a, FakeOpenAIProcess() as b:
        yield a, b


@pytest.fixture(scope="module")
def node(fakes: tuple[FakeOpenAIProcess, FakeOpenAIProcess],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    a, b = fakes

    def models(cost: float, names: list[str]) -> list[dict[str, Any]]:
        return [{"name": n, "openai_model": n, "cost_per_1k_tokens": cost} for n in names]

    config = {
        "mesh": {"enabled": False, "mdns": False},
        "routing": {
            "strategy": "cost_optimized",
            "failover": {"max_retries": 2, "backoff": {"initial_ms": 5, "max_ms": 20}},
            "timeouts": {"connect_ms": 1000, "first_byte_ms": 1000, "total_ms": 20000},
        },
        "providers": {
            "a": {"type": "openai_compatible", "base_url": a.base_url,
                  "credentials": {"api_key": "sk-a"}, "models": models(0.001, CASES)},
            "b": {"type": "openai_compatible", "base_url": b.base_url,
                  "credentials": {"api_key": "sk-b"}, "models": models(0.01, [*CASES, "c-refuse"])},
            "dead": {"type": "openai_compatible",
                     "base_url": f"http://127.0.0.1:{_closed_port()}/v1",
                     "credentials": {"api_key": "sk-dead"}, "models": models(0.0001, ["c-refuse"])},
        },
    }
    with NodeProcess(config, tmp_path_factory.mktemp("failover"), node_id="node-fo") as proc:
        yield proc


@pytest.fixture
def upstreams(fakes: tuple[FakeOpenAIProcess, FakeOpenAIProcess]) -> tuple[FakeOpenAIProcess, FakeOpenAIProcess]:
    for fake in fakes:
        fake.reset()
    return fakes


@pytest.fixture
def client(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.base_url, api_key="sk-client", max_retries=0, timeout=60)


def calls(fake: FakeOpenAIProcess, model: str) -> int:
    return sum(1 for r in fake.requests() if (r["json"] or {}).get("model") == model)


def outcomes(result: Any) -> list[tuple[str, str]]:
    block = (result.model_extra or {})["x_aiproxy"]
    return [(a["provider"], a["outcome"]) for a in block["attempts"]]


def served_by(result: Any) -> str:
    provider: str = (result.model_extra or {})["x_aiproxy"]["provider"]
    return provider


@pytest.mark.parametrize(
    ("model", "behaviour", "code"),
    [
        ("c-500", Behaviour.error(500), "upstream_error"),
        ("c-hang", Behaviour.hang(), "upstream_timeout"),
        ("c-reset", Behaviour.reset_before(), "upstream_error"),
        ("c-notjson", Behaviour.not_json(), "upstream_error"),
        ("c-429-seconds", Behaviour.rate_limited("2"), "upstream_rate_limited"),
        ("c-429-date", Behaviour.rate_limited(formatdate(usegmt=True)), "upstream_rate_limited"),
        ("c-429-absurd", Behaviour.rate_limited("999999999"), "upstream_rate_limited"),
        ("c-429-garbage", Behaviour.rate_limited("soon-ish"), "upstream_rate_limited"),
    ],
)
def test_non_stream_fails_over_to_b(client: openai.OpenAI, upstreams: tuple[FakeOpenAIProcess, FakeOpenAIProcess],
                                    model: str, behaviour: Behaviour, code: str) -> None:
    a, b = upstreams
    a.script(Behaviour(**{**behaviour.to_json(), "model": model}))
    b.script(Behaviour.ok(text="from b", model=model))
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MSG)
    result = raw.parse()
    assert result.choices[0].message.content == "from b"
    assert served_by(result) == "b"
    assert raw.headers["x-aiproxy-provider"] == "b"
    assert outcomes(result) == [("a", code), ("b", "ok")]
    assert calls(a, model) == 1 and calls(b, model) == 1


def test_rate_limited_provider_is_skipped_while_its_retry_after_runs(
    client: openai.OpenAI, upstreams: tuple[FakeOpenAIProcess, FakeOpenAIProcess]
) -> None:
    a, b = upstreams
    model = "c-429-cooldown"
    a.script(Behaviour(kind="status", status=429, headers={"Retry-After": "30"}, model=model))
    first = client.chat.completions.create(model=model, messages=MSG)
    assert outcomes(first)[0][0] == "a" and served_by(first) == "b"
    # a said "come back in 30 s": the next request goes to b first.
    second = client.chat.completions.create(model=model, messages=MSG)
    assert outcomes(second) == [("b", "ok")]
    assert calls(a, model) == 1


def test_connection_refused_fails_over(client: openai.OpenAI,
                                       upstreams: tuple[FakeOpenAIProcess, FakeOpenAIProcess]) -> None:
    _, b = upstreams
    result = client.chat.completions.create(model="c-refuse", messages=MSG)
    assert served_by(result) == "b"
    assert outcomes(result)[0][0] == "dead"
    assert outcomes(result)[-1] == ("b", "ok")
    assert calls(b, "c-refuse") == 1


def test_upstream_400_is_not_failed_over(client: openai.OpenAI,
                                         upstreams: tuple[FakeOpenAIProcess, FakeOpenAIProcess]) -> None:
    a, b = upstreams
    a.script(Behaviour.error(400, model="c-400"))
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="c-400", messages=MSG)
    assert calls(a, "c-400") == 1 and calls(b, "c-400") == 0


def test_stream_reset_before_first_chunk_fails_over(
    client: openai.OpenAI, upstreams: tuple[FakeOpenAIProcess, FakeOpenAIProcess]
) -> None:
    a, b = upstreams
    model = "c-stream-reset-before"
    a.script(Behaviour.reset_before(model=model))
    b.script(Behaviour.ok(text="streamed from b", model=model))
    chunks = list(client.chat.completions.create(model=model, messages=MSG, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "streamed from b"  # once, not duplicated
    assert served_by(chunks[-1]) == "b"
    assert outcomes(chunks[-1])[-1] == ("b", "ok")
    assert calls(a, model) == 1 and calls(b, model) == 1


def test_stream_500_fails_over(client: openai.OpenAI,
                               upstreams: tuple[FakeOpenAIProcess, FakeOpenAIProcess]) -> None:
    a, b = upstreams
    model = "c-stream-500"
    a.script(Behaviour.error(500, model=model))
    chunks = list(client.chat.completions.create(model=model, messages=MSG, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None
    assert outcomes(chunks[-1]) == [("a", "upstream_error"), ("b", "ok")]


def test_stream_reset_after_first_chunk_is_an_error_event_not_a_retry(
    client: openai.OpenAI, upstreams: tuple[FakeOpenAIProcess, FakeOpenAIProcess]
) -> None:
    a, b = upstreams
    model = "c-stream-reset-after"
    a.script(Behaviour.reset_after_first(model=model))
    seen: list[Any] = []
    with pytest.raises(openai.APIError) as info:
        for chunk in client.chat.completions.create(model=model, messages=MSG, stream=True):
            seen.append(chunk)
    # the client got the first chunk, then exactly one error, and nothing from b
    assert len(seen) == 1
    assert "stream" in str(info.value).lower() or "upstream" in str(info.value).lower()
    assert calls(a, model) == 1 and calls(b, model) == 0
