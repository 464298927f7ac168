"""The HTTP server's limits against clients that hold connections (meshnode/api/server.py),
against a real node process started under `ulimit -n 256`.

- an idle flood (more silent sockets than the process may open files): the node stays up,
  keeps its open files under the limit, and `/health/live` answers;
- a request whose headers never finish is closed after `server.header_timeout_s`;
- a dribbled body (slowloris) gets 408 and its connection closed after `server.body_timeout_s`;
- aiohttp's parser refusals (a header flood, a 100 KB header, TLS bytes) come in OpenAI's
  error shape (Anthropic's on `/v1/messages`), each with one WARNING line and no traceback;
- with every general connection busy, inference gets 503 + Retry-After while `/health/live`
  and `/admin/stats` still answer (the reserve).
"""

from __future__ import annotations

import json
import os
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kit.fake_openai import Behaviour, FakeOpenAIProcess
from tests.kit.node_proc import NodeProcess
from tests.kit.wait import wait_for_sync

pytestmark = pytest.mark.slow

FD_LIMIT = 256
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
IDLE_TIMEOUT_S = 30.0  # long, so a close within seconds is the header/body deadline's doing
ULIMIT = ["sh", "-c", f'ulimit -n {FD_LIMIT} && exec "$@"', "sh"]
TLS_CLIENT_HELLO = bytes.fromhex("16030100c4010000c00303") + os.urandom(32) + b"\x00" * 20


def _config(upstream: str, **server: Any) -> dict[str, Any]:
    return {
        "mesh": {"enabled": False, "mdns": False},
        "server": {"header_timeout_s": HEADER_TIMEOUT_S, "body_timeout_s": BODY_TIMEOUT_S,
                   "idle_timeout_s": IDLE_TIMEOUT_S, **server},
        "routing": {"timeouts": {"first_byte_ms": 60000, "total_ms": 120000}},
        "providers": {"openai": {"base_url": upstream, "credentials": {"api_key": "sk-fake"},
                                 "models": [{"name": "gpt-4o", "openai_model": "gpt-4o"}]}},
    }


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAIProcess]:
    with FakeOpenAIProcess() as fake:
        yield fake


@pytest.fixture(scope="module")
def node(upstream: FakeOpenAIProcess, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[NodeProcess]:
    workdir = tmp_path_factory.mktemp("limits")
    with NodeProcess(_config(upstream.base_url), workdir, node_id="limits",
                     wrapper=ULIMIT) as proc:
        yield proc


def _address(node: NodeProcess) -> tuple[str, int]:
    host, port = node.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _read_until_closed(sock: socket.socket, limit_s: float) -> bytes:
    """Everything the node sends until it closes the connection (raises if it does not
    within `limit_s`)."""
    sock.settimeout(limit_s)
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk


def _split(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_idle_flood_past_the_fd_limit_leaves_health_reachable(node: NodeProcess) -> None:
    with open(f"/proc/{node.pid}/limits", encoding="utf-8") as f:
        assert any(line.startswith("Max open files") and f" {FD_LIMIT} " in line for line in f)
    flood: list[socket.socket] = []
    try:
        for _ in range(FD_LIMIT + 150):  # silent: connect, send nothing
            flood.append(socket.create_connection(_address(node), timeout=10))
        status, body = _get(node.url + "/health/live")
        assert status == 200, body
        # older silent connections made room; the process never reached its limit
        wait_for_sync(lambda: sum(_closed_by_peer(s) for s in flood) > 0,
                      "the node closed some silent connections", timeout=IDLE_TIMEOUT_S)
        assert _open_files(node.pid) < FD_LIMIT
        assert _get(node.url + "/health/live")[0] == 200
    finally:
        for sock in flood:
            sock.close()
    warnings = [r for r in node.log_records() if r.get("level") == "warning"
                and "connections at the cap" in r.get("msg", "")]
    assert warnings, node.log_tail()
    assert node.proc is not None and node.proc.poll() is None


def test_unfinished_headers_are_closed_after_the_header_timeout(node: NodeProcess) -> None:
    with socket.create_connection(_address(node)) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: node\r\n")  # no blank line, ever
        assert _read_until_closed(sock, limit_s=IDLE_TIMEOUT_S / 2) == b""


def test_slowloris_body_gets_408_and_is_closed(node: NodeProcess) -> None:
    with socket.create_connection(_address(node)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: node\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
        sock.settimeout(0.2)
        answer = b""
        for _ in range(int(IDLE_TIMEOUT_S / 0.2)):  # a byte every 0.2 s, until it is cut off
            try:
                sock.send(b" ")
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if not chunk:
                break
            answer += chunk
        else:
            pytest.fail("the node kept reading a dribbled body")
    status, body = _split(answer)
    assert status == 408
    assert body["error"]["code"] == "request_timeout"
    assert body["error"]["type"] == "invalid_request_error"


HEADER_FLOOD = b"".join(b"X-Flood-%d: 1\r\n" % i for i in range(300))
HUGE_HEADER = b"X-Huge: " + b"a" * 100_000 + b"\r\n"


@pytest.mark.parametrize(("raw", "anthropic"), [
    (b"POST /v1/chat/completions HTTP/1.1\r\n" + HEADER_FLOOD + b"\r\n", False),
    (b"POST /v1/chat/completions HTTP/1.1\r\n" + HUGE_HEADER + b"\r\n", False),
    (b"POST /v1/messages HTTP/1.1\r\n" + HEADER_FLOOD + b"\r\n", True),
    (b"POST /v1/messages HTTP/1.1\r\n" + HUGE_HEADER + b"\r\n", True),
    (TLS_CLIENT_HELLO, False),
], ids=["header-flood", "100kb-header", "messages-header-flood", "messages-100kb-header",
        "tls-bytes"])
def test_parser_refusals_are_shaped_and_logged_once(node: NodeProcess, raw: bytes,
                                                    anthropic: bool) -> None:
    before = len(node.log_records())
    with socket.create_connection(_address(node)) as sock:
        sock.sendall(raw)
        status, body = _split(_read_until_closed(sock, limit_s=10))
    assert status == 400
    if anthropic:
        assert body["type"] == "error"
        assert body["error"]["type"] == "invalid_request_error"
        assert body["error"]["message"].startswith("malformed HTTP request")
    else:
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["code"]) == ("invalid_request_error", "malformed_request")

    def refusal_logged() -> list[dict[str, Any]]:
        return [r for r in node.log_records()[before:]
                if "malformed HTTP request" in r.get("msg", "")]

    wait_for_sync(refusal_logged, "the refusal's log line")
    (line,) = refusal_logged()
    assert line["level"] == "warning"
    assert "\n" not in line["msg"] and "exc" not in line
    new = node.log_records()[before:]
    assert not [r for r in new if r.get("level") in ("error", "critical") or "exc" in r], new


def test_reserve_keeps_health_and_admin_answering(upstream: FakeOpenAIProcess,
                                                  tmp_path: Path) -> None:
    max_connections, reserved = 6, 2
    config = _config(upstream.base_url, max_connections=max_connections,
                     reserved_connections=reserved)
    upstream.reset()
    upstream.script(Behaviour.hang(times=-1))
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: node\r\n"
               b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s")
    chat = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    held: list[socket.socket] = []
    with NodeProcess(config, tmp_path, node_id="reserve") as node:
        try:
            for _ in range(max_connections - reserved):  # every general slot, hanging upstream
                sock = socket.create_connection(_address(node))
                sock.sendall(request % (len(chat), chat.encode()))
                held.append(sock)
            wait_for_sync(lambda: upstream.stats()["requests"] >= max_connections - reserved,
                          "the held requests reached the upstream")
            with socket.create_connection(_address(node)) as sock:
                sock.sendall(request % (len(chat), chat.encode()))
                sock.settimeout(10)
                raw = sock.recv(65536)
            head, _, _ = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503"), raw
            assert b"\r\nRetry-After: " in head
            assert _get(node.url + "/health/live")[0] == 200
            assert _get(node.url + "/admin/stats")[0] == 200
        finally:
            for sock in held:
                sock.close()
            upstream.reset()
        # the held requests ended with their clients: inference has room again
        upstream.script(Behaviour.ok(text="back"))
        wait_for_sync(lambda: _post_status(node.url, chat) == 200, "inference answers again")


def _post_status(url: str, body: str) -> int:
    req = urllib.request.Request(url + "/v1/chat/completions", data=body.encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
