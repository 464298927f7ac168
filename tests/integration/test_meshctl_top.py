"""`meshctl top` in a real terminal: tmux runs it against a real three-node mesh.

The test starts `top` in a detached tmux session (its own tmux server socket, so a developer's
tmux is never touched), reads the screen with `capture-pane`, and checks that it shows the three
nodes, that it refreshes (traffic sent after start appears; a SIGKILLed node turns dead; the
asked node dying is shown as stale data, not a crash), then presses `q` and checks that top
exited 0. Skips when tmux is not installed
(`apt-get install -y tmux`).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kit.node_proc import REPO_ROOT
from tests.kit.three_nodes import ADMIN_SECRET, ThreeNodes
from tests.kit.wait import wait_for_sync

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.skipif(shutil.which("tmux") is None,
                       reason="tmux is not installed (apt-get install -y tmux)"),
]


class Tmux:
    """One tmux server of our own (`-L`), one session running one command."""

    def __init__(self, workdir: Path) -> None:
        self.socket = f"meshctl-test-{os.getpid()}"
        self.workdir = workdir

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args],
                              capture_output=True, text=True, timeout=30, check=False)

    def start(self, command: str, width: int = 200, height: int = 50) -> None:
        result = self._run("new-session", "-d", "-s", "top", "-x", str(width), "-y",
                           str(height), command)
        assert result.returncode == 0, result.stderr

    def screen(self) -> str:
        return self._run("capture-pane", "-p", "-t", "top").stdout

    def keys(self, *keys: str) -> None:
        assert self._run("send-keys", "-t", "top", *keys).returncode == 0

    def kill_server(self) -> None:
        self._run("kill-server")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreeNodes]:
    with ThreeNodes(tmp_path_factory.mktemp("top"), auth_on_a=True) as nodes:
        yield nodes


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    session = Tmux(tmp_path)
    yield session
    session.kill_server()


def screen_row(screen: str, node: str) -> str:
    for line in screen.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 2 and cells[1] in (node, node + " *"):
            return line
    return ""


def test_top_shows_the_mesh_live_and_quits_with_q(mesh: ThreeNodes, tmux: Tmux,
                                                  tmp_path: Path) -> None:
    rc_file = tmp_path / "rc"
    env = {"MESHNODE_URL": mesh.a.url, "MESHNODE_API_KEY": ADMIN_SECRET,
           "PYTHONPATH": str(REPO_ROOT)}
    top = " ".join(shlex.quote(a) for a in
                   [sys.executable, "-m", "meshnode.cli.meshctl", "top", "--interval", "0.3"])
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    # -u COLUMNS/LINES: rich honours them over the terminal's real size (pytest may set them).
    tmux.start(f"cd {shlex.quote(str(REPO_ROOT))} && env -u COLUMNS -u LINES {exports} {top}; "
               f"echo $? > {shlex.quote(str(rc_file))}")

    wait_for_sync(lambda: "3/3 nodes alive" in tmux.screen(), "top shows 3/3 nodes alive")
    screen = tmux.screen()
    assert "meshctl top" in screen and "node a" in screen
    for node in ("a", "b", "c"):
        assert "alive" in screen_row(screen, node), (node, screen)
    assert "traffic by provider and model" in screen and "budget" in screen, screen
    assert "q quit" in screen
    assert screen_row(screen, "upstream") == ""  # no traffic yet

    # It refreshes: traffic sent now shows up, and a killed node turns dead.
    mesh.chat("a", "m1")
    wait_for_sync(lambda: "m1" in screen_row(tmux.screen(), "upstream"),
                  "top shows the new upstream traffic")
    mesh.c.kill()
    wait_for_sync(lambda: "dead" in screen_row(tmux.screen(), "c"), "top shows c dead")
    assert "2/3 nodes alive" in tmux.screen()
    # The asked node itself going away is shown, not fatal: top keeps running.
    mesh.a.kill()
    wait_for_sync(lambda: "stale: the last poll failed" in tmux.screen(), "top shows stale")
    assert "cannot reach the node" in tmux.screen()
    assert not rc_file.exists()

    tmux.keys("q")
    wait_for_sync(lambda: rc_file.exists() and rc_file.read_text().strip() != "",
                  "top exits after q", timeout=30)
    assert rc_file.read_text().strip() == "0"
