"""`python -m meshnode.cli.healthcheck`: the container's HEALTHCHECK, on the port the node
really listens on.

The URL is `$MESHNODE_HEALTH_URL` when set; otherwise it is built from the config the
entrypoint runs (`--config PATH`, else `$MESHNODE_CONFIG` when that file exists, else the one
quickstart wrote, `$MESHNODE_DATA_DIR/generated-config.yaml`), whose `server.listen_addr` is
read with the same environment the node expands it with (a wildcard host is probed on
loopback). Exit 0 when `GET /health/live` answers 200 within 4 s, else 1 with one line saying
why. It never starts anything and reads nothing but the config file.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from meshnode.config import load_config
from meshnode.errors import ConfigError
from meshnode.mesh.seeds import join_host_port, split_host_port

DEFAULT_CONFIG = "/etc/meshnode/meshnode.yaml"
DEFAULT_DATA_DIR = "/var/lib/meshnode"
_WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def config_path(env: Mapping[str, str], given: str | None = None) -> Path:
    """The config the entrypoint runs (deploy/docker/entrypoint.sh picks it the same way)."""
    if given:
        return Path(given)
    mounted = Path(env.get("MESHNODE_CONFIG", DEFAULT_CONFIG))
    if mounted.is_file():
        return mounted
    return Path(env.get("MESHNODE_DATA_DIR", DEFAULT_DATA_DIR)) / "generated-config.yaml"


def health_url(env: Mapping[str, str], given: str | None = None) -> str:
    if env.get("MESHNODE_HEALTH_URL"):
        return env["MESHNODE_HEALTH_URL"]
    config = load_config(config_path(env, given), env=env)
    host, port = split_host_port(config.server.listen_addr)
    if host in _WILDCARDS:
        host = "127.0.0.1"
    return f"http://{join_host_port(host, port)}/health/live"


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshnode.cli.healthcheck",
                                     description="Probe the local node's /health/live.")
    parser.add_argument("--config", metavar="PATH", help="the node's config file")
    args = parser.parse_args(argv)
    env = os.environ if env is None else env
    try:
        url = health_url(env, args.config)
    except (ConfigError, OSError) as exc:
        detail = "; ".join(exc.errors) if isinstance(exc, ConfigError) else str(exc)
        print(f"healthcheck: cannot read the node's config: {detail}", file=sys.stderr)
        return 1
    try:
        with urllib.request.urlopen(url, timeout=4) as response:  # noqa: S310 - our own node
            ok = response.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
