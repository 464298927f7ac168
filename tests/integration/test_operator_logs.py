"""What an operator reads in a node's log, from real `meshnode run` processes (JSON mode).

- a seed that answers but refuses us (another mesh secret) is told apart from a port where
  nothing answers and from a node's HTTP port; the node whose HTTP port was seeded logs one
  warning naming the mistake, not a traceback per connection;
- every line is JSON, gRPC's C core's too (GRPC_VERBOSITY makes it talk), and so is a refused
  config; an unset `${VAR}` is named;
- a port in use fails the start before any model loads (the local worker never starts).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kit.node_proc import REPO_ROOT, NodeProcess, NodeStartError
from tests.kit.wait import wait_for_sync

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
SECRET = "operators-test-secret-0123456789abcdef"


def mesh_config(secret: str) -> dict[str, Any]:
    return {"mesh": {"mdns": False, "secret": secret}, "providers": {}}


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def non_json(node: NodeProcess) -> list[str]:
    return [line for line in node.logs().splitlines()
            if line and not line.startswith(("{", "MESHNODE_"))]


def warnings_of(node: NodeProcess, logger: str) -> list[str]:
    return [r["msg"] for r in node.log_records() if r["logger"] == logger]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NodeProcess]]:
    work = tmp_path_factory.mktemp("operator-logs")
    nodes: dict[str, NodeProcess] = {}
    try:
        a = nodes["a"] = NodeProcess(mesh_config(SECRET), work, name="a", node_id="a",
                                     grpc_listen="127.0.0.1:0",
                                     env={"GRPC_VERBOSITY": "debug"}).start()
        wait_for_sync(lambda: "MESHNODE_GRPC" in a.refresh_announcements(), "a's gRPC")
        grpc_addr, http_addr = a.announced["MESHNODE_GRPC"], a.url.split("//")[1]
        for name, secret, seed in (("wrong-secret", "another-secret-0123456789abcdefgh",
                                    grpc_addr),
                                   ("http-port", SECRET, http_addr),
                                   ("nothing", SECRET, closed_port())):
            nodes[name] = NodeProcess(mesh_config(secret), work, name=name, node_id=name,
                                      grpc_listen="127.0.0.1:0", seeds=[seed]).start()
        for name in ("wrong-secret", "http-port", "nothing"):
            wait_for_sync(lambda n=name: warnings_of(nodes[n], "meshnode.mesh.seeds"),
                          f"{name} says why it could not join")
        yield nodes
    finally:
        for node in nodes.values():
            node.stop(timeout=15)


def test_each_failed_seed_says_what_is_wrong(seeded: dict[str, NodeProcess]) -> None:
    said = {n: " ".join(warnings_of(seeded[n], "meshnode.mesh.seeds"))
            for n in ("wrong-secret", "http-port", "nothing")}
    assert "answered but refused us: mesh authentication failed" in said["wrong-secret"]
    assert "speaks HTTP/1.1, not gRPC" in said["http-port"]
    assert "nothing answers gRPC at" in said["nothing"]
    assert "refused" not in said["nothing"] and "HTTP/1.1" not in said["wrong-secret"]


def test_the_seeded_http_port_logs_one_line_not_tracebacks(
    seeded: dict[str, NodeProcess]
) -> None:
    a = seeded["a"]
    wait_for_sync(lambda: warnings_of(a, "aiohttp.server"), "a names the mistake")
    lines = warnings_of(a, "aiohttp.server")
    # The joiner knocks again and again (backoff from 0.5 s); a line at most once a minute, so
    # a module that runs a few minutes on a slow box sees one to three, never one per knock.
    assert 1 <= len(lines) <= 3, lines
    assert all("gRPC (HTTP/2) client at 127.0.0.1 called the HTTP API port" in line
               for line in lines)
    assert "Traceback" not in a.logs()


def test_every_line_is_json_grpc_core_included(seeded: dict[str, NodeProcess]) -> None:
    for node in seeded.values():
        assert non_json(node) == [], node.name
    native = [r for r in seeded["a"].log_records() if r["logger"] == "native"]
    assert native, "GRPC_VERBOSITY=debug made gRPC's C core write to stderr"


def test_an_unset_variable_is_named(tmp_path: Path) -> None:
    config = {"mesh": {"mdns": False, "secret": "${OPERATORS_TEST_UNSET_SECRET}"},
              "providers": {}}
    with NodeProcess(config, tmp_path, grpc_listen="127.0.0.1:0") as node:
        warned = [r["msg"] for r in node.log_records() if "OPERATORS_TEST_UNSET" in r["msg"]]
    assert warned == ["config: ${OPERATORS_TEST_UNSET_SECRET} (in mesh.secret) is not set in "
                      "the environment; it expanded to an empty string"]


def test_a_refused_config_is_json_in_json_mode(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"mesh": {"bogus": 1}, "server": {"nonsense": True}}))
    done = subprocess.run(
        [sys.executable, "-m", "meshnode", "run", "--config", str(bad), "--log-format", "json"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1, lines
    record = json.loads(lines[0])
    assert record["level"] == "error" and record["msg"].startswith("invalid configuration")
    assert "mesh.bogus: unknown key" in record["errors"]
    assert "server.nonsense: unknown key" in record["errors"]


@pytest.mark.parametrize("which", ["http", "grpc"])
def test_a_port_in_use_fails_before_the_models_load(tmp_path: Path, which: str) -> None:
    config = {"mesh": {"mdns": False},
              "providers": {"local": {"device": "cpu", "models": [
                  {"name": "tiny-gpt2", "builtin": "tiny-gpt2", "kind": "chat"}]}}}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        kwargs: dict[str, Any] = {"listen": addr} if which == "http" else {
            "grpc_listen": addr}
        node = NodeProcess(config, tmp_path, **kwargs)
        with pytest.raises(NodeStartError):
            node.start()
        node.stop()
    assert node.returncode == 1
    errors = [r["msg"] for r in node.log_records() if r["level"] == "error"]
    assert errors == [f"cannot start: [Errno 98] cannot bind {'HTTP' if which == 'http' else 'gRPC'}"
                      f" on {addr}: " + errors[0].split(f"{addr}: ", 1)[1]]
    logs = node.logs()
    assert "worker[" not in logs and "worker ready" not in logs  # no model was loading
    assert "HTTP API listening" not in logs and non_json(node) == []
