"""What a node tells peers to dial when it listens on every interface."""

from __future__ import annotations

import logging
import socket
from types import SimpleNamespace

import pytest

from meshnode.config import MeshConfig
from meshnode.mesh.service import MeshService


def advertise(config: MeshConfig, port: int = 50051) -> str:
    return MeshService._advertise(SimpleNamespace(config=config), port)  # type: ignore[arg-type]


def test_wildcard_listen_resolving_to_loopback_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "127.0.1.1")
    with caplog.at_level(logging.WARNING, logger="meshnode.mesh.service"):
        assert advertise(MeshConfig(listen_addr="0.0.0.0:50051", insecure=True)) == "127.0.1.1:50051"
    assert "set mesh.advertise_addr" in caplog.text


def test_explicit_advertise_wins_and_a_routable_name_is_quiet(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(socket, "gethostbyname", lambda name: "192.0.2.7")
    with caplog.at_level(logging.WARNING, logger="meshnode.mesh.service"):
        assert advertise(MeshConfig(listen_addr="0.0.0.0:0", insecure=True), 4000) == "192.0.2.7:4000"
        assert advertise(MeshConfig(listen_addr="0.0.0.0:0", insecure=True,
                                    advertise_addr="gpu-1.lan:50051")) == "gpu-1.lan:50051"
    assert caplog.text == ""
