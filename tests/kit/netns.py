"""A private network of Linux network namespaces for partition tests (needs root and `ip netns`).

    from tests.kit.netns import NetnsLab, netns_unavailable

    reason = netns_unavailable()             # None, or why the host cannot do this (skip)
    with NetnsLab({"left": ["a", "b"], "right": ["c", "d"]}) as lab:
        lab.address("a")                     # "10.213.R.1": a's address on the private /24
        lab.wrapper("a")                     # ["ip", "netns", "exec", NS] (argv prefix)
        lab.http_get("a", url)               # (status, body), fetched from inside a's namespace
        lab.cut("left", "right")             # the trunk between the two sides goes down
        lab.heal("left", "right")            # and up again
    # on exit (and at interpreter exit, if a test died first): every namespace is deleted,
    # which deletes every veth and bridge in it

Names are `<prefix>-<pid>-<hex>-<node>`: a lab left behind by a test process that was killed
outright (no teardown ran) is swept by the next lab built on the host once that pid is gone.

Layout: one namespace per node (`<prefix>-<node>`, with `lo` and `eth0`), and one "switch"
namespace (`<prefix>-sw`) holding a bridge per side and a veth trunk between every pair of
sides. Cutting a trunk is a real partition: each side still talks within itself, nothing
crosses. Every name carries a random suffix, the /24 is `10.213.<random>.0/24` and exists only
inside these namespaces (no default route, nothing in the root namespace), so no packet can leave
them; IPv6 is off in them, so there is no link-local chatter either.

`http_get` runs urllib in a short-lived thread that has entered the node's namespace
(`setns(2)` changes only the calling thread's network namespace), so the test process, its event
loop and its other threads stay in the root namespace.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import os
import re
import secrets
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
T = TypeVar("T")

_live_labs: set[NetnsLab] = set()


def netns_unavailable() -> str | None:
    """Why this host cannot build the lab (a skip reason), or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"mnprobe-{secrets.token_hex(4)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def in_netns(namespace: str, fn: Callable[[], T]) -> T:
    """Run `fn` in a fresh thread inside `namespace`; sockets it opens live there."""
    libc = ctypes.CDLL(None, use_errno=True)
    out: list[T] = []
    err: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(os.path.join(NETNS_DIR, namespace), os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns {namespace}: {os.strerror(errno)}")
            finally:
                os.close(fd)
            out.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread as is
            err.append(exc)

    # A thread of its own: it dies with the namespace switch, so no pooled thread is left in
    # another namespace.
    thread = threading.Thread(target=target, name=f"netns-{namespace}", daemon=True)
    thread.start()
    thread.join()
    if err:
        raise err[0]
    return out[0]


class NetnsLab:
    def __init__(self, sides: Mapping[str, Sequence[str]], prefix: str = "mnpart") -> None:
        self.prefix = prefix
        self.tag = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
        self.subnet = f"10.213.{secrets.randbelow(256)}"
        self.sides = {side: list(nodes) for side, nodes in sides.items()}
        self.switch = f"{self.tag}-sw"
        self._side_of = {n: side for side, nodes in self.sides.items() for n in nodes}
        self._index = {n: i + 1 for i, n in enumerate(self._side_of)}
        self._bridge = {side: f"br{i}" for i, side in enumerate(self.sides)}
        self._trunks: dict[frozenset[str], str] = {}
        self._made: list[str] = []

    # ------------------------------------------------------------------ names
    def namespace(self, node: str) -> str:
        return f"{self.tag}-{node}"

    def address(self, node: str) -> str:
        return f"{self.subnet}.{self._index[node]}"

    def wrapper(self, node: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(node)]

    # ------------------------------------------------------------------ build and tear down
    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        subprocess.run(
            ["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
             "net.ipv6.conf.default.disable_ipv6=1"], capture_output=True, check=False,
        )
        _ip("-n", name, "link", "set", "lo", "up")

    def _sweep_orphans(self) -> None:
        """Delete namespaces of labs whose test process died without its teardown."""
        try:
            names = os.listdir(NETNS_DIR)
        except FileNotFoundError:
            return
        pattern = re.compile(rf"{re.escape(self.prefix)}-(\d+)-[0-9a-f]{{6}}-")
        for name in names:
            match = pattern.match(name)
            if match is not None and not os.path.exists(f"/proc/{match.group(1)}"):
                subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)

    def build(self) -> NetnsLab:
        self._sweep_orphans()
        _live_labs.add(self)
        try:
            self._add_namespace(self.switch)
            for bridge in self._bridge.values():
                _ip("-n", self.switch, "link", "add", bridge, "type", "bridge",
                    "forward_delay", "0", "stp_state", "0")
                _ip("-n", self.switch, "link", "set", bridge, "up")
            for i, (x, y) in enumerate(itertools.combinations(self.sides, 2)):
                ends = (f"tk{i}x", f"tk{i}y")
                _ip("-n", self.switch, "link", "add", ends[0], "type", "veth", "peer", "name",
                    ends[1])
                for end, side in zip(ends, (x, y), strict=True):
                    _ip("-n", self.switch, "link", "set", end, "master", self._bridge[side])
                    _ip("-n", self.switch, "link", "set", end, "up")
                self._trunks[frozenset((x, y))] = ends[0]
            for node, side in self._side_of.items():
                ns = self.namespace(node)
                self._add_namespace(ns)
                port = f"p-{node}"[:15]
                # Both ends are made where they live: nothing is created in the root namespace.
                _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name",
                    "eth0", "netns", ns)
                _ip("-n", self.switch, "link", "set", port, "master", self._bridge[side])
                _ip("-n", self.switch, "link", "set", port, "up")
                _ip("-n", ns, "addr", "add", f"{self.address(node)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Delete every namespace this lab made (their veths and bridges go with them)."""
        for name in reversed(self._made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        self._made.clear()
        _live_labs.discard(self)

    def __enter__(self) -> NetnsLab:
        return self.build()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ partitions
    def _trunk(self, x: str, y: str) -> str:
        return self._trunks[frozenset((x, y))]

    def cut(self, x: str, y: str) -> None:
        _ip("-n", self.switch, "link", "set", self._trunk(x, y), "down")

    def heal(self, x: str, y: str) -> None:
        _ip("-n", self.switch, "link", "set", self._trunk(x, y), "up")

    # ------------------------------------------------------------------ reaching a node
    def http_get(self, node: str, url: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """GET `url` from inside `node`'s namespace: (status, body); OSError when unreachable."""

        def fetch() -> tuple[int, bytes]:
            try:
                # No proxy: whatever the environment names is not reachable from in there.
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                with opener.open(url, timeout=timeout) as resp:
                    return resp.status, resp.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()

        return in_netns(self.namespace(node), fetch)


@atexit.register
def _close_all() -> None:
    # A test killed by a timeout or an error before its own teardown still leaves nothing.
    for lab in list(_live_labs):
        with contextlib.suppress(Exception):
            lab.close()
