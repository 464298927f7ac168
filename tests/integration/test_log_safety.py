"""Secrets and forged lines, on a real node process logging in the text format:
- `user:pass@` in a provider's `base_url` never appears in the log;
- a `%0a` in a request path (unauthenticated) cannot start a line of its own;
- an upstream error's `message` and `param` reach the client with the provider key masked.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from tests.kit.fake_openai import Behaviour, FakeOpenAIProcess
from tests.kit.node_proc import NodeProcess
from tests.kit.wait import wait_for_sync

pytestmark = pytest.mark.slow

PROVIDER_KEY = "sk-live-provider-0123456789abcdef"
URL_PASSWORD = "hunter2-url-password"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAIProcess]:
    with FakeOpenAIProcess() as fake:
        yield fake


@pytest.fixture(scope="module")
def node(upstream: FakeOpenAIProcess, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[NodeProcess]:
    with_userinfo = upstream.base_url.replace("http://", f"http://ops:{URL_PASSWORD}@")
    config = {
        "mesh": {"enabled": False, "mdns": False},
        "cache": {"enabled": False},
        "providers": {
            "openai": {"base_url": upstream.base_url, "credentials": {"api_key": PROVIDER_KEY},
                       "models": [{"name": "gpt-4o", "openai_model": "gpt-4o"}]},
            "basic": {"type": "openai_compatible", "base_url": with_userinfo,
                      "models": [{"name": "basic-model", "openai_model": "gpt-4o"}]},
        },
    }
    with NodeProcess(config, tmp_path_factory.mktemp("logsafety"), node_id="logsafety",
                     extra_args=["--log-format", "text"]) as proc:
        yield proc


def _chat(node: NodeProcess, model: str) -> tuple[int, dict[str, object]]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    request = urllib.request.Request(node.url + "/v1/chat/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_url_userinfo_is_never_logged(node: NodeProcess) -> None:
    assert _chat(node, "basic-model")[0] == 200  # the userinfo is used, as basic auth
    logs = node.logs()
    assert "basic" in logs and "***@127.0.0.1" in logs
    assert URL_PASSWORD not in logs and "ops:" not in logs


def test_a_newline_in_the_path_cannot_forge_a_log_line(node: NodeProcess) -> None:
    host, port = node.url.removeprefix("http://").rsplit(":", 1)
    forged = "FORGED 2026-12-01 00:00:00,000 INFO meshnode.node: key created"
    with socket.create_connection((host, int(port))) as sock:
        path = "/v1/models/x%0a" + forged.replace(" ", "%20") + "%0d%0a"
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: n\r\nConnection: close\r\n\r\n".encode())
        sock.settimeout(10)
        assert sock.recv(65536).startswith(b"HTTP/1.1 404")
    wait_for_sync(lambda: "FORGED" in node.logs(), "the request's log line")
    lines = node.logs().splitlines()
    assert not [line for line in lines if line.startswith("FORGED")]
    assert any("/v1/models/x\\nFORGED" in line for line in lines)


@pytest.mark.parametrize("status", [400, 422])
def test_an_upstream_error_param_does_not_carry_the_provider_key(
        node: NodeProcess, upstream: FakeOpenAIProcess, status: int) -> None:
    upstream.reset()
    upstream.script(Behaviour.error(status, body={"error": {
        "message": f"Incorrect API key provided: {PROVIDER_KEY}",
        "type": "invalid_request_error", "param": f"Authorization: Bearer {PROVIDER_KEY}",
        "code": None}}))
    code, body = _chat(node, "gpt-4o")
    assert code == 400
    error = body["error"]
    assert isinstance(error, dict)
    assert PROVIDER_KEY not in json.dumps(body)
    assert "***" in str(error["param"]) and "***" in str(error["message"])
    assert PROVIDER_KEY not in node.logs()
