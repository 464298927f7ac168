"""The `meshnode` command: `check-config` finds every error `meshnode run` would refuse to start
on, not only the config model's own (a file it calls valid must start); `--version`."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshnode.cli.main import main as meshnode_main


def _check(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    path = tmp_path / "meshnode.yaml"
    path.write_text(text)
    capsys.readouterr()
    code = meshnode_main(["check-config", str(path)])
    return code, capsys.readouterr().err.strip().splitlines()


def test_local_model_problems_are_reported(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, errors = _check(tmp_path, (
        "mesh: {enabled: false}\n"
        "providers:\n"
        "  local:\n"
        "    models:\n"
        "      - {name: foo, builtin: nosuch}\n"
        f"      - {{name: bar, path: {tmp_path / 'absent'}, kind: chat}}\n"
    ), capsys)
    assert code == 2
    assert any(e.startswith("providers.local.models[0].builtin: unknown built-in model 'nosuch'")
               for e in errors), errors
    assert any(e.startswith("providers.local.models[1].path: no such model directory")
               for e in errors), errors


def test_unauthenticated_mesh_beyond_loopback_is_reported(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, errors = _check(tmp_path, "mesh: {listen_addr: '0.0.0.0:50051'}\nproviders: {}\n",
                          capsys)
    assert code == 2
    assert any(e.startswith("mesh.listen_addr: 0.0.0.0:50051 is reachable") for e in errors)
    code, errors = _check(tmp_path, ("mesh: {listen_addr: '0.0.0.0:50051', secret: s3cret-s3cret}"
                                     "\nproviders: {}\n"), capsys)
    assert code == 0, errors


def test_auth_on_an_unauthenticated_loopback_mesh_is_reported(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, errors = _check(tmp_path, "auth: {enabled: true}\nproviders: {}\n", capsys)
    assert code == 2
    assert errors == [e for e in errors if e.startswith("auth.enabled: true needs an "
                                                        "authenticated mesh")] and errors
    for fix in ("mesh: {secret: s3cret-s3cret}", "mesh: {enabled: false}",
                "mesh: {insecure: true}"):
        code, errors = _check(tmp_path, f"auth: {{enabled: true}}\n{fix}\nproviders: {{}}\n",
                              capsys)
        assert code == 0, (fix, errors)


def test_valid_local_builtins_pass_without_starting_anything(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, errors = _check(tmp_path, (
        f"node: {{data_dir: {tmp_path / 'data'}}}\n"
        "mesh: {enabled: false}\n"
        "providers:\n"
        "  local:\n"
        "    models:\n"
        "      - {name: minilm, builtin: minilm, kind: embedding}\n"
    ), capsys)
    assert code == 0, errors
    assert not (tmp_path / "data").exists()  # nothing built, nothing written


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        meshnode_main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("meshnode ")


def test_the_embedded_default_still_starts_auth_off_no_secret_loopback(tmp_path: Path) -> None:
    """`make run` (no config: auth off, no mesh.secret, mesh on loopback) passes every start-up
    check, and its mesh carries no governance (docs/security.md)."""
    from meshnode.cli.main import startup_errors
    from meshnode.config import load_config
    from meshnode.node import Node

    config = load_config(None, env={}, overrides={"node.data_dir": str(tmp_path)})
    assert not config.auth.enabled and not config.mesh.secret and config.mesh.enabled
    assert startup_errors(config) == []
    node = Node(config, embedded_default=True, env={})
    try:
        service = next(s for s in node.services if type(s).__name__ == "MeshService")
        assert not service.security.authenticated
        assert service._blobs is None and service._on_peer_blobs is None  # no governance
    finally:
        node.governance.close()
