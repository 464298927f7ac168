"""`meshctl`: inspect a running mesh through one node's HTTP admin API (it talks HTTP, nothing
else).

    meshctl [--node URL] [--api-key KEY] [--json] peers|topology|models|route MODEL|stats|spend|top

`--node` defaults to `$MESHNODE_URL`, else http://127.0.0.1:8080; `--api-key` to
`$MESHNODE_API_KEY` (sent as `Authorization: Bearer`). Tables by default; `--json` prints stable
JSON whose schemas are in docs/meshctl.md:
- `peers --json`: `{"node": <asked node>, "peers": [<member>, ...]}`, the `/admin/mesh` members
  other than the asked node;
- `topology --json`: `{"node", "nodes": [<member>, ...], "models": {<model>: [<node id>, ...]}}`,
  every member and, per model, the live nodes that offer it;
- `models`, `route MODEL`, `stats`, `spend`: built in `meshctl_views`; `top`: `meshctl_top`.
`--json` may stand anywhere on the line.
Exit status (`meshctl_http.ExitCode`): 0 ok, 1 the node answered an error, 2 bad usage,
3 node unreachable, 4 auth refused, 5 not found.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from meshnode.cli import meshctl_top, meshctl_views
from meshnode.cli.meshctl_http import EXIT_CODES_HELP, MeshctlError, NodeClient, NotFound

DEFAULT_NODE = "http://127.0.0.1:8080"


def fetch(node: str, path: str, api_key: str | None, timeout: float = 10.0) -> Any:
    """GET one admin path as JSON; raises a `MeshctlError` subclass carrying the exit status."""
    return NodeClient(node, api_key, timeout).get(path)


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
            cost = (f"{meshctl_views.money(model['cost_per_1k_input'])}/"
                    f"{meshctl_views.money(model['cost_per_1k_output'])}"
                    " per 1k")
            extra = f"  ewma {lat['ewma_ms']:.1f} ms" if lat.get("ewma_ms") else ""
            branch.add(escape(f"{model['name']}  [{model['provider_kind']}]  {cost}{extra}"))
    return tree


# ------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshctl", description="Inspect a meshnode mesh through any node's HTTP API.",
        epilog=EXIT_CODES_HELP + ". JSON schemas: docs/meshctl.md.",
    )
    parser.add_argument("--node", default=os.environ.get("MESHNODE_URL", DEFAULT_NODE),
                        help="a node's HTTP address (env MESHNODE_URL; default %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("MESHNODE_API_KEY"),
                        help="an admin API key, when the node has auth on, sent as Bearer "
                             "(env MESHNODE_API_KEY)")
    # The same two options after the subcommand too (`meshctl peers --node URL`); SUPPRESS
    # keeps a value given before the subcommand when they are not repeated after it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--node", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--api-key", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--json", action="store_true", help="stable JSON output (docs/meshctl.md)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (("peers", "the peers this node knows"),
                       ("topology", "the mesh as a tree: every node, its links' RTT, its models"),
                       ("models", "which node and provider offers which model, at what price, "
                                  "warm or not"),
                       ("stats", "traffic per provider and model, budget spent and left"),
                       ("spend", "spend per API key and per node, today and this month")):
        sub.add_parser(name, help=text, parents=[common], epilog=EXIT_CODES_HELP)
    route = sub.add_parser("route", help="what the node would do for MODEL now, and why",
                           parents=[common], epilog=EXIT_CODES_HELP)
    route.add_argument("model", metavar="MODEL")
    top = sub.add_parser("top", help="a live full-screen view (q quits); a plain table every "
                         "interval when stdout is not a terminal", parents=[common],
                         epilog=EXIT_CODES_HELP + "; 130 after Ctrl-C")
    top.add_argument("--interval", type=float, default=1.0, metavar="S",
                     help="seconds between refreshes (default %(default)s)")
    top.add_argument("-n", "--iterations", type=int, default=None, metavar="N",
                     help="stop after N refreshes (default: until q; 1 with --json)")
    return parser


def _view(args: argparse.Namespace, client: NodeClient) -> Any:
    """What the subcommand prints: a JSON-able dict with --json, else a rich renderable."""
    if args.command in ("peers", "topology"):
        mesh = _mesh(client)
        if args.command == "peers":
            return peers_json(mesh) if args.json else peers_table(mesh)
        return topology_json(mesh) if args.json else topology_tree(mesh)
    if args.command == "models":
        models = meshctl_views.models_json(
            _mesh(client), client.get("/v1/models"), _health(client))
        return models if args.json else meshctl_views.models_table(models)
    if args.command == "route":
        explained = client.get("/admin/route", {"model": args.model})
        node = client.get("/health/live").get("node", "")
        route = meshctl_views.route_json(node, explained)
        return route if args.json else meshctl_views.route_view(route)
    if args.command == "spend":
        spend = meshctl_views.spend_json(client.get("/admin/spend"))
        return spend if args.json else meshctl_views.spend_view(spend)
    # stats
    try:
        budget = client.get("/admin/budget")
    except NotFound:
        budget = None
    stats = meshctl_views.stats_json(client.get("/admin/stats"), budget)
    return stats if args.json else meshctl_views.stats_view(stats)


def _mesh(client: NodeClient) -> dict[str, Any]:
    try:
        return dict(client.get("/admin/mesh"))
    except NotFound as exc:
        raise NotFound(f"{exc} (is mesh.enabled false on this node?)") from None


def _health(client: NodeClient) -> dict[str, Any]:
    """`/health/ready`: 503 (nothing ready) still carries each provider's readiness."""
    try:
        return client.get("/health/ready")
    except MeshctlError:
        return {}


def _pull_json(argv: list[str]) -> tuple[list[str], bool]:
    """`--json` may stand anywhere on the line (`meshctl --json peers`, `meshctl peers --json`,
    after a subcommand's own arguments): take it out before argparse sees the subcommands."""
    rest = [a for a in argv if a != "--json"]
    return rest, len(rest) != len(argv)


def main(argv: list[str] | None = None) -> int:
    argv, as_json = _pull_json(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    args.json = args.json or as_json
    if args.command == "top" and (args.interval <= 0 or (args.iterations or 1) < 1):
        print("meshctl: top: --interval must be > 0 and -n >= 1", file=sys.stderr)
        return 2
    client = NodeClient(args.node, args.api_key)
    try:
        if args.command == "top":
            if args.json:
                return meshctl_top.run_json(client, args.interval, args.iterations or 1)
            return meshctl_top.run_screen(client, args.interval, args.iterations)
        view = _view(args, client)
    except MeshctlError as exc:
        print(f"meshctl: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    if args.json:
        sys.stdout.write(json.dumps(view, indent=2, sort_keys=True) + "\n")
    else:
        # Piped output is not cut to 80 columns: addresses and ids must survive intact.
        Console(width=None if sys.stdout.isatty() else 200).print(view)
    return 0


if __name__ == "__main__":
    sys.exit(main())
