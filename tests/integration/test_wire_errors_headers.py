"""Upstream errors keep their meaning and the answers carry the headers clients read, with the
official `openai` client against a real node process in front of the fake OpenAI upstream:
an upstream `context_length_exceeded` reaches the client with its code (chat and Responses);
a 429 with Retry-After from the only candidate is not re-sent before it; every answer has
`openai-processing-ms`; the client's `x-request-id` reaches the upstream; big whole answers are
gzipped for clients that accept it, small ones and streams are not."""

from __future__ import annotations

import gzip
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.kit.fake_openai import Behaviour, FakeOpenAIProcess
from tests.kit.node_proc import NodeProcess
from tests.kit.openai_schemas import validate

pytestmark = pytest.mark.slow

MSG = [{"role": "user", "content": "hello"}]
TOO_LONG = {"error": {
    "message": "This model's maximum context length is 8192 tokens. However, your messages "
               "resulted in 9001 tokens. Please reduce the length of the messages.",
    "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAIProcess]:
    with FakeOpenAIProcess(models=["gpt-fake"]) as fake:
        yield fake


@pytest.fixture(scope="module")
def node(upstream: FakeOpenAIProcess, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[NodeProcess]:
    config = {
        "mesh": {"enabled": False, "mdns": False},
        "routing": {"failover": {"max_retries": 3, "backoff": {"initial_ms": 5, "max_ms": 20}}},
        "providers": {"local": {"enabled": False}, "up": {
            "type": "openai_compatible", "base_url": upstream.base_url,
            "credentials": {"api_key": "sk-up"},
            "models": [{"name": "gpt", "openai_model": "gpt-fake"},
                       {"name": "solo", "openai_model": "gpt-fake"},
                       {"name": "embed", "openai_model": "text-embedding-3-small",
                        "kind": "embedding"}]}},
    }
    with NodeProcess(config, tmp_path_factory.mktemp("wire"), node_id="wire-node") as proc:
        yield proc


@pytest.fixture
def fake(upstream: FakeOpenAIProcess) -> FakeOpenAIProcess:
    upstream.reset()
    return upstream


def client(node: NodeProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=node.base_url, api_key="sk-x", max_retries=0, timeout=30)


def raw_post(node: NodeProcess, path: str, body: dict[str, Any], headers: dict[str, str]
             ) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(node.base_url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", **headers},
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return response.status, {k.lower(): v for k, v in response.headers.items()}, \
                response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


# --------------------------------------------------------------------------- errors
def test_upstream_context_length_exceeded_keeps_its_code(
    node: NodeProcess, fake: FakeOpenAIProcess
) -> None:
    fake.script(Behaviour.error(400, body=TOO_LONG, times=3))
    with pytest.raises(openai.BadRequestError) as caught:
        client(node).chat.completions.create(model="gpt", messages=MSG)  # type: ignore[arg-type]
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.type == "invalid_request_error"
    assert caught.value.param == "messages"
    body = caught.value.response.json()
    validate("ErrorResponse", body)
    assert body["x_aiproxy"]["error_code"] == "upstream_bad_request"  # ours, for the curious
    with pytest.raises(openai.BadRequestError) as caught:
        client(node).responses.create(model="gpt", input="very long")
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as caught:
        client(node).chat.completions.create(model="gpt", messages=MSG, stream=True)  # type: ignore[arg-type]
    assert caught.value.code == "context_length_exceeded"
    assert len(fake.requests()) == 3  # a bad request is never failed over or retried


def test_429_with_retry_after_from_the_only_upstream_is_not_resent(
    node: NodeProcess, fake: FakeOpenAIProcess
) -> None:
    fake.script(Behaviour.rate_limited("3", model="gpt-fake"))
    with pytest.raises(openai.RateLimitError) as caught:
        client(node).chat.completions.create(model="solo", messages=MSG)  # type: ignore[arg-type]
    assert caught.value.response.headers["retry-after"] == "3"
    assert len(fake.requests()) == 1  # max_retries is 3, but it said: wait 3 s


# --------------------------------------------------------------------------- headers
def test_processing_ms_and_request_id_forwarded(node: NodeProcess, fake: FakeOpenAIProcess
                                                ) -> None:
    raw = client(node).chat.completions.with_raw_response.create(
        model="gpt", messages=MSG, extra_headers={"x-request-id": "client-req-77"})  # type: ignore[arg-type]
    assert int(raw.headers["openai-processing-ms"]) >= 0
    sent = fake.requests()[-1]["headers"]
    assert sent["x-request-id"] == "client-req-77"
    assert sent["x-client-request-id"] == "client-req-77"
    with client(node).chat.completions.with_streaming_response.create(
            model="gpt", messages=MSG, stream=True) as streamed:  # type: ignore[arg-type]
        assert int(streamed.headers["openai-processing-ms"]) >= 0
        assert "content-encoding" not in streamed.headers  # streams are never compressed
    status, headers, _ = raw_post(node, "/chat/completions", {"model": "nope", "messages": MSG},
                                  {})
    assert status == 404 and int(headers["openai-processing-ms"]) >= 0


def test_big_answers_gzipped_when_asked(node: NodeProcess) -> None:
    body = {"model": "embed", "input": [f"text {i}" for i in range(20)], "dimensions": 256,
            "encoding_format": "float"}
    status, headers, data = raw_post(node, "/embeddings", body, {"Accept-Encoding": "gzip"})
    assert status == 200 and headers.get("content-encoding") == "gzip"
    plain = json.loads(gzip.decompress(data))
    validate("CreateEmbeddingResponse", plain)
    assert len(plain["data"]) == 20 and len(plain["data"][0]["embedding"]) == 256
    assert len(data) < len(gzip.decompress(data)) / 2
    status, headers, data = raw_post(node, "/embeddings", body, {})
    assert "content-encoding" not in headers and json.loads(data)["data"]
    status, headers, _ = raw_post(node, "/chat/completions", {"model": "gpt", "messages": MSG},
                                  {"Accept-Encoding": "gzip"})
    assert status == 200 and "content-encoding" not in headers  # small: sent as it is
    # The official client asks for gzip and reads it transparently.
    result = client(node).embeddings.create(model="embed", input=body["input"], dimensions=256)
    assert len(result.data) == 20
