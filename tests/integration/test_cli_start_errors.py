"""Start-up failures a user hits, from a real `meshnode run`: a clear line and exit 1, never a
Python traceback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.kit.node_proc import NodeProcess, NodeStartError

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("which", ["http", "grpc"])
def test_a_port_in_use_is_one_clear_error(tmp_path: Path, which: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        config = {"mesh": {"mdns": False}, "providers": {}}
        kwargs = {"listen": addr} if which == "http" else {"grpc_listen": addr}
        node = NodeProcess(config, tmp_path, **kwargs)  # type: ignore[arg-type]
        with pytest.raises(NodeStartError):
            node.start()
        node.stop()
    logs = node.logs()
    assert node.returncode == 1
    assert "cannot start" in logs and addr.split(":")[1] in logs
    assert "Traceback" not in logs
