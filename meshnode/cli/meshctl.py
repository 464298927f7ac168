"""`meshctl`: inspect a running mesh through one node's HTTP admin API (it talks HTTP, nothing
else).

    meshctl [--node URL] [--api-key KEY] peers|topology [--json]

`--node` defaults to `$MESHNODE_URL`, else http://127.0.0.1:8080; `--api-key` to
`$MESHNODE_API_KEY`. Tables by default; `--json` prints stable JSON (documented in docs/mesh.md):
- `peers --json`: `{"node": <asked node>, "peers": [<member>, ...]}`, the `/admin/mesh` members
  other than the asked node;
- `topology --json`: `{"node", "nodes": [<member>, ...], "models": {<model>: [<node id>, ...]}}`,
  every member and, per model, the live nodes that offer it.
Exit status: 0 done, 1 the node could not be asked, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

DEFAULT_NODE = "http://127.0.0.1:8080"


class MeshctlError(Exception):
    """The node could not be asked, or answered something else than expected."""


def fetch(node: str, path: str, api_key: str | None, timeout: float = 10.0) -> Any:
    request = urllib.request.Request(node.rstrip("/") + path, method="GET")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = ""
        try:
            detail = json.loads(exc.read()).get("error", {}).get("message", "")
        except (ValueError, AttributeError):
            pass
        raise MeshctlError(f"{node}{path}: HTTP {exc.code} {detail}".rstrip()) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise MeshctlError(f"{node}{path}: {exc}") from None


# ------------------------------------------------------------------------------ views
def peers_json(mesh: dict[str, Any]) -> dict[str, Any]:
    return {"node": mesh["node"], "peers": [m for m in mesh["members"] if not m.get("self")]}


def topology_json(mesh: dict[str, Any]) -> dict[str, Any]:
    models: dict[str, list[str]] = {}
    for member in mesh["members"]:
        if member["status"] != "alive":
            continue
        for model in member.get("models", []):
            holders = models.setdefault(model["name"], [])
            if member["id"] not in holders:
                holders.append(member["id"])
    return {
        "node": mesh["node"],
        "nodes": mesh["members"],
        "models": {k: sorted(v) for k, v in sorted(models.items())},
    }


_STATUS_STYLE = {"alive": "green", "suspect": "yellow", "dead": "red", "left": "dim"}


def _load(member: dict[str, Any]) -> str:
    cap = member.get("capacity") or {}
    total = cap.get("slots_total") or 0
    if not total:
        return "-"
    busy = total - (cap.get("slots_free") or 0) + (cap.get("queue_depth") or 0)
    return f"{busy}/{total}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def peers_table(mesh: dict[str, Any]) -> Table:
    table = Table(title=f"peers of {mesh['node']}")
    for column in ("NODE", "STATUS", "GRPC", "HTTP", "INC", "MODELS", "LOAD", "RTT ms",
                   "HEARD s ago"):
        table.add_column(column)
    for m in peers_json(mesh)["peers"]:
        style = _STATUS_STYLE.get(m["status"], "")
        table.add_row(
            escape(m["id"]),
            f"[{style}]{m['status']}[/]" if style else m["status"],
            m["addresses"].get("grpc", ""),
            m["addresses"].get("http", "") or "-",
            str(m["incarnation"]),
            str(len(m.get("models", []))),
            _load(m),
            _ms(m.get("rtt_ms")),
            f"{m.get('last_heard_s', 0):.1f}",
        )
    return table


def topology_tree(mesh: dict[str, Any]) -> Tree:
    tree = Tree(f"mesh seen from [bold]{escape(mesh['node'])}[/]")
    for m in mesh["members"]:
        style = _STATUS_STYLE.get(m["status"], "")
        me = " (this node)" if m.get("self") else ""
        branch = tree.add(
            f"[bold]{escape(m['id'])}[/]{me} [{style}]{m['status']}[/] "
            f"{escape(m['addresses'].get('grpc', ''))}"
            f"  load {_load(m)}  rtt {_ms(m.get('rtt_ms'))} ms"
        )
        latency = m.get("latency", {})
        for model in m.get("models", []):
            lat = latency.get(model["name"], {})
            cost = f"${model['cost_per_1k_input']:g}/${model['cost_per_1k_output']:g} per 1k"
            extra = f"  ewma {lat['ewma_ms']:.1f} ms" if lat.get("ewma_ms") else ""
            branch.add(escape(f"{model['name']}  [{model['provider_kind']}]  {cost}{extra}"))
    return tree


# ------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshctl", description="Inspect a meshnode mesh.")
    parser.add_argument("--node", default=os.environ.get("MESHNODE_URL", DEFAULT_NODE),
                        help="a node's HTTP address (env MESHNODE_URL)")
    parser.add_argument("--api-key", default=os.environ.get("MESHNODE_API_KEY"),
                        help="an admin API key, when the node has auth on")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("peers", "the peers this node knows"),
                       ("topology", "every node and the models it offers")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--json", action="store_true", help="stable JSON output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        mesh = fetch(args.node, "/admin/mesh", args.api_key)
    except MeshctlError as exc:
        print(f"meshctl: {exc}", file=sys.stderr)
        return 1
    if args.command == "peers":
        view: Any = peers_json(mesh) if args.json else peers_table(mesh)
    else:
        view = topology_json(mesh) if args.json else topology_tree(mesh)
    if args.json:
        sys.stdout.write(json.dumps(view, indent=2, sort_keys=True) + "\n")
    else:
        # Piped output is not cut to 80 columns: addresses and ids must survive intact.
        Console(width=None if sys.stdout.isatty() else 200).print(view)
    return 0


if __name__ == "__main__":
    sys.exit(main())
