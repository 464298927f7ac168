"""Provider faults that are the operator's, not the client's, on a real node process with two
fake OpenAI upstreams (tests/kit/fake_openai.py) serving one model:

- the cheaper one rejects the node's key (401): every request succeeds through the other, the
  bad one is cooled down, `/health/ready` names it, `/metrics` exports it and the log has an
  ERROR line;
- an adapter that raises an unexpected exception (a `base_url` with `user:pass@` plus an
  `api_key`, which check-config accepts and aiohttp refuses) is a failed attempt: the request
  fails over instead of ending in a 500.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.kit.fake_openai import FakeOpenAIProcess
from tests.kit.node_proc import NodeProcess
from tests.kit.three_nodes import ThreeNodes
from tests.kit.wait import wait_for_sync

pytestmark = pytest.mark.slow

RIGHT_KEY = "sk-right-0123456789"
WRONG_KEY = "sk-wrong-0123456789"
REQUESTS = 8


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[FakeOpenAIProcess, FakeOpenAIProcess]]:
    with FakeOpenAIProcess(require_key=RIGHT_KEY) as strict, FakeOpenAIProcess() as healthy:
        yield strict, healthy


@pytest.fixture(scope="module")
def node(upstreams: tuple[FakeOpenAIProcess, FakeOpenAIProcess],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    strict, healthy = upstreams
    model = {"name": "gpt-4o", "openai_model": "gpt-4o"}
    config = {
        "mesh": {"enabled": False, "mdns": False},
        "cache": {"enabled": False},
        "providers": {
            # cheapest first: cost_optimized tries the broken ones before the healthy one
            "badkey": {"type": "openai_compatible", "base_url": strict.base_url,
                       "credentials": {"api_key": WRONG_KEY},
                       "models": [{**model, "cost_per_1k_tokens": 0.001}]},
            "urlauth": {"type": "openai_compatible",
                        "base_url": healthy.base_url.replace("http://", "http://u:p@"),
                        "credentials": {"api_key": RIGHT_KEY},
                        "models": [{**model, "cost_per_1k_tokens": 0.002}]},
            "good": {"type": "openai_compatible", "base_url": healthy.base_url,
                     "credentials": {"api_key": RIGHT_KEY},
                     "models": [{**model, "cost_per_1k_tokens": 0.01}]},
        },
    }
    with NodeProcess(config, tmp_path_factory.mktemp("faults"), node_id="faults") as proc:
        yield proc


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310
            body = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read(), exc.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode()


def test_a_rejected_key_fails_over_and_is_reported(node: NodeProcess) -> None:
    client = openai.OpenAI(base_url=node.base_url, api_key="unused", max_retries=0)
    served_by = []
    for i in range(REQUESTS):
        reply = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": f"hello {i}"}])
        served_by.append(reply.headers["x-aiproxy-provider"])
        attempts = reply.parse().model_extra["x_aiproxy"]["attempts"]
        assert attempts[-1]["outcome"] == "ok"
    assert set(served_by) == {"good"}

    status, ready = _get(node.url + "/health/ready")
    assert status == 200  # "good" can serve
    assert ready["providers"]["badkey"]["ready"] is False
    assert "HTTP 401" in ready["providers"]["badkey"]["reason"]
    assert any(r.startswith("badkey:") for r in ready["reasons"])
    assert ready["providers"]["good"]["ready"] is True

    _, metrics = _get(node.url + "/metrics")
    assert 'meshnode_provider_credentials_rejected{provider="badkey"} 1.0' in metrics
    # its attempt left it cooling down at once (not after `cooldown.failures` tries)
    assert 'meshnode_upstream_attempts_total{outcome="cooled_down",provider="badkey"}' in metrics

    records = node.log_records()
    auth_errors = [r for r in records if r.get("level") == "error" and "badkey" in r["msg"]
                   and "credentials" in r["msg"]]
    assert auth_errors
    # cooled down: the bad key was tried once, not on every request
    assert len(auth_errors) < REQUESTS


def test_an_adapter_exception_is_a_failed_attempt_not_a_500(node: NodeProcess) -> None:
    records = node.log_records()
    raised = [r for r in records if r.get("level") == "error" and "urlauth raised" in r["msg"]]
    assert raised and "exc" in raised[0]  # logged once per failure, with its traceback
    assert "ValueError" in raised[0]["msg"]
    assert not [r for r in records if "unhandled error serving request" in r.get("msg", "")]
    _, stats = _get(node.url + "/admin/stats")
    row = next(c for c in stats["candidates"] if c["provider"] == "urlauth")
    assert row["errors"] >= 1 and row["last_error"] == "provider_error"


def test_a_model_whose_only_peer_died_is_503_with_retry_after(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    with ThreeNodes(tmp_path_factory.mktemp("peer-died")) as mesh:
        assert mesh.chat("a", "m2")["x_aiproxy"]["node"] == "b"  # m2 lives on b alone
        mesh.b.kill()
        wait_for_sync(lambda: "m2" not in {m["id"] for m in mesh.get("a", "/v1/models")["data"]},
                      "a forgets b's models")
        body = json.dumps({"model": "m2", "messages": [{"role": "user", "content": "hi"}]})
        request = urllib.request.Request(mesh.a.url + "/v1/chat/completions", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)  # noqa: S310
        assert refused.value.code == 503
        assert int(refused.value.headers["Retry-After"]) >= 1
        error = json.loads(refused.value.read())["error"]
        assert error["type"] == "service_unavailable" and "m2" in error["message"]
        # a model nobody ever offered is still a 404
        request.data = body.replace('"m2"', '"no-such-model"').encode()
        with pytest.raises(urllib.error.HTTPError) as unknown:
            urllib.request.urlopen(request, timeout=30)  # noqa: S310
        assert unknown.value.code == 404
