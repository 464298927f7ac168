"""The image's HEALTHCHECK (`python -m meshnode.cli.healthcheck`) probes the port of the config
the node runs, not a fixed 8080: against a real node on a port of its own, then stopped."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from meshnode.cli.healthcheck import config_path, health_url
from tests.kit.node_proc import REPO_ROOT, NodeProcess

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MESHNODE_")}
    return subprocess.run([sys.executable, "-m", "meshnode.cli.healthcheck"], cwd=REPO_ROOT,
                          env={**clean, "PYTHONPATH": str(REPO_ROOT), **env},
                          capture_output=True, text=True, timeout=60, check=False)


def test_probes_the_configured_port_of_a_live_node(tmp_path: Path) -> None:
    addr = f"127.0.0.1:{free_port()}"
    config = {"server": {"listen_addr": addr}, "mesh": {"enabled": False}, "providers": {}}
    node = NodeProcess(config, tmp_path, listen=addr).start()
    env = {"MESHNODE_CONFIG": str(tmp_path / "node.json")}
    try:
        ok = healthcheck(env)
        assert ok.returncode == 0, ok.stderr
    finally:
        node.stop()
    down = healthcheck(env)
    assert down.returncode == 1 and f"http://{addr}/health/live" in down.stderr


def test_url_comes_from_the_config_the_entrypoint_runs(tmp_path: Path) -> None:
    generated = tmp_path / "generated-config.yaml"
    generated.write_text(json.dumps({"server": {"listen_addr": "0.0.0.0:9123"}}))
    env = {"MESHNODE_CONFIG": str(tmp_path / "absent.yaml"), "MESHNODE_DATA_DIR": str(tmp_path)}
    assert config_path(env) == generated  # nothing mounted: the one quickstart wrote
    assert health_url(env) == "http://127.0.0.1:9123/health/live"  # wildcard -> loopback
    assert health_url({**env, "MESHNODE_HEALTH_URL": "http://x:1/h"}) == "http://x:1/h"
    broken = healthcheck({"MESHNODE_CONFIG": str(tmp_path / "none.yaml"),
                          "MESHNODE_DATA_DIR": str(tmp_path / "nowhere")})
    assert broken.returncode == 1 and "cannot read the node's config" in broken.stderr
