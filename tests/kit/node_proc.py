"""Start real `meshnode run` processes for integration and cluster tests.

    from tests.kit.node_proc import NodeProcess

    with NodeProcess(config, tmp_path) as node:        # starts it, waits for /health/live
        node.url                                         # "http://127.0.0.1:PORT"
        node.base_url                                    # node.url + "/v1" (for openai clients)
        node.announced["MESHNODE_GRPC"]                  # every MESHNODE_*=value line it printed
        node.logs()                                      # its stdout+stderr so far
    # on exit: SIGTERM, wait, then SIGKILL if it did not stop; `node.returncode` is kept

- `config` is the config as a dict (written as JSON under `workdir`), or None for the embedded
  default. It is passed with `--config`; the HTTP address is forced to `127.0.0.1:0` (the node
  prints `MESHNODE_HTTP=http://127.0.0.1:PORT`, which is read back) unless `listen=` is given.
  By default the mesh is left as the config says; pass `grpc_listen="127.0.0.1:0"`,
  `seeds=[...]`, `node_id=` to set those flags.
- The child's environment is this process's, minus the cloud keys (`OPENAI_API_KEY`,
  `ANTHROPIC_API_KEY`, `CLOUDFLARE_*`, `TOGETHER_API_KEY`) so tests never reach a real vendor,
  plus `env=`. Logs go to `workdir/<name>.log` in JSON (`--log-format json`).
- `start()` / `stop()` are blocking (they poll with short sleeps); async tests call
  `await node.astart()` / `await node.astop()` which run them in a thread so the test's own
  event loop (and any in-process fake upstream on it) keeps running.
- `kill()` sends SIGKILL (crash tests); `terminate()` sends SIGTERM without waiting.
- `wrapper=[...]` prefixes the command (`["ip", "netns", "exec", NS]`, which execs, so signals
  still reach the node); `http_get=` replaces the urllib GET of `/health/live` (url -> status,
  OSError when unreachable), for a node whose HTTP address only its namespace can reach.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tests.kit.wait import wait_for_sync

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[2]
CLOUD_KEYS = (
    "OPENAI_API_KEY",
    "ANTHROPIC_API_KEY",
    "CLOUDFLARE_ACCOUNT_ID",
    "CLOUDFLARE_API_TOKEN",
    "TOGETHER_API_KEY",
)


class NodeStartError(RuntimeError):
    """The node exited or did not answer in time; the message carries its log tail."""


class NodeProcess:
    def __init__(
        self,
        config: Mapping[str, Any] | None,
        workdir: Path,
        *,
        name: str = "node",
        listen: str = "127.0.0.1:0",
        grpc_listen: str | None = None,
        seeds: Sequence[str] = (),
        node_id: str | None = None,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 60.0,
        wrapper: Sequence[str] = (),
        http_get: Callable[[str], int] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.name = name
        self.startup_timeout = startup_timeout
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{name}.log"
        self._http_get = http_get
        args = [*wrapper, sys.executable, "-m", "meshnode", "run", "--log-format", "json",
                "--listen", listen, "--data-dir", str(self.workdir / f"{name}-data")]
        if config is not None:
            config_path = self.workdir / f"{name}.json"
            config_path.write_text(json.dumps(config), encoding="utf-8")
            args += ["--config", str(config_path)]
        if grpc_listen is not None:
            args += ["--grpc-listen", grpc_listen]
        for seed in seeds:
            args += ["--seed", seed]
        if node_id is not None:
            args += ["--node-id", node_id]
        self.args = [*args, *extra_args]
        child_env = {k: v for k, v in os.environ.items() if k not in CLOUD_KEYS}
        path = [str(REPO_ROOT), child_env.get("PYTHONPATH", "")]
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
        child_env["PYTHONUNBUFFERED"] = "1"
        child_env.update(env or {})
        self.env = child_env
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.announced: dict[str, str] = {}
        self.returncode: int | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> NodeProcess:
        log = self.log_path.open("wb")
        try:
            self.proc = subprocess.Popen(
                self.args, cwd=self.workdir, env=self.env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        deadline = time.monotonic() + self.startup_timeout
        try:
            self._wait_for_url(deadline)
            self._wait_live(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_for_url(self, deadline: float) -> None:
        def announced() -> str | None:
            self._read_announcements()
            if "MESHNODE_HTTP" not in self.announced:
                self._check_alive()
            return self.announced.get("MESHNODE_HTTP")

        self.url = self._wait(announced, "printed no MESHNODE_HTTP line in time", deadline)

    def _wait_live(self, deadline: float) -> None:
        def live() -> bool:
            try:
                if self._http_get is not None:
                    answered = self._http_get(self.url + "/health/live") == 200
                else:
                    with urllib.request.urlopen(self.url + "/health/live", timeout=5) as r:  # noqa: S310
                        answered = r.status == 200
            except OSError:  # urllib.error.URLError included: not listening yet
                self._check_alive()
                raise
            if not answered:
                self._check_alive()
            return answered

        self._wait(live, "/health/live did not answer", deadline)

    def _wait(self, cond: Callable[[], T | None], what: str, deadline: float) -> T:
        """tests.kit.wait's poll up to `deadline`; a node that exits fails it at once."""
        try:
            value = wait_for_sync(cond, f"{self.name} {what}",
                                  max(deadline - time.monotonic(), 0.01))
        except AssertionError as exc:
            raise NodeStartError(f"{self.name} {what}\n" + self.log_tail()) from exc
        assert value is not None
        return value

    def _check_alive(self) -> None:
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None:
            self.returncode = code
            raise NodeStartError(f"{self.name} exited with {code}\n" + self.log_tail())

    def _read_announcements(self) -> None:
        for line in self.logs().splitlines():
            if line.startswith("MESHNODE_") and "=" in line:
                key, _, value = line.partition("=")
                self.announced[key] = value.strip()

    def refresh_announcements(self) -> dict[str, str]:
        """Re-read `MESHNODE_*=` lines (a service may print its own after start)."""
        self._read_announcements()
        return self.announced

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.returncode = self.proc.wait()

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode
        return self.returncode

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.returncode = self.proc.wait(timeout)
        return self.returncode

    async def astart(self) -> NodeProcess:
        return await asyncio.to_thread(self.start)

    async def astop(self, timeout: float = 30.0) -> int | None:
        return await asyncio.to_thread(self.stop, timeout)

    # ------------------------------------------------------------------ logs
    def logs(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines, parsed (other lines, like MESHNODE_*=, are skipped)."""
        out = []
        for line in self.logs().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
