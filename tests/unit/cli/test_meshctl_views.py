"""meshctl's tables show money as a person reads it: `$0.000028`, never `$2.8e-05`."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from meshnode.cli.meshctl_views import money, stats_json, stats_table


def _render(renderable: Any) -> str:
    console = Console(width=200, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_money_is_never_in_exponent_form() -> None:
    assert money(2.8e-05) == "$0.000028"
    assert money(1e-9) == "$0.000000001"
    assert money(0.0) == "$0"
    assert money(1234.5678) == "$1234.57"
    assert money(None) == "-"


def test_stats_table_shows_small_costs_in_decimals() -> None:
    stats = {
        "node": "c",
        "candidates": [{"provider": "mesh:b", "model": "gpt-fake", "requests": 2, "errors": 0,
                        "latency_ms": {"p50": 6.3, "p95": 9.3},
                        "tokens": {"prompt": 2, "completion": 12, "total": 14},
                        "cost": 2.8e-05}],
        "totals": {"requests": 2, "errors": 0, "tokens": 14, "cost": 2.8e-05},
    }
    text = _render(stats_table(stats_json(stats, None)))
    assert "$0.000028" in text
    assert "e-05" not in text
