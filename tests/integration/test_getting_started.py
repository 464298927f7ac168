"""docs/getting-started.md sections 2 and 3, run as written.

The shell blocks are read from the document itself, so the test fails when the text drifts
from what works. What is changed, and only that: `sk-...` becomes a fake key; `.venv/bin/` and
`deploy/` point at this checkout; `/tmp/` at the test's tmp dir; the documented ports
(8080-8082, 50051-50053) at free ones (`MESHNODE_URL` follows 8080, meshctl's default); mDNS
is off (`MESHNODE_MDNS=false`, a documented quickstart input) so the nodes join only each
other; each `meshnode run` goes to the background with its output in a file, as a terminal of
its own would hold it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kit.node_proc import REPO_ROOT
from tests.kit.wait import wait_for_sync

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
DOC = REPO_ROOT / "docs" / "getting-started.md"
DOC_PORTS = (8080, 8081, 8082, 50051, 50052, 50053)


def shell_blocks(section: str) -> list[str]:
    text = DOC.read_text(encoding="utf-8")
    body = text.split(f"\n## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", body, re.S)


def commands(block: str) -> list[str]:
    """One command per entry: comments dropped, continuation lines joined."""
    joined = block.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(re.sub(r"\s+", " ", line))
    return out


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Shell:
    """The reader's shell: one environment that `export` lines change, nodes in background."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ports = dict(zip(DOC_PORTS, free_ports(len(DOC_PORTS)), strict=True))
        keep = ("PATH", "HOME", "LANG", "TMPDIR")
        self.env = {k: v for k, v in os.environ.items() if k in keep}
        self.env.update(PYTHONPATH=str(REPO_ROOT), MESHNODE_MDNS="false",
                        MESHNODE_URL=f"http://127.0.0.1:{self.ports[8080]}", HF_HUB_OFFLINE="1")
        self.nodes: list[tuple[subprocess.Popen[bytes], Path]] = []

    def rewrite(self, command: str) -> str:
        bindir = str(Path(sys.executable).parent)
        command = command.replace("sk-...", "sk-getting-started-test")
        # The doc's /tmp/ paths first: the checkout itself may live under /tmp (CI's clone).
        command = re.sub(r"(?<![\w/])/tmp/", str(self.tmp) + "/", command)
        command = re.sub(r"(?<![\w/])\.venv/bin/", bindir + "/", command)
        command = re.sub(r"(?<![\w/])deploy/", str(REPO_ROOT / "deploy") + "/", command)
        for doc_port, port in self.ports.items():
            command = re.sub(rf"127\.0\.0\.1:{doc_port}\b", f"127.0.0.1:{port}", command)
        return command

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        command = self.rewrite(command)
        if command.startswith("export "):
            name, _, value = command[len("export "):].partition("=")
            done = subprocess.run(["bash", "-c", f"printf %s {value}"], env=self.env,
                                  capture_output=True, text=True, check=True)
            self.env[name] = done.stdout
            return done
        if " run --config " in command:
            log = self.tmp / f"node-{len(self.nodes)}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=self.tmp,
                                        env=self.env, stdout=out, stderr=subprocess.STDOUT)
            self.nodes.append((proc, log))
            return subprocess.CompletedProcess(command, 0, "", "")
        return subprocess.run(["bash", "-c", command], cwd=self.tmp, env=self.env,
                              capture_output=True, text=True, timeout=120, check=False)

    def url_of(self, log: Path) -> str:
        found = re.search(r"MESHNODE_HTTP=(\S+)", log.read_text(errors="replace"))
        return found.group(1) if found else ""

    def stop(self) -> None:
        for proc, _ in self.nodes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in self.nodes:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[Shell]:
    sh = Shell(tmp_path)
    try:
        yield sh
    finally:
        sh.stop()


def live(url: str) -> bool:
    with urllib.request.urlopen(url + "/health/live", timeout=5) as r:  # noqa: S310
        return r.status == 200


def test_section_2_a_config_file(shell: Shell) -> None:
    (block,) = shell_blocks("2. ")
    for command in commands(block):
        done = shell.run(command)
        assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"
    assert (shell.tmp / "meshnode.yaml").exists()
    ((proc, log),) = shell.nodes
    wait_for_sync(lambda: shell.url_of(log) and live(shell.url_of(log)),
                  "the node of section 2 answers")
    text = log.read_text()
    # the exported secret reached the node: no empty ${MESH_SECRET}, peers authenticate
    assert "is not set in the environment" not in text
    assert "secret peer authentication" in text
    assert proc.poll() is None


def test_section_3_a_three_node_mesh(shell: Shell) -> None:
    start, inspect = shell_blocks("3. ")[:2]
    for command in commands(start):
        done = shell.run(command)
        assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"
    assert len(shell.nodes) == 3

    def all_alive() -> bool:
        done = shell.run("meshctl --json topology".replace("meshctl", ".venv/bin/meshctl"))
        if done.returncode != 0:
            return False
        nodes = json.loads(done.stdout)["nodes"]
        return sorted((n["id"], n["status"]) for n in nodes) == [
            ("a", "alive"), ("b", "alive"), ("c", "alive")]

    wait_for_sync(all_alive, "a, b and c see each other alive")
    for command in commands(inspect):
        done = shell.run(command)
        assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"
        assert done.stdout.strip(), command
    for proc, _ in shell.nodes:
        assert proc.poll() is None
