"""Shared pieces of the mesh benchmarks: start a meshnode process with the mesh on, read
`/admin/mesh`. Processes live in a `bench.procs.ProcessSet`, so none outlives the run."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from bench.procs import ProcessSet
from bench.targets import REPO, Target, meshnode_argv, meshnode_config, node_env

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def start_mesh_node(
    procs: ProcessSet,
    name: str,
    work_dir: Path,
    *,
    backend_url: str | None,
    seeds: list[str],
    cores: set[int] | None = None,
    mesh: dict[str, Any] | None = None,
) -> tuple[Target, str]:
    """A node with the mesh on (gRPC on port 0), serving the bench backend when given.
    Returns its target and its gRPC address."""
    config = meshnode_config(backend_url or "http://127.0.0.1:9", 0, 0, work_dir / f"{name}-data")
    config["node"]["id"] = name
    config["mesh"] = {
        "enabled": True,
        "listen_addr": "127.0.0.1:0",
        "mdns": False,
        "seeds": seeds,
        **(mesh or {}),
    }
    if backend_url is None:
        config["providers"] = {"local": {"enabled": False}}
        config["routing"] = {"failover": {"fallback_chain": ["mesh"]}}
    else:
        config["routing"] = {"failover": {"fallback_chain": ["backend", "mesh"]}}
    path = work_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [*meshnode_argv(None), "run", "--config", str(path), "--listen", "127.0.0.1:0"]
    managed = procs.start(name, argv, cores=cores, env=node_env(REPO), cwd=REPO)
    url = managed.wait_for_line(r"^MESHNODE_HTTP=(http://\S+?)/?$", 60).group(1)
    grpc = managed.wait_for_line(r"^MESHNODE_GRPC=(\S+)$", 60).group(1)
    return Target(name, url, managed), grpc


def mesh_view(url: str, timeout: float = 2.0) -> dict[str, str]:
    """{member id: status} as the node at `url` sees it."""
    with _OPENER.open(url + "/admin/mesh", timeout=timeout) as resp:
        body = json.loads(resp.read())
    return {m["id"]: m["status"] for m in body["members"]}


def own_capacity(url: str, timeout: float = 2.0) -> dict[str, Any]:
    """The capacity the node at `url` gossips of itself (`/admin/mesh`, its own member)."""
    with _OPENER.open(url + "/admin/mesh", timeout=timeout) as resp:
        body = json.loads(resp.read())
    return next((m.get("capacity") or {} for m in body["members"] if m.get("self")), {})
