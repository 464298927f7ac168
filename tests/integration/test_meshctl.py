"""meshctl against a real three-node mesh (real node processes, meshctl run as a real process).

Node a (the seed, auth on) offers m1; b offers m2 and shared; c offers shared. Traffic goes
through a first, so `stats` has rows. Every subcommand is run as a table and as `--json`; the
JSON is validated against the schemas in docs/meshctl.md (the very blocks a reader sees) and
its content checked against what the mesh is. Then the exit codes: unreachable 3, refused key 4,
unknown model 5, bad usage 2.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kit.node_proc import REPO_ROOT, NodeProcess
from tests.kit.three_nodes import ADMIN_SECRET, DAILY_LIMIT, USER_SECRET, ThreeNodes
from tests.kit.wait import wait_for_sync

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the dev extra")
referencing = pytest.importorskip("referencing", reason="installed with jsonschema")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DOCS = REPO_ROOT / "docs" / "meshctl.md"
_SCHEMA_BLOCK = re.compile(r"<!-- schema: (\w+) -->\s*```json\n(.*?)```", re.S)


def documented_schemas() -> dict[str, dict[str, Any]]:
    return {name: json.loads(body) for name, body in _SCHEMA_BLOCK.findall(DOCS.read_text())}


SCHEMAS = documented_schemas()
REGISTRY = referencing.Registry().with_resources(
    (schema["$id"], referencing.Resource.from_contents(schema)) for schema in SCHEMAS.values()
)


def validate(name: str, document: Any) -> None:
    validator = jsonschema.Draft202012Validator(SCHEMAS[name], registry=REGISTRY)
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def meshctl(*args: str, node: str | None = None, key: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    child_env = {k: v for k, v in os.environ.items()
                 if k not in ("MESHNODE_URL", "MESHNODE_API_KEY")}
    child_env["PYTHONPATH"] = str(REPO_ROOT)
    child_env.update(env or {})
    argv = [sys.executable, "-m", "meshnode.cli.meshctl"]
    if node is not None:
        argv += ["--node", node]
    if key is not None:
        argv += ["--api-key", key]
    return subprocess.run([*argv, *args], capture_output=True, text=True, env=child_env,
                          cwd=REPO_ROOT, timeout=60, check=False)


def ok_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreeNodes]:
    with ThreeNodes(tmp_path_factory.mktemp("meshctl"), auth_on_a=True) as nodes:
        for model in ("m1", "m2", "shared", "shared", "shared"):
            nodes.chat("a", model)
        # b's and c's latency for `shared` reaches a by gossip; wait so `models` shows it.
        wait_for_sync(lambda: any(
            m["latency"].get("shared") for m in nodes.get("a", "/admin/mesh")["members"]
            if m["id"] in ("b", "c")), "a knows a peer's latency for shared")
        yield nodes


def test_the_documented_schemas_are_all_there() -> None:
    assert set(SCHEMAS) == {"member", "peers", "topology", "models", "route", "stats", "spend",
                            "top"}
    for schema in SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)


# --------------------------------------------------------------------------- --json
def test_peers_json(mesh: ThreeNodes) -> None:
    # RTTs appear once a probe of each peer has been answered: wait for that, then read.
    wait_for_sync(
        lambda: all(p["rtt_ms"] is not None for p in ok_json(
            meshctl("peers", "--json", node=mesh.a.url, key=ADMIN_SECRET))["peers"]),
        "a has probed both peers")
    out = ok_json(meshctl("peers", "--json", node=mesh.a.url, key=ADMIN_SECRET))
    validate("peers", out)
    assert out["node"] == "a"
    assert {p["id"]: p["status"] for p in out["peers"]} == {"b": "alive", "c": "alive"}
    assert all(p["rtt_ms"] is not None for p in out["peers"])


def test_topology_json(mesh: ThreeNodes) -> None:
    out = ok_json(meshctl("topology", "--json", node=mesh.a.url, key=ADMIN_SECRET))
    validate("topology", out)
    assert [n["id"] for n in out["nodes"]] == ["a", "b", "c"]
    assert out["models"] == {"m1": ["a"], "m2": ["b"], "shared": ["b", "c"]}


def test_models_json(mesh: ThreeNodes) -> None:
    out = ok_json(meshctl("models", "--json", node=mesh.a.url, key=ADMIN_SECRET))
    validate("models", out)
    rows = {(r["model"], r["node"]): r for r in out["models"]}
    assert set(rows) == {("m1", "a"), ("m2", "b"), ("shared", "b"), ("shared", "c")}
    assert rows[("m1", "a")]["self"] is True
    assert rows[("m1", "a")]["providers"] == ["upstream"]
    assert rows[("shared", "c")]["providers"] == ["mesh:c"]
    assert all(r["warm"] and r["status"] == "alive" for r in rows.values())
    assert all(r["cost_per_1k_input"] == 0.001 for r in rows.values())
    assert any(rows[("shared", n)]["latency_ewma_ms"] for n in ("b", "c"))


def test_route_json(mesh: ThreeNodes) -> None:
    out = ok_json(meshctl("route", "shared", "--json", node=mesh.a.url, key=ADMIN_SECRET))
    validate("route", out)
    assert out["node"] == "a" and out["model"] == "shared"
    assert out["strategy"] == "cost_optimized"
    assert sorted(c["node"] for c in out["candidates"]) == ["b", "c"]
    assert [c["rank"] for c in out["candidates"]] == [1, 2]
    assert out["winner"] == {"provider": out["candidates"][0]["provider"],
                             "node": out["candidates"][0]["node"]}
    assert "cost_optimized" in out["why"]


def test_stats_json(mesh: ThreeNodes) -> None:
    out = ok_json(meshctl("stats", "--json", node=mesh.a.url, key=ADMIN_SECRET))
    validate("stats", out)
    rows = {(r["provider"], r["model"]): r for r in out["providers"]}
    assert rows[("upstream", "m1")]["requests"] == 1
    assert rows[("mesh:b", "m2")]["requests"] == 1
    shared = [r for (p, m), r in rows.items() if m == "shared"]
    assert sum(r["requests"] for r in shared) == 3
    assert out["totals"]["requests"] == 5 and out["totals"]["errors"] == 0
    assert out["totals"]["cost"] > 0
    budget = out["budget"]
    assert budget["daily_limit"] == DAILY_LIMIT
    assert budget["spent_today"] > 0
    assert budget["left_today"] == pytest.approx(DAILY_LIMIT - budget["spent_today"])


def test_top_json_prints_one_snapshot_per_refresh(mesh: ThreeNodes) -> None:
    result = meshctl("top", "--json", "-n", "2", "--interval", "0.1", node=mesh.a.url,
                     key=ADMIN_SECRET)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    for line in lines:
        snapshot = json.loads(line)
        validate("top", snapshot)
        assert [n["id"] for n in snapshot["nodes"]] == ["a", "b", "c"]
        assert snapshot["stats"]["totals"]["requests"] == 5


def test_json_may_stand_anywhere_on_the_line(mesh: ThreeNodes) -> None:
    first = ok_json(meshctl("--json", "peers", node=mesh.b.url))
    validate("peers", first)
    assert {p["id"] for p in first["peers"]} == {"a", "c"}
    routed = ok_json(meshctl("--json", "route", "shared", node=mesh.a.url, key=ADMIN_SECRET))
    validate("route", routed)
    after = ok_json(meshctl("route", "shared", "--node", mesh.a.url, "--json",
                            key=ADMIN_SECRET))
    assert after["model"] == routed["model"] == "shared"


def test_spend_json_per_key_and_per_node(mesh: ThreeNodes) -> None:
    out = ok_json(meshctl("spend", "--json", node=mesh.a.url, key=ADMIN_SECRET))
    validate("spend", out)
    keys = {k["key"]: k for k in out["keys"]}
    assert set(keys) == {"ops", "ci"}  # both configured keys, spent or not
    assert keys["ops"]["today"] > 0 and set(keys["ops"]["nodes"]) == {"a"}
    assert keys["ci"]["today"] == 0 and keys["ci"]["nodes"] == {}
    assert {n["node"] for n in out["nodes"]} >= {"a"}
    assert out["total"]["today"] == pytest.approx(sum(n["today"] for n in out["nodes"]))
    budget = ok_json(meshctl("stats", "--json", node=mesh.a.url, key=ADMIN_SECRET))["budget"]
    assert out["total"]["today"] == pytest.approx(budget["spent_today"])
    table = meshctl("spend", node=mesh.a.url, key=ADMIN_SECRET)
    assert table.returncode == 0, table.stderr
    for text in ("spend per API key", "ops", "ci", "spend per node", "total"):
        assert text in table.stdout


def test_top_prints_plain_tables_when_stdout_is_not_a_terminal(mesh: ThreeNodes) -> None:
    # stdout is a pipe here: no screen to redraw, so a plain block per refresh.
    result = meshctl("top", "-n", "2", "--interval", "0.1", node=mesh.a.url, key=ADMIN_SECRET)
    assert result.returncode == 0, result.stderr
    headers = [line for line in result.stdout.splitlines() if line.startswith("--- ")]
    assert len(headers) == 2 and all("meshctl top a (" in h and "3/3 nodes alive" in h
                                     for h in headers)
    assert "\x1b" not in result.stdout  # no escape codes in a file or a pipe
    for text in ("nodes", "traffic by provider and model", "mesh:b", "budget"):
        assert text in result.stdout


def test_the_grpc_port_is_named_not_a_traceback(mesh: ThreeNodes) -> None:
    grpc_addr = mesh.a.announced["MESHNODE_GRPC"]
    result = meshctl("peers", node=f"http://{grpc_addr}")
    assert result.returncode == 3 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "this is a gRPC port" in lines[0], result.stderr
    assert "server.listen_addr" in lines[0]


# --------------------------------------------------------------------------- tables
@pytest.mark.parametrize(("args", "expected"), [
    (["peers"], ["peers of a", "b", "c", "alive"]),
    (["topology"], ["mesh seen from a", "a (this node)", "rtt", "shared", "m2"]),
    (["models"], ["models in the mesh", "m1", "upstream", "mesh:b", "mesh:c", "warm"]),
    (["route", "shared"], ["route for shared on a", "cost_optimized", "why:", "mesh"]),
    (["stats"], ["traffic through a", "mesh:b", "upstream", "total", "budget", "left"]),
])
def test_tables(mesh: ThreeNodes, args: list[str], expected: list[str]) -> None:
    # MESHNODE_URL and MESHNODE_API_KEY instead of flags: the environment is honoured.
    result = meshctl(*args, env={"MESHNODE_URL": mesh.a.url, "MESHNODE_API_KEY": ADMIN_SECRET})
    assert result.returncode == 0, result.stderr
    for text in expected:
        assert text in result.stdout, (text, result.stdout)
    assert not result.stdout.lstrip().startswith("{")


def test_options_after_the_subcommand_and_a_bare_host_port(mesh: ThreeNodes) -> None:
    host_port = mesh.b.url.removeprefix("http://")
    out = ok_json(meshctl("peers", "--json", "--node", host_port))
    assert out["node"] == "b"
    assert {p["id"] for p in out["peers"]} == {"a", "c"}


# --------------------------------------------------------------------------- exit codes
def test_unreachable_node_exits_3(mesh: ThreeNodes, tmp_path: Path) -> None:
    for args in (["peers"], ["stats", "--json"], ["top"], ["route", "m1"]):
        result = meshctl(*args, node="http://127.0.0.1:9")
        assert result.returncode == 3, (args, result)
        assert result.stdout == ""
        assert result.stderr.startswith("meshctl: ") and "cannot reach" in result.stderr


@pytest.mark.parametrize("key", [None, "sk-wrong-key-0000000000000000", USER_SECRET])
def test_refused_key_exits_4(mesh: ThreeNodes, key: str | None) -> None:
    for args in (["peers", "--json"], ["stats"], ["top", "--json"]):
        result = meshctl(*args, node=mesh.a.url, key=key)
        assert result.returncode == 4, (args, result)
        assert result.stdout == ""
        assert ("HTTP 403" if key == USER_SECRET else "HTTP 401") in result.stderr
        assert "--api-key" in result.stderr
        if key:
            assert key not in result.stderr


def test_unknown_model_exits_5(mesh: ThreeNodes) -> None:
    result = meshctl("route", "no-such-model", node=mesh.a.url, key=ADMIN_SECRET)
    assert result.returncode == 5, result
    assert "no-such-model" in result.stderr


def test_bad_usage_exits_2_and_help_documents_the_exit_codes() -> None:
    assert meshctl("nonsense").returncode == 2
    assert meshctl("route").returncode == 2  # MODEL missing
    assert meshctl("top", "--interval", "0").returncode == 2
    help_text = meshctl("--help")
    assert help_text.returncode == 0
    text = " ".join(help_text.stdout.split())
    for phrase in ("3 node unreachable", "4 auth refused", "5 not found", "MESHNODE_URL",
                   "MESHNODE_API_KEY", "top"):
        assert phrase in text, phrase


def test_a_node_without_mesh_exits_5_for_the_mesh_views_and_still_has_stats(
    mesh: ThreeNodes, tmp_path: Path
) -> None:
    config = {"mesh": {"enabled": False, "mdns": False}, "providers": {"upstream": {
        "type": "openai_compatible", "base_url": mesh.fake.base_url,
        "credentials": {"api_key": "sk-upstream"},
        "models": [{"name": "m1", "openai_model": "m1", "cost_per_1k_tokens": 0.001}]}}}
    with NodeProcess(config, tmp_path, name="alone") as alone:
        for args in (["peers"], ["topology", "--json"], ["models"]):
            result = meshctl(*args, node=alone.url)
            assert result.returncode == 5, (args, result)
            assert "mesh.enabled" in result.stderr
        validate("stats", ok_json(meshctl("stats", "--json", node=alone.url)))
        top = ok_json(meshctl("top", "--json", node=alone.url))
        validate("top", top)
        assert top["nodes"] == []
