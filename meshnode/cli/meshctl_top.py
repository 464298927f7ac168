"""`meshctl top`: a live, full-screen view of the mesh and the asked node's traffic, like htop.

Every `--interval` seconds it reads `/admin/mesh`, `/admin/stats` and `/admin/budget` from the
node and redraws: the members (status, RTT, slots, queue, models), the traffic per provider and
model, the budget. `q` quits (exit 0); so does Ctrl-C (exit 130, the shell's convention).

Rendering is rich's `Live` on the alternate screen: no escape codes of our own. Keys are read
with the terminal in cbreak mode (termios, restored on the way out) and `select` as the clock,
so a key press is seen at once, not at the next refresh. Without a terminal on stdin (piped,
cron) it only redraws until `-n` iterations are done or Ctrl-C. When stdout is not a terminal
(`meshctl top | tee`, a log file) there is no screen to redraw: it prints the same tables as
plain text, one block per refresh under a timestamped header, until `-n` or Ctrl-C.

The node going away while `top` runs is shown, not fatal: the last data stays on screen,
marked stale, and polling goes on. Only the first read decides the exit status (3, 4, 5) so
that `meshctl top` against a wrong address fails like every other subcommand.

`--json` prints one snapshot per refresh as JSON Lines (`-n` defaults to 1 then).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from rich.console import Console, Group
from rich.layout import Layout
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from meshnode.cli.meshctl_http import MeshctlError, NodeClient, NotFound
from meshnode.cli.meshctl_views import budget_line, stats_json, stats_table, status_text

QUIT_KEYS = frozenset("qQ")


@dataclass(frozen=True)
class Snapshot:
    """One poll of the node: what a frame shows."""

    at: float
    mesh: dict[str, Any] | None  # None: this node has no mesh (mesh.enabled false)
    stats: dict[str, Any]

    def to_json(self, node: str) -> dict[str, Any]:
        members = self.mesh["members"] if self.mesh is not None else []
        return {"node": self.stats["node"], "url": node, "at": round(self.at, 3),
                "nodes": members, "stats": self.stats}


def poll(client: NodeClient) -> Snapshot:
    try:
        mesh: dict[str, Any] | None = client.get("/admin/mesh")
    except NotFound:
        mesh = None
    raw_stats = client.get("/admin/stats")
    try:
        budget: dict[str, Any] | None = client.get("/admin/budget")
    except NotFound:
        budget = None
    return Snapshot(at=time.time(), mesh=mesh, stats=stats_json(raw_stats, budget))


# ------------------------------------------------------------------------------ rendering
def _nodes_table(snapshot: Snapshot) -> Table:
    table = Table(title="nodes")
    for column in ("NODE", "STATUS", "GRPC", "HTTP", "RTT ms", "SLOTS busy/total", "QUEUE",
                   "MODELS", "HEARD s"):
        table.add_column(column, overflow="fold")
    members = snapshot.mesh["members"] if snapshot.mesh is not None else []
    for m in members:
        cap = m.get("capacity") or {}
        total = cap.get("slots_total") or 0
        busy = total - (cap.get("slots_free") or 0)
        rtt = m.get("rtt_ms")
        table.add_row(
            f"[bold]{escape(m['id'])}[/]" + (" *" if m.get("self") else ""),
            status_text(m["status"]),
            escape(m["addresses"].get("grpc", "")),
            escape(m["addresses"].get("http", "") or "-"),
            "-" if rtt is None else f"{rtt:.1f}",
            f"{busy}/{total}" if total else "-",
            str(cap.get("queue_depth", 0)),
            escape(", ".join(sorted({mo["name"] for mo in m.get("models", [])})) or "-"),
            f"{m.get('last_heard_s', 0.0):.1f}",
        )
    return table


def render(node: str, snapshot: Snapshot | None, error: str | None, interval: float) -> Layout:
    """One frame. A Layout, so the header and the `q quit` line stay on screen when the tables
    are taller than the terminal (the body is cropped, not the footer)."""
    body: list[Any] = []
    if snapshot is None:
        header = Text(f"meshctl top: asking {node} ...", style="bold")
    else:
        stats = snapshot.stats
        members = snapshot.mesh["members"] if snapshot.mesh is not None else []
        alive = sum(1 for m in members if m["status"] == "alive")
        clock = time.strftime("%H:%M:%S", time.localtime(snapshot.at))
        mesh_part = (f"{alive}/{len(members)} nodes alive" if snapshot.mesh is not None
                     else "mesh off on this node")
        header = Text.from_markup(
            f"[bold]meshctl top[/]  node [bold cyan]{escape(stats['node'])}[/] "
            f"({escape(node)})  {mesh_part}  up {stats['uptime_s'] or 0:.0f}s  {clock}"
        )
        body += [_nodes_table(snapshot),
                 stats_table(stats, title="traffic by provider and model"),
                 budget_line(stats["budget"])]
    layout = Layout()
    parts = [Layout(header, name="header", size=1)]
    if error:
        parts.append(Layout(Panel(Text(error, style="red"), title="stale: the last poll failed",
                                  border_style="red"), name="error", size=3))
    parts += [Layout(Group(*body), name="body"),
              Layout(Text(f"q quit  ·  refresh every {interval:g}s", style="dim"),
                     name="footer", size=1)]
    layout.split_column(*parts)
    return layout


# ------------------------------------------------------------------------------ keys
@contextlib.contextmanager
def _cbreak(stream: TextIO) -> Iterator[bool]:
    """Keys without Enter and without echo, while inside; yields whether keys can be read."""
    if not stream.isatty():
        yield False
        return
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait_for_quit(stream: TextIO, keys: bool, timeout: float) -> bool:
    """Sleep up to `timeout`, returning True as soon as a quit key is pressed."""
    if not keys:
        time.sleep(timeout)
        return False
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return False
        readable, _, _ = select.select([stream], [], [], left)
        if readable:
            # os.read: one byte straight from the fd, bypassing TextIO's buffering (which
            # would hide further keys from select).
            key = os.read(stream.fileno(), 1).decode(errors="replace")
            if key in QUIT_KEYS:
                return True


# ------------------------------------------------------------------------------ loops
def run_json(client: NodeClient, interval: float, iterations: int | None) -> int:
    done = 0
    while True:
        snapshot = poll(client)  # errors end the run: a script wants to know
        sys.stdout.write(json.dumps(snapshot.to_json(client.node), sort_keys=True) + "\n")
        sys.stdout.flush()
        done += 1
        if iterations is not None and done >= iterations:
            return 0
        time.sleep(interval)


def plain_frame(node: str, snapshot: Snapshot | None, error: str | None) -> Group:
    """One refresh for a pipe or a file: header, then the tables, no screen control."""
    parts: list[Any] = []
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(
        snapshot.at if snapshot is not None else time.time()))
    if snapshot is None:
        parts.append(Text(f"--- {when} meshctl top {node}: no data yet"))
    else:
        members = snapshot.mesh["members"] if snapshot.mesh is not None else []
        alive = sum(1 for m in members if m["status"] == "alive")
        mesh_part = (f"{alive}/{len(members)} nodes alive" if snapshot.mesh is not None
                     else "mesh off on this node")
        parts.append(Text(f"--- {when} meshctl top {snapshot.stats['node']} ({node}): "
                          f"{mesh_part}"))
        if error:
            parts.append(Text(f"stale: the last poll failed: {error}"))
        parts += [_nodes_table(snapshot),
                  stats_table(snapshot.stats, title="traffic by provider and model"),
                  budget_line(snapshot.stats["budget"])]
    return Group(*parts)


def run_plain(client: NodeClient, interval: float, iterations: int | None) -> int:
    """`top` with stdout not a terminal: a plain table every `interval`."""
    snapshot = poll(client)  # the first read decides the exit status (3, 4, 5)
    error: str | None = None
    console = Console(width=200, color_system=None, force_terminal=False, highlight=False)
    done = 0
    try:
        while True:
            console.print(plain_frame(client.node, snapshot, error))
            console.print()
            sys.stdout.flush()
            done += 1
            if iterations is not None and done >= iterations:
                return 0
            time.sleep(interval)
            try:
                snapshot = poll(client)
                error = None
            except MeshctlError as exc:
                error = str(exc)
    except KeyboardInterrupt:
        return 130


def run_screen(client: NodeClient, interval: float, iterations: int | None) -> int:
    if not sys.stdout.isatty():
        return run_plain(client, interval, iterations)
    snapshot = poll(client)  # the first read decides the exit status (3, 4, 5)
    error: str | None = None
    console = Console()
    done = 0
    try:
        with _cbreak(sys.stdin) as keys, Live(
            render(client.node, snapshot, None, interval), console=console, screen=True,
            auto_refresh=False, redirect_stdout=False, redirect_stderr=False,
        ) as live:
            while True:
                done += 1
                if iterations is not None and done >= iterations:
                    return 0
                if _wait_for_quit(sys.stdin, keys, interval):
                    return 0
                try:
                    snapshot = poll(client)
                    error = None
                except MeshctlError as exc:
                    error = str(exc)
                live.update(render(client.node, snapshot, error, interval), refresh=True)
    except KeyboardInterrupt:
        return 130
