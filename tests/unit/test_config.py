"""Config loading and validation: every error named by its path, all of them at once; the
example configs under deploy/config are valid; `meshnode check-config` exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from meshnode.cli.main import main as meshnode_main
from meshnode.config import load_config, validate
from meshnode.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "deploy" / "config").glob("*.yaml"))

OPENAI = {
    "type": "openai_compatible",
    "base_url": "http://127.0.0.1:9/v1",
    "credentials": {"api_key": "k"},
    "models": [{"name": "m", "openai_model": "m", "cost_per_1k_tokens": 0.001}],
}


def errors_of(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(doc)
    return info.value.errors


def test_examples_exist() -> None:
    assert {p.name for p in EXAMPLES} >= {"minimal.yaml", "full.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_are_valid(path: Path) -> None:
    env = {"OPENAI_API_KEY": "sk-x", "ANTHROPIC_API_KEY": "sk-ant-x", "TOGETHER_API_KEY": "t",
           "CLOUDFLARE_ACCOUNT_ID": "a", "CLOUDFLARE_API_TOKEN": "t", "MESH_SECRET": "s"}
    config = load_config(path, env=env)
    assert config.resolved_providers()


def test_full_example_keeps_the_seed_schema() -> None:
    config = load_config(REPO / "deploy" / "config" / "full.yaml", env={})
    assert set(config.providers) == {"local", "cloudflare", "openai", "anthropic", "together"}
    assert config.routing.failover.fallback_chain == [
        "local", "cloudflare", "openai", "anthropic", "together", "mesh"]
    assert config.routing.policies[0].allow == ["local", "mesh"]
    assert config.mesh.secret == "change-me"  # ${MESH_SECRET:-change-me}


def test_unknown_keys_are_errors_with_paths() -> None:
    errors = errors_of({"server": {"listen": "x"}, "bogus": 1,
                        "providers": {"up": {**OPENAI, "colour": "red"}}})
    assert "server.listen: unknown key" in errors
    assert "bogus: unknown key" in errors
    assert "providers.up.colour: unknown key" in errors


def test_wrong_types() -> None:
    errors = errors_of({"server": {"max_body_bytes": "big"}, "mesh": {"seeds": "a:1"}})
    assert any(e.startswith("server.max_body_bytes:") for e in errors)
    assert any(e.startswith("mesh.seeds:") for e in errors)


def test_negative_costs_and_limits() -> None:
    bad_model = {"name": "m", "openai_model": "m", "cost_per_1k_tokens": -1}
    errors = errors_of({
        "providers": {"up": {**OPENAI, "models": [bad_model]}},
        "budget": {"daily_limit": -5},
        "server": {"max_body_bytes": -1},
        "routing": {"failover": {"max_retries": -1}},
    })
    assert "providers.up.models[0].cost_per_1k_tokens: must be >= 0" in errors
    assert "budget.daily_limit: must be >= 0" in errors
    assert "server.max_body_bytes: must be > 0" in errors
    assert "routing.failover.max_retries: must be >= 0" in errors


def test_unknown_strategy() -> None:
    errors = errors_of({"routing": {"strategy": "cheapest"}})
    assert len(errors) == 1
    assert errors[0].startswith("routing.strategy: must be one of")
    assert "cheapest" in errors[0]


def test_fallback_chain_naming_a_missing_provider() -> None:
    errors = errors_of({"providers": {"up": OPENAI},
                        "routing": {"failover": {"fallback_chain": ["up", "ghost", "mesh"]}}})
    assert len(errors) == 1
    assert errors[0].startswith("routing.failover.fallback_chain[1]: no provider named 'ghost'")


def test_every_error_is_reported_at_once() -> None:
    errors = errors_of({"bogus": 1, "routing": {"strategy": "x"}, "server": {"shutdown_grace_s": -1}})
    assert len(errors) == 3


def test_env_expansion(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "node: {id: '${NODE_NAME}'}\n"
        "server: {listen_addr: '127.0.0.1:${PORT:-8123}'}\n"
        "mesh: {secret: '${MISSING}'}\n"
    )
    config = load_config(path, env={"NODE_NAME": "box-7"})
    assert config.node.id == "box-7"
    assert config.server.listen_addr == "127.0.0.1:8123"
    assert config.mesh.secret == ""
    assert load_config(path, env={"PORT": "9000"}).server.listen_addr == "127.0.0.1:9000"


def test_json_config_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"providers": {"up": OPENAI}}))
    config = load_config(path, env={}, overrides={"server.listen_addr": "127.0.0.1:0",
                                                  "node.id": "n1", "mesh.seeds": ["h:1"],
                                                  "logging.format": "json"})
    assert config.server.listen_addr == "127.0.0.1:0"
    assert config.node.id == "n1" and config.mesh.seeds == ["h:1"]
    assert config.logging.format == "json"


def test_check_config_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("mesh: {enabled: false}\n")
    assert meshnode_main(["check-config", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("bogus: 1\nrouting: {strategy: nope}\n")
    capsys.readouterr()
    assert meshnode_main(["check-config", str(bad)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "bogus: unknown key" in lines
    assert any(line.startswith("routing.strategy: ") for line in lines)
    assert meshnode_main(["check-config", str(tmp_path / "missing.yaml")]) == 2
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [\n")
    assert meshnode_main(["check-config", str(broken)]) == 2


def test_check_config_as_a_process(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: {max_body_bytes: -3}\n")
    result = subprocess.run([sys.executable, "-m", "meshnode", "check-config", str(bad)],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2
    assert "server.max_body_bytes: must be > 0" in result.stderr.splitlines()


def test_help_is_true() -> None:
    result = subprocess.run([sys.executable, "-m", "meshnode", "run", "--help"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0
    for flag in ("--config", "--listen", "--grpc-listen", "--seed", "--node-id", "--data-dir",
                 "--log-format"):
        assert flag in result.stdout


def test_run_refuses_an_invalid_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("routing: {failover: {fallback_chain: [ghost]}}\n")
    result = subprocess.run([sys.executable, "-m", "meshnode", "run", "--config", str(bad)],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2
    assert "routing.failover.fallback_chain[0]" in result.stderr


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"providers": {"openai": {"models": [{"name": "a", "anthropic_model": "x"}]}}},
         "providers.openai.models[0].anthropic_model: not valid for an openai provider"),
        ({"providers": {"openai": {"models": [{"name": "a"}, {"name": "a"}]}}},
         "providers.openai.models[1].name: 'a' is listed twice in this provider"),
        ({"providers": {"openai": {"models": [
            {"name": "a", "cost_per_1k_tokens": 1, "cost_per_1k_input": 2}]}}},
         "providers.openai.models[0]: give cost_per_1k_tokens, or cost_per_1k_input and "
         "cost_per_1k_output, not both"),
        ({"auth": {"keys": [{"name": "k", "key_sha256": "a" * 64},
                            {"name": "k", "key_sha256": "b" * 64}]}},
         "auth.keys[1].name: 'k' is listed twice"),
        ({"auth": {"keys": [{"name": "k", "key_sha256": "not-a-hash"}]}},
         "auth.keys[0].key_sha256: must be the key's SHA-256 as 64 hex characters"),
    ],
)
def test_ambiguous_or_duplicated_entries_are_errors(doc: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(doc)
    assert any(e.startswith(expected) for e in info.value.errors), info.value.errors


def test_a_yaml_syntax_error_is_one_line_naming_the_file_and_place(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("server:\n  listen_addr: [1, 2\nmesh: {}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    [error] = info.value.errors
    assert error.startswith(f"{path}: not valid YAML (line ") and "\n" not in error


def test_one_pass_lists_field_errors_and_name_errors_together() -> None:
    doc = {
        "providers": {"openai": {"models": [{"name": "a", "cost_per_1k_tokens": -1}]}},
        "routing": {"failover": {"fallback_chain": ["openai", "nowhere"]},
                    "policies": [{"name": "p", "allow": ["nobody"]}]},
    }
    with pytest.raises(ConfigError) as info:
        validate(doc)
    errors = info.value.errors
    assert "providers.openai.models[0].cost_per_1k_tokens: must be >= 0" in errors
    assert any(e.startswith("routing.failover.fallback_chain[1]: no provider named 'nowhere'")
               for e in errors)
    assert "routing.policies[0].allow[0]: no provider or kind named 'nobody'" in errors


def test_matryoshka_is_for_local_embedding_models_only() -> None:
    local = {"local": {"models": [
        {"name": "e", "builtin": "minilm", "kind": "embedding", "matryoshka": True},
        {"name": "c", "builtin": "smollm2", "kind": "chat", "matryoshka": True},
    ]}}
    assert errors_of({"providers": local}) == [
        "providers.local.models[1].matryoshka: only for embedding models"]
    cloud = {**OPENAI, "models": [{"name": "m", "openai_model": "m", "kind": "embedding",
                                   "matryoshka": True}]}
    (error,) = errors_of({"providers": {"up": cloud}})
    assert error.startswith("providers.up.models[0].matryoshka: for local models only")
