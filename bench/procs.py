"""Child processes of a benchmark run: start pinned, wait until ready, read their CPU, stop them all.

It owns the lifetime of every process a run starts (backend, meshnode, LiteLLM, wrk) and makes
sure none outlives the run: each child gets its own process group, and `ProcessSet.close()` (also
run at exit and on SIGINT/SIGTERM) sends SIGTERM to the group, then SIGKILL after a grace period.
It never signals a process it did not start.
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

CLK_TCK = os.sysconf("SC_CLK_TCK")
# Loopback only: never route a readiness probe through a proxy named in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class BenchProcessError(RuntimeError):
    """A benchmark process did not start, or died, or never became ready."""


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def free_port() -> int:
    """A loopback port free right now (tiny race with others; good enough for a benchmark)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    try:
        tasks = list(task_dir.iterdir())
    except OSError:
        return kids
    for task in tasks:
        try:
            kids += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
    return kids


def _own_cpu_ticks(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    # Field 2 (comm) may contain spaces: split after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15)


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime of `pid` and all its live descendants, in seconds (from /proc/<pid>/stat)."""
    total = 0
    stack = [pid]
    seen: set[int] = set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        total += _own_cpu_ticks(current)
        stack += _children(current)
    return total / CLK_TCK


def _tree(pid: int) -> list[int]:
    out: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop()
        if current in out:
            continue
        out.append(current)
        stack += _children(current)
    return out


def tree_schedstat(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for a CPU) of every thread of `pid` and
    its descendants, from /proc/<tid>/schedstat. The second number is what a busy box costs."""
    on_cpu = waiting = 0
    for member in _tree(pid):
        try:
            tasks = list(Path(f"/proc/{member}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                fields = (task / "schedstat").read_text().split()
            except OSError:
                continue
            on_cpu += int(fields[0])
            waiting += int(fields[1])
    return on_cpu / 1e9, waiting / 1e9


@dataclass
class Managed:
    """One started child: its handle, its log file, the cores it is pinned to."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    cores: frozenset[int] | None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, limit: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def wait_for_line(self, pattern: str, timeout_s: float) -> re.Match[str]:
        """Wait until the child's log has a line matching `pattern` (regex); fail if it dies."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout_s
        while True:
            match = regex.search(self.log_tail(1 << 20))
            if match:
                return match
            if not self.alive():
                raise BenchProcessError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise BenchProcessError(f"{self.name}: no {pattern!r} in {timeout_s:.0f}s")
            time.sleep(0.05)

    def wait_http_ok(
        self,
        url: str,
        timeout_s: float,
        method: str = "GET",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Wait until `url` answers 2xx; fail early if the child dies."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while True:
            if not self.alive():
                raise BenchProcessError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
            if body is not None:
                request.add_header("Content-Type", "application/json")
            try:
                with _OPENER.open(request, timeout=5) as answer:
                    if 200 <= answer.status < 300:
                        return
                    last = f"HTTP {answer.status}"
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}: {exc.read()[:300]!r}"
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            if time.monotonic() > deadline:
                raise BenchProcessError(
                    f"{self.name}: {url} not ready in {timeout_s:.0f}s ({last})\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    def schedstat(self) -> tuple[float, float]:
        return tree_schedstat(self.pid)


class ProcessSet:
    """Every process a run starts; closing it stops them all (also at exit and on signals)."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._procs: list[Managed] = []
        self._closed = False
        self._previous: dict[int, Callable[[int, FrameType | None], object] | int | None] = {}
        atexit.register(self.close)
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread (e.g. under a test runner thread)
                pass

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.close()
        raise KeyboardInterrupt(f"signal {signum}")

    def start(
        self,
        name: str,
        argv: Sequence[str],
        cores: set[int] | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Managed:
        self._log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self._log_dir / f"{name}.log"
        pinned = frozenset(cores) if cores else None

        def _pin() -> None:  # runs in the child before exec: every thread it makes inherits it
            if pinned:
                os.sched_setaffinity(0, pinned)

        with open(log_path, "wb") as log:
            try:
                proc = subprocess.Popen(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=cwd,
                    preexec_fn=_pin,
                    start_new_session=True,  # own process group: we can stop its children too
                )
            except OSError as exc:
                raise BenchProcessError(f"cannot start {name}: {exc}") from exc
        managed = Managed(name, proc, log_path, pinned)
        self._procs.append(managed)
        return managed

    def stop(self, managed: Managed, grace_s: float = 10.0) -> None:
        if managed.alive():
            try:
                os.killpg(managed.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                managed.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        # The leader may be gone while its children linger in the group.
        try:
            os.killpg(managed.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if managed.proc.poll() is None:
            managed.proc.wait(timeout=5)
        if managed in self._procs:
            self._procs.remove(managed)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for managed in reversed(list(self._procs)):
            self.stop(managed, grace_s=5.0)
        for sig, previous in self._previous.items():
            if previous is not None:
                signal.signal(sig, previous)
        atexit.unregister(self.close)

    def __enter__(self) -> ProcessSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
