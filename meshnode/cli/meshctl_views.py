"""meshctl's `models`, `route` and `stats` views: the node's admin answers turned into the stable
JSON documented in docs/meshctl.md, and into rich tables.

Pure functions over decoded JSON: no HTTP here (`meshctl_http` fetches), no printing
(`meshctl` prints). The JSON builders project the node's answers onto the documented fields
only, so a field the node adds later does not change meshctl's output.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

STATUS_STYLE = {"alive": "green", "suspect": "yellow", "dead": "red", "left": "dim"}


def money(value: float | None) -> str:
    """USD to 6 significant digits, never in exponent form: `$0.000028`, not `$2.8e-05`."""
    if value is None:
        return "-"
    return "$" + format(Decimal(f"{value:.6g}"), "f")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def status_text(status: str) -> str:
    style = STATUS_STYLE.get(status, "")
    return f"[{style}]{escape(status)}[/]" if style else escape(status)


# ------------------------------------------------------------------------------ models
def _warm(member: dict[str, Any], model: dict[str, Any], ready: dict[str, bool],
          names: list[str]) -> bool:
    """Can this offer answer now without a cold start?

    The asked node's own offers: one of its providers for the model reports ready
    (`/health/ready`: a local worker is ready once its weights are loaded and warmed up).
    A peer's offers: the peer is alive and has not left, and a `local` offer needs the peer to
    gossip worker slots (no slots: its worker is not up yet). Cloud offers on a live peer are
    warm: there is nothing to load.
    """
    if member.get("self"):
        return any(ready.get(name, False) for name in names)
    if member.get("status") != "alive" or member.get("node_status") == "left":
        return False
    if model.get("provider_kind") == "local":
        return bool((member.get("capacity") or {}).get("slots_total"))
    return True


def models_json(mesh: dict[str, Any], listed: dict[str, Any],
                health: dict[str, Any]) -> dict[str, Any]:
    """`models --json`: every (model, node, provider kind) offer in the mesh.

    `mesh` is `/admin/mesh`, `listed` the asked node's `/v1/models`, `health` its
    `/health/ready`.
    """
    routes: dict[str, list[str]] = {
        entry["id"]: list(entry.get("providers", [])) for entry in listed.get("data", [])
    }
    ready = {name: bool(p.get("ready")) for name, p in (health.get("providers") or {}).items()}
    rows = []
    for member in mesh["members"]:
        latency = member.get("latency") or {}
        for model in member.get("models", []):
            via = routes.get(model["name"], [])
            if member.get("self"):
                names = [p for p in via if ":" not in p and p != "mesh"]
            else:
                names = [p for p in via if p.endswith(":" + member["id"])]
            rows.append({
                "model": model["name"],
                "node": member["id"],
                "self": bool(member.get("self")),
                "provider_kind": model["provider_kind"],
                "providers": names,
                "kinds": list(model.get("kinds", [])),
                "cost_per_1k_input": model["cost_per_1k_input"],
                "cost_per_1k_output": model["cost_per_1k_output"],
                "status": member["status"],
                "warm": _warm(member, model, ready, names),
                "latency_ewma_ms": (latency.get(model["name"]) or {}).get("ewma_ms") or None,
            })
    rows.sort(key=lambda r: (r["model"], not r["self"], r["node"], r["provider_kind"]))
    return {"node": mesh["node"], "models": rows}


def models_table(view: dict[str, Any]) -> Table:
    table = Table(title=f"models in the mesh, seen from {escape(view['node'])}")
    for column in ("MODEL", "NODE", "PROVIDER", "KINDS", "$/1k IN", "$/1k OUT", "WARM",
                   "EWMA ms", "STATUS"):
        table.add_column(column, justify="right" if column.startswith(("$", "EWMA")) else "left")
    for row in view["models"]:
        provider = ", ".join(row["providers"]) or "-"
        table.add_row(
            escape(row["model"]),
            escape(row["node"]) + (" (this node)" if row["self"] else ""),
            escape(f"{provider} [{row['provider_kind']}]"),
            escape(",".join(row["kinds"])),
            money(row["cost_per_1k_input"]),
            money(row["cost_per_1k_output"]),
            "[green]warm[/]" if row["warm"] else "[yellow]cold[/]",
            _ms(row["latency_ewma_ms"]),
            status_text(row["status"]),
        )
    return table


# ------------------------------------------------------------------------------ route
_CANDIDATE_FIELDS = ("rank", "provider", "provider_kind", "node", "upstream_model", "score",
                     "reason", "cost_per_1k_input", "cost_per_1k_output", "latency_ewma_ms",
                     "error_rate", "in_flight", "cooling_down")


def route_json(node: str, explained: dict[str, Any]) -> dict[str, Any]:
    """`route MODEL --json`: `/admin/route?model=MODEL`, projected onto the documented fields."""
    candidates = [{k: c.get(k) for k in _CANDIDATE_FIELDS}
                  for c in explained.get("candidates", [])]
    winner = explained.get("winner")
    return {
        "node": node,
        "model": explained["model"],
        "strategy": explained["strategy"],
        "policy": explained.get("policy"),
        "fallback_chain": list(explained.get("fallback_chain", [])),
        "candidates": candidates,
        "excluded": list(explained.get("excluded", [])),
        "winner": None if not winner else {"provider": winner["provider"],
                                           "node": winner["node"]},
        "why": explained.get("why", ""),
    }


def route_view(view: dict[str, Any]) -> Group:
    policy = f", policy {escape(view['policy'])}" if view["policy"] else ""
    table = Table(title=f"route for {escape(view['model'])} on {escape(view['node'])}: "
                        f"strategy {escape(view['strategy'])}{policy}")
    for column in ("#", "PROVIDER", "NODE", "SCORE", "WHY", "$/1k IN", "$/1k OUT", "EWMA ms",
                   "ERR %", "IN FLIGHT", "COOLING"):
        table.add_column(column)
    for c in view["candidates"]:
        err = c["error_rate"]
        table.add_row(
            str(c["rank"]),
            escape(f"{c['provider']} [{c['provider_kind']}]"),
            escape(str(c["node"])),
            f"{c['score']:.6g}" if isinstance(c["score"], (int, float)) else "-",
            escape(str(c["reason"] or "")),
            money(c["cost_per_1k_input"]),
            money(c["cost_per_1k_output"]),
            _ms(c["latency_ewma_ms"]),
            "-" if err is None else f"{100 * err:.1f}",
            str(c["in_flight"] if c["in_flight"] is not None else "-"),
            "[yellow]yes[/]" if c["cooling_down"] else "no",
        )
    parts: list[Any] = [table]
    for line in view["excluded"]:
        parts.append(Text(f"excluded: {line}", style="dim"))
    parts.append(Text.from_markup(f"[bold]why:[/] {escape(view['why'])}"))
    return Group(*parts)


# ------------------------------------------------------------------------------ stats
_BUDGET_FIELDS = ("enabled", "scope", "daily_limit", "monthly_limit", "spent_today",
                  "spent_this_month", "left_today", "left_this_month")


def stats_json(stats: dict[str, Any], budget: dict[str, Any] | None) -> dict[str, Any]:
    """`stats --json`: `/admin/stats` per provider and model, and `/admin/budget`."""
    rows = []
    for c in stats.get("candidates", []):
        latency = c.get("latency_ms") or {}
        tokens = c.get("tokens") or {}
        rows.append({
            "provider": c["provider"],
            "model": c["model"],
            "requests": c["requests"],
            "errors": c["errors"],
            "error_rate": c.get("error_rate", 0.0),
            "in_flight": c.get("in_flight", 0),
            "latency_ms": {"p50": latency.get("p50"), "p95": latency.get("p95")},
            "tokens": {"prompt": tokens.get("prompt", 0),
                       "completion": tokens.get("completion", 0),
                       "total": tokens.get("total", 0)},
            "cost": c.get("cost", 0.0),
        })
    totals = stats.get("totals") or {}
    return {
        "node": stats["node"],
        "uptime_s": stats.get("uptime_s"),
        "providers": rows,
        "totals": {"requests": totals.get("requests", 0), "errors": totals.get("errors", 0),
                   "tokens": totals.get("tokens", 0), "cost": totals.get("cost", 0.0)},
        "budget": None if budget is None else {k: budget.get(k) for k in _BUDGET_FIELDS},
    }


def stats_table(view: dict[str, Any], title: str | None = None) -> Table:
    table = Table(title=title or f"traffic through {escape(view['node'])}")
    for column in ("PROVIDER", "MODEL", "REQ", "ERR", "ERR %", "P50 ms", "P95 ms", "TOKENS",
                   "COST", "IN FLIGHT"):
        table.add_column(column, justify="left" if column in ("PROVIDER", "MODEL") else "right")
    for r in view["providers"]:
        err_style = "red" if r["errors"] else ""
        table.add_row(
            escape(r["provider"]),
            escape(r["model"]),
            str(r["requests"]),
            f"[{err_style}]{r['errors']}[/]" if err_style else str(r["errors"]),
            f"{100 * (r['error_rate'] or 0):.1f}",
            # No requests yet: no latency, not a latency of 0.
            _ms(r["latency_ms"]["p50"] if r["requests"] else None),
            _ms(r["latency_ms"]["p95"] if r["requests"] else None),
            str(r["tokens"]["total"]),
            money(r["cost"]),
            str(r["in_flight"]),
        )
    t = view["totals"]
    table.add_section()
    table.add_row("[bold]total[/]", "", str(t["requests"]), str(t["errors"]), "", "", "",
                  str(t["tokens"]), money(t["cost"]), "")
    return table


def budget_line(budget: dict[str, Any] | None) -> Text:
    if budget is None:
        return Text("budget: this node reports none", style="dim")
    if not budget.get("enabled"):
        return Text(f"budget: off (spent today {money(budget.get('spent_today'))})", style="dim")

    def part(spent: float | None, limit: float | None, left: float | None, period: str) -> str:
        if limit is None:
            return f"{period}: spent {money(spent)}, no limit"
        style = "red" if (left or 0) <= 0 else ("yellow" if (left or 0) < 0.1 * limit else "green")
        return (f"{period}: spent {money(spent)} of {money(limit)}, "
                f"[{style}]left {money(left)}[/]")

    scope = escape(str(budget.get("scope")))
    return Text.from_markup(
        f"[bold]budget[/] ({scope}) "
        + part(budget.get("spent_today"), budget.get("daily_limit"), budget.get("left_today"),
               "today")
        + "; "
        + part(budget.get("spent_this_month"), budget.get("monthly_limit"),
               budget.get("left_this_month"), "this month")
    )


def stats_view(view: dict[str, Any]) -> Group:
    return Group(stats_table(view), budget_line(view["budget"]))


# ------------------------------------------------------------------------------ spend
def spend_json(report: dict[str, Any]) -> dict[str, Any]:
    """`spend --json`: `/admin/spend` as the node reports it (schema in docs/meshctl.md)."""
    return {k: report[k] for k in ("node", "day", "month", "total", "nodes", "keys")}


def spend_view(view: dict[str, Any]) -> Group:
    keys = Table(title=f"spend per API key, seen from {escape(view['node'])} ({view['day']})")
    for column in ("KEY", "TODAY", "THIS MONTH", "DAILY LIMIT", "LEFT TODAY", "BY NODE (today)"):
        keys.add_column(column, justify="right" if column.isupper() and column not in (
            "KEY", "BY NODE (today)") else "left")
    for row in view["keys"]:
        by_node = ", ".join(f"{escape(n)} {money(v['today'])}" for n, v in row["nodes"].items())
        keys.add_row(
            escape(row["key"]), money(row["today"]), money(row["this_month"]),
            "none" if row["daily_limit"] is None else money(row["daily_limit"]),
            "-" if row["left_today"] is None else money(row["left_today"]),
            by_node or "-",
        )
    if not view["keys"]:
        keys.add_row("(no API keys: auth off, or none created)", "", "", "", "", "")
    nodes = Table(title="spend per node (all keys)")
    for column in ("NODE", "TODAY", "THIS MONTH"):
        nodes.add_column(column, justify="left" if column == "NODE" else "right")
    for row in view["nodes"]:
        nodes.add_row(escape(row["node"]), money(row["today"]), money(row["this_month"]))
    total = view["total"]
    nodes.add_row("[bold]total[/]", money(total["today"]), money(total["this_month"]))
    return Group(keys, nodes)
