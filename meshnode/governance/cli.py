"""`meshnode keys create|list|revoke`: manage API keys in `keys.db` in data_dir.

These commands open the key store directly (no running node needed); a running node re-reads
the store within about a second of a change. `create` prints the secret once, alone on stdout
(so `KEY=$(meshnode keys create --name ci)` works), and a note on stderr; only its SHA-256 is
stored. `--json` prints machine-readable output instead. Exit status: 0 done, 1 refused (a name
in use, an unknown key), 2 invalid config or arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from meshnode.config import Config, load_config
from meshnode.errors import ConfigError, MeshError, StateFileError
from meshnode.governance.keys import KeyRecord, KeyStore
from meshnode.governance.service import KEYS_FILE

EXIT_OK, EXIT_REFUSED, EXIT_INVALID = 0, 1, 2


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "--aiproxy-config", dest="config", metavar="PATH",
                        help="the node's config file (for data_dir and config keys)")
    parser.add_argument("--data-dir", metavar="DIR", help="state directory (node.data_dir)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def add_keys_parser(commands: Any) -> None:
    """Add `keys` to the `meshnode` subcommands (`commands` is argparse's subparsers)."""
    keys = commands.add_parser(
        "keys", help="manage API keys",
        description="Create, list and revoke API keys. The secret (sk-...) is printed once; "
        "only its SHA-256 is stored. A running node honours changes within seconds.",
    )
    sub = keys.add_subparsers(dest="keys_command", metavar="create|list|revoke")
    sub.required = True
    create = sub.add_parser("create", help="create a key and print its secret once")
    create.add_argument("--name", required=True)
    create.add_argument("--rpm", type=int, metavar="N", help="requests per minute")
    create.add_argument("--tpm", type=int, metavar="N", help="tokens per minute")
    create.add_argument("--daily-limit", type=float, metavar="USD", help="daily budget")
    create.add_argument("--monthly-limit", type=float, metavar="USD", help="monthly budget")
    create.add_argument("--models", metavar="M,...", help="the only models it may use")
    create.add_argument("--admin", action="store_true", help="may read /admin/* and manage keys")
    _common(create)
    listing = sub.add_parser("list", help="list keys (never their secrets or hashes)")
    _common(listing)
    revoke = sub.add_parser("revoke", help="revoke a key")
    revoke.add_argument("name")
    _common(revoke)


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config, overrides={"node.data_dir": args.data_dir})


def _describe(record: KeyRecord) -> str:
    def show(value: object, unit: str = "") -> str:
        return "-" if value is None else f"{unit}{value}"

    models = ",".join(record.models) if record.models is not None else "*"
    state = "revoked" if record.revoked else "active"
    return (f"{record.name:<20} {'admin' if record.admin else 'user':<6} {state:<8} "
            f"{show(record.rpm):>7} {show(record.tpm):>9} {show(record.daily_limit, '$'):>9} "
            f"{show(record.monthly_limit, '$'):>9}  {record.source:<7} {models}")


def run_keys(args: argparse.Namespace) -> int:
    try:
        config = _load(args)
    except ConfigError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return EXIT_INVALID
    store = KeyStore(Path(config.node.data_dir) / KEYS_FILE, config.auth.keys, node_id="cli",
                     authorized=config.auth.enabled)
    try:
        store.open()
    except StateFileError as exc:
        print(f"meshnode keys: {exc.message}", file=sys.stderr)
        return EXIT_REFUSED
    # The node on this data_dir runs with auth on (it says so in keys.db): what its operator
    # writes here is authorised, whichever config this command was given.
    store.authorize_writes(config.auth.enabled or store.node_auth())
    try:
        return _dispatch(args, store, config)
    except MeshError as exc:
        print(f"meshnode keys: {exc.message}", file=sys.stderr)
        return EXIT_REFUSED
    finally:
        store.close()


def _dispatch(args: argparse.Namespace, store: KeyStore, config: Config) -> int:
    if args.keys_command == "create":
        models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
        record, secret = store.create(
            args.name, rpm=args.rpm, tpm=args.tpm, daily_limit=args.daily_limit,
            monthly_limit=args.monthly_limit, models=models, admin=args.admin,
        )
        if args.json:
            _print_json({**record.public(), "key": secret})
        else:
            print(secret)
            print(f"created key '{record.name}'. This is the only time its secret is shown: "
                  "store it now (only its SHA-256 is kept).", file=sys.stderr)
        if not record.authorized:
            print("note: auth.enabled is false in this config: keys are not checked until "
                  "it is turned on, and this key stays on this node (peers accept key records "
                  "only from nodes with auth on).", file=sys.stderr)
        return EXIT_OK
    if args.keys_command == "list":
        records = store.records()
        if args.json:
            _print_json({"object": "list", "data": [r.public() for r in records]})
        else:
            print(f"{'NAME':<20} {'ROLE':<6} {'STATE':<8} {'RPM':>7} {'TPM':>9} {'DAILY':>9} "
                  f"{'MONTHLY':>9}  {'SOURCE':<7} MODELS")
            for record in records:
                print(_describe(record))
        return EXIT_OK
    if args.keys_command == "revoke":
        record = store.revoke(args.name)
        if args.json:
            _print_json(record.public())
        else:
            print(f"revoked key '{record.name}'")
        return EXIT_OK
    return EXIT_INVALID  # pragma: no cover - argparse requires a subcommand


def _print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m meshnode.governance.cli keys ...` (the same as `meshnode keys ...`)."""
    parser = argparse.ArgumentParser(prog="meshnode")
    add_keys_parser(parser.add_subparsers(dest="command", required=True))
    return run_keys(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
