"""The `meshnode` command: `run` a node, `check-config` a file, manage `keys`.

This module only parses arguments, loads the config (flags override the file through
`load_config(overrides=...)`), sets up logging and the event loop (uvloop), and hands over to
`meshnode.node.Node`. It holds no serving logic. `meshctl` lives in `meshnode.cli.meshctl`.

Exit status: 0 on a clean run or a valid config, 2 on an invalid config or bad arguments,
1 when the node fails to start.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meshnode.config import Config, load_config
from meshnode.errors import ConfigError, StateFileError
from meshnode.memory import tune_for_serving

log = logging.getLogger("meshnode")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshnode",
        description="A federated peer-to-peer mesh of AI inference nodes that speaks the "
        "OpenAI API.",
    )
    parser.add_argument("--version", action="version", version=f"meshnode {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    run = commands.add_parser(
        "run",
        help="run a node",
        description="Run a node. With no config, the embedded default: HTTP 127.0.0.1:8080, the "
        "built-in local models, and each cloud provider whose key is in the environment. Flags "
        "override the file.",
    )
    run.add_argument("--config", "--aiproxy-config", dest="config", metavar="PATH",
                     help="YAML or JSON config file (--aiproxy-config is an alias)")
    run.add_argument("--listen", metavar="ADDR",
                     help="HTTP address HOST:PORT (server.listen_addr); port 0 picks a free one")
    run.add_argument("--grpc-listen", metavar="ADDR", help="gRPC address (mesh.listen_addr)")
    run.add_argument("--seed", action="append", metavar="HOST:PORT", dest="seeds",
                     help="a peer to join through (mesh.seeds); repeat for several")
    run.add_argument("--node-id", metavar="ID", help="this node's id (node.id)")
    run.add_argument("--data-dir", metavar="DIR", help="state directory (node.data_dir)")
    run.add_argument("--log-format", choices=("json", "text"), help="logging.format")
    run.add_argument("--insecure", action="store_true", default=None,
                     help="allow a mesh without mesh.secret or mesh.tls beyond loopback, or "
                     "under auth.enabled (mesh.insecure; docs/security.md)")
    run.add_argument("--reset-ledger", action="store_true",
                     help="start a new spend ledger at $0 when data_dir's spend.db is missing, "
                     "empty or damaged (the old files are kept as spend.db.broken-*)")

    check = commands.add_parser(
        "check-config",
        help="validate a config file",
        description="Validate a config file: exit 0 when valid, else exit 2 listing every "
        "error as `path: message`, one per line.",
    )
    check.add_argument("path", metavar="PATH")

    from meshnode.governance.cli import add_keys_parser

    add_keys_parser(commands)  # keys create|list|revoke
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("meshnode")
    except PackageNotFoundError:  # pragma: no cover - run from a tree that was never installed
        return "unknown"


def run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Dotted config paths set by `run` flags (None means: keep the file's value)."""
    return {
        "server.listen_addr": args.listen,
        "mesh.listen_addr": args.grpc_listen,
        "mesh.seeds": args.seeds,
        "node.id": args.node_id,
        "node.data_dir": args.data_dir,
        "logging.format": args.log_format,
        "mesh.insecure": args.insecure,
    }


def _print_errors(errors: Sequence[str]) -> None:
    for error in errors:
        print(error, file=sys.stderr)


def check_config(path: str) -> int:
    unset: list[str] = []
    try:
        config = load_config(Path(path), unset=unset)
    except ConfigError as exc:
        _print_errors(exc.errors)
        return EXIT_INVALID
    errors = startup_errors(config)
    if errors:
        _print_errors(errors)
        return EXIT_INVALID
    for where in unset:  # valid, but `run` in this environment would see an empty value
        print(f"warning: {where} is not set in this environment", file=sys.stderr)
    print(f"{path}: valid")
    return EXIT_OK


def startup_errors(config: Config) -> list[str]:
    """What `meshnode run` refuses to start on beyond the config model's own checks, so that
    `check-config` never calls valid a file that `run` rejects: each provider's build-time
    checks (an unknown built-in model, a missing model directory, a bad device) and the mesh's
    security (an unauthenticated mesh beyond loopback or under auth, unreadable TLS files). Nothing is
    started: adapters open sessions and spawn workers only in `start()`."""
    from meshnode.providers.registry import ProviderContext, build_provider

    errors: list[str] = []
    ctx = ProviderContext(node_id=config.node.id or "check-config",
                          data_dir=config.node.data_dir, timeouts=config.routing.timeouts)
    for resolved in config.resolved_providers():
        try:
            build_provider(resolved, ctx)
        except ConfigError as exc:
            errors.extend(exc.errors)
        except ImportError as exc:
            errors.append(f"providers.{resolved.name}: the {resolved.type} adapter cannot be "
                          f"loaded ({exc})")
    if config.mesh.enabled:
        from meshnode.rpc.security import MeshSecurity

        try:
            MeshSecurity.from_config(config.mesh, auth_enabled=config.auth.enabled)
        except ConfigError as exc:
            errors.extend(exc.errors)
    return errors


def run(args: argparse.Namespace) -> int:
    from meshnode.observability.logging import (
        capture_native_stderr,
        configure_logging,
        log_config_errors,
    )

    unset: list[str] = []
    try:
        config = load_config(args.config, overrides=run_overrides(args), unset=unset)
    except ConfigError as exc:
        # The file's logging.format is unknown when the file is refused: the flag decides.
        log_config_errors(args.log_format or "text", exc.errors)
        return EXIT_INVALID
    if config.logging.format == "json":
        capture_native_stderr()  # gRPC's C core writes to fd 2 itself
    configure_logging(config.logging.format, config.logging.level)
    for where in unset:
        path, _, var = where.partition(": ")
        log.warning("config: %s (in %s) is not set in the environment; it expanded to an "
                    "empty string", var, path)
    return _serve(config, embedded_default=args.config is None, reset_ledger=args.reset_ledger)


def _serve(config: Config, *, embedded_default: bool, reset_ledger: bool = False) -> int:
    from meshnode.node import Node
    from meshnode.observability.logging import log_config_errors

    try:
        node = Node(config, embedded_default=embedded_default, reset_ledger=reset_ledger)
    except ConfigError as exc:
        log_config_errors(config.logging.format, exc.errors)
        return EXIT_INVALID
    except StateFileError as exc:
        log.error("cannot start: %s", exc.message)
        return EXIT_FAILED
    tune_for_serving()
    try:
        return _event_loop_run(node.run_until_signal())
    except OSError as exc:
        # Typically the address is in use; say so plainly rather than with a traceback.
        log.error("cannot start: %s", exc)
        return EXIT_FAILED


def _event_loop_run(coro: Any) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return int(asyncio.run(coro))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return int(runner.run(coro))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        return check_config(args.path)
    if args.command == "run":
        return run(args)
    if args.command == "keys":
        from meshnode.governance.cli import run_keys

        return run_keys(args)
    return EXIT_INVALID  # pragma: no cover - argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
