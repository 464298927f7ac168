"""The official `openai` client (sync and async) against a real `meshnode run` process in front of
the fake OpenAI upstream (its own process): every endpoint, x_aiproxy and headers, and each
error status. Bad requests must cause zero upstream calls."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from tests.kit.fake_openai import Behaviour, FakeOpenAIProcess
from tests.kit.node_proc import NodeProcess

pytestmark = pytest.mark.slow

MSG = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAIProcess]:
    with FakeOpenAIProcess(require_key="sk-upstream-key") as fake:
        yield fake


@pytest.fixture(scope="module")
def node(upstream: FakeOpenAIProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    config = {
        "mesh": {"enabled": False, "mdns": False},
        "routing": {
            "failover": {"max_retries": 1, "backoff": {"initial_ms": 5, "max_ms": 20},
                         "cooldown": {"failures": 1000}},
            "timeouts": {"connect_ms": 1000, "first_byte_ms": 1000, "total_ms": 20000},
            "policies": [{"name": "nowhere", "match": {"header": {"x-aiproxy-tags": "nowhere"}},
                          "allow": ["mesh"]}],
        },
        "providers": {
            "up": {
                "type": "openai_compatible",
                "base_url": upstream.base_url,
                "credentials": {"api_key": "sk-upstream-key"},
                "models": [
                    {"name": "gpt-4o", "openai_model": "gpt-4o",
                     "cost_per_1k_input": 0.0025, "cost_per_1k_output": 0.01},
                    {"name": "babbage", "openai_model": "gpt-3.5-turbo-instruct",
                     "kind": "completion", "cost_per_1k_tokens": 0.001},
                    {"name": "embed", "openai_model": "text-embedding-3-small",
                     "kind": "embedding", "cost_per_1k_tokens": 0.0001},
                ],
            }
        },
    }
    with NodeProcess(config, tmp_path_factory.mktemp("node"), node_id="node-int") as proc:
        yield proc


@pytest.fixture
def fake(upstream: FakeOpenAIProcess) -> FakeOpenAIProcess:
    upstream.reset()
    return upstream


@pytest.fixture
def client(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.base_url, api_key="sk-client", max_retries=0, timeout=30)


@pytest.fixture
def aclient(node: NodeProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=node.base_url, api_key="sk-client", max_retries=0,
                              timeout=30)


def http(method: str, url: str, body: Any = None) -> tuple[int, dict[str, str], bytes]:
    """A plain HTTP call (urllib), for what the openai client does not expose."""
    data = orjson.dumps(body) if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def x_aiproxy(obj: Any) -> dict[str, Any]:
    extra = obj.model_extra or {}
    block: dict[str, Any] = extra["x_aiproxy"]
    return block


# --------------------------------------------------------------------------- happy paths
def test_chat_sync_with_headers_and_x_aiproxy(client: openai.OpenAI, fake: FakeOpenAIProcess) -> None:
    fake.script(Behaviour.ok(text="sync answer"))
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MSG, extra_headers={"x-request-id": "it-chat-1"}
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "sync answer"
    x = x_aiproxy(completion)
    assert x["provider"] == "up" and x["node"] == "node-int" and x["model"] == "gpt-4o"
    assert [a["outcome"] for a in x["attempts"]] == ["ok"]
    assert x["cost"] == pytest.approx(
        (completion.usage.prompt_tokens * 0.0025 + completion.usage.completion_tokens * 0.01) / 1000
    )
    assert raw.headers["x-request-id"] == "it-chat-1"
    assert raw.headers["x-aiproxy-provider"] == "up"
    assert raw.headers["x-aiproxy-node"] == "node-int"
    assert float(raw.headers["x-aiproxy-cost"]) == pytest.approx(x["cost"])
    sent = fake.requests()
    assert len(sent) == 1
    # our key upstream, never the client's
    assert sent[0]["headers"]["authorization"] == "Bearer sk-upstream-key"


async def test_chat_async(aclient: openai.AsyncOpenAI, fake: FakeOpenAIProcess) -> None:
    fake.script(Behaviour.ok(text="async answer"))
    completion = await aclient.chat.completions.create(model="gpt-4o", messages=MSG)
    assert completion.choices[0].message.content == "async answer"
    assert x_aiproxy(completion)["provider"] == "up"


def test_stream_sync_without_usage(client: openai.OpenAI, fake: FakeOpenAIProcess) -> None:
    fake.script(Behaviour.ok(text="one two three"))
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=MSG, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three"
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)  # the usage-only chunk is not forwarded
    last = chunks[-1]
    assert last.choices[0].finish_reason == "stop"
    assert x_aiproxy(last)["provider"] == "up"
    assert sum(1 for c in chunks if "x_aiproxy" in (c.model_extra or {})) == 1


async def test_stream_async_with_usage(aclient: openai.AsyncOpenAI, fake: FakeOpenAIProcess) -> None:
    fake.script(Behaviour.ok(text="alpha beta"))
    stream = await aclient.chat.completions.create(
        model="gpt-4o", messages=MSG, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens > 0
    x = x_aiproxy(last)
    assert x["cost"] > 0 and x["provider"] == "up"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "alpha beta"


def test_completions(client: openai.OpenAI, fake: FakeOpenAIProcess) -> None:
    fake.script(Behaviour.ok(text="completed text"))
    result = client.completions.create(model="babbage", prompt="Say", max_tokens=5)
    assert result.choices[0].text == "completed text"
    assert x_aiproxy(result)["model"] == "babbage"
    assert fake.requests()[0]["json"]["model"] == "gpt-3.5-turbo-instruct"


async def test_embeddings_sync_and_async(client: openai.OpenAI, aclient: openai.AsyncOpenAI,
                                         fake: FakeOpenAIProcess) -> None:
    result = client.embeddings.create(model="embed", input="hello")
    assert len(result.data) == 1 and len(result.data[0].embedding) > 0
    result = await aclient.embeddings.create(model="embed", input=["a", "b", "c"])
    assert [d.index for d in result.data] == [0, 1, 2]


def test_models(client: openai.OpenAI) -> None:
    ids = sorted(m.id for m in client.models.list())
    assert ids == ["babbage", "embed", "gpt-4o"]
    assert client.models.retrieve("gpt-4o").id == "gpt-4o"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": MSG, "max_tokens": -1}, "max_tokens"),
        ({"messages": MSG, "max_tokens": 5_000_000}, "max_tokens"),
        ({"messages": MSG, "n": 1000}, "n"),
        ({"messages": MSG, "temperature": 7}, "temperature"),
    ],
)
def test_400_with_param_and_no_upstream_call(client: openai.OpenAI, fake: FakeOpenAIProcess,
                                             kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gpt-4o", **kwargs)
    assert info.value.status_code == 400
    assert info.value.param == param
    assert info.value.type == "invalid_request_error"
    assert fake.requests() == []


async def test_400_async_missing_messages(aclient: openai.AsyncOpenAI, fake: FakeOpenAIProcess) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await aclient.chat.completions.create(model="gpt-4o", messages=None)  # type: ignore[arg-type]
    assert info.value.param == "messages"
    assert fake.requests() == []


def test_wrong_types_are_400(node: NodeProcess, fake: FakeOpenAIProcess) -> None:
    for body in ({"model": "gpt-4o", "messages": "hi"},
                 {"model": 5, "messages": MSG},
                 {"model": "gpt-4o", "messages": MSG, "stream": "yes"}):
        status, _, raw = http("POST", node.base_url + "/chat/completions", body)
        assert status == 400
        assert orjson.loads(raw)["error"]["param"]
    assert fake.requests() == []


def test_404_unknown_model(client: openai.OpenAI, fake: FakeOpenAIProcess) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=MSG)
    assert info.value.code == "model_not_found"
    assert fake.requests() == []


async def test_413_ten_megabyte_body(aclient: openai.AsyncOpenAI, fake: FakeOpenAIProcess) -> None:
    huge = "x" * (10 * 1024 * 1024)
    with pytest.raises(openai.APIStatusError) as info:
        await aclient.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": huge}]
        )
    assert info.value.status_code == 413
    assert info.value.code == "request_too_large"
    assert fake.requests() == []


def test_502_when_upstream_keeps_failing(client: openai.OpenAI, fake: FakeOpenAIProcess) -> None:
    fake.script(Behaviour.error(500, times=2))
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="gpt-4o", messages=MSG)
    assert info.value.status_code == 502
    assert info.value.type == "upstream_error"
    assert len(fake.requests()) == 2  # 1 + max_retries


def test_503_with_retry_after(client: openai.OpenAI, fake: FakeOpenAIProcess) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="gpt-4o", messages=MSG,
                                       extra_headers={"x-aiproxy-tags": "nowhere"})
    assert info.value.status_code == 503
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert info.value.type == "service_unavailable"
    assert fake.requests() == []


async def test_504_when_upstream_hangs(aclient: openai.AsyncOpenAI, fake: FakeOpenAIProcess) -> None:
    fake.script(Behaviour.hang(times=2))
    with pytest.raises(openai.APIStatusError) as info:
        await aclient.chat.completions.create(model="gpt-4o", messages=MSG)
    assert info.value.status_code == 504
    assert info.value.type == "timeout"


def test_metrics_and_logs_after_traffic(node: NodeProcess, client: openai.OpenAI,
                                        fake: FakeOpenAIProcess) -> None:
    client.chat.completions.create(model="gpt-4o", messages=MSG,
                                   extra_headers={"x-request-id": "it-log-1"})
    text = http("GET", node.url + "/metrics")[2].decode()
    assert 'meshnode_requests_total{kind="chat",model="gpt-4o",provider="up",status="200"}' in text
    assert "sk-upstream-key" not in text and "sk-client" not in text
    records = [r for r in node.log_records() if r.get("request_id") == "it-log-1"]
    assert len(records) == 1
    line = records[0]
    assert line["status"] == 200 and line["provider"] == "up" and line["model"] == "gpt-4o"
    assert line["attempts"] == 1 and line["completion_tokens"] > 0
    assert "sk-upstream-key" not in node.logs()


def test_ready_and_admin(node: NodeProcess) -> None:
    assert http("GET", node.url + "/health/ready")[0] == 200
    # start-up says what guards the node, not only what it serves
    assert "auth off (any client may call; see auth.enabled); budget unlimited; cache on; " \
        "mesh off" in node.logs()
    route = orjson.loads(http("GET", node.url + "/admin/route?model=gpt-4o")[2])
    assert route["winner"]["provider"] == "up"
    stats = orjson.loads(http("GET", node.url + "/admin/stats")[2])
    assert stats["node"] == "node-int"
    row = next(r for r in stats["candidates"] if r["provider"] == "up" and r["model"] == "gpt-4o")
    assert row["requests"] >= 1 and row["tokens"]["total"] > 0
    assert stats["totals"]["cost"] >= row["cost"] > 0
    assert stats["budget"]["enabled"] is True
    assert {"spent_today", "spent_this_month"} <= set(stats["budget"])


def test_sigterm_exits_zero(upstream: FakeOpenAIProcess, tmp_path: Path) -> None:
    config = {
        "mesh": {"enabled": False, "mdns": False},
        "providers": {"up": {"type": "openai_compatible", "base_url": upstream.base_url,
                             "credentials": {"api_key": "sk-upstream-key"},
                             "models": [{"name": "gpt-4o", "openai_model": "gpt-4o"}]}},
    }
    proc = NodeProcess(config, tmp_path).start()
    assert "MESHNODE_HTTP" in proc.announced
    assert proc.stop() == 0
    assert "stopped" in proc.logs()
