"""Run one of the kit's fake vendor servers (`fake_anthropic`, `fake_cloudflare`) in its own
process, for tests that start real node processes, and drive it over its control endpoints with
plain blocking HTTP (loopback only).

    with FakeServerProcess("tests.kit.fake_anthropic") as fake:
        fake.url                                   # what to put in the node's base_url
        fake.script({"kind": "fail", "status": 529})
        fake.recorded()                            # {"requests": [...], "violations": [...]}

The child prints `<NAME>_URL=<url>` as its first line (flushed) and serves until SIGTERM.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson

_REPO_ROOT = Path(__file__).resolve().parents[2]


class FakeServerProcess:
    def __init__(self, module: str, *args: str, startup_timeout: float = 30.0) -> None:
        self._args = [sys.executable, "-m", module, "--port", "0", *args]
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.root_url = ""

    def start(self) -> str:
        path = [str(_REPO_ROOT), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
        self._proc = subprocess.Popen(
            self._args, cwd=_REPO_ROOT, env=env, stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL, bufsize=0,
        )
        assert self._proc.stdout is not None  # noqa: S101
        selector = selectors.DefaultSelector()
        selector.register(self._proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + self._startup_timeout
        line = b""
        try:
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    raise RuntimeError(f"{self._args[2]} did not start in time")
                byte = self._proc.stdout.read(1)
                if not byte:
                    raise RuntimeError(f"{self._args[2]} exited ({self._proc.wait()})")
                line += byte
        except BaseException:
            self.stop()
            raise
        finally:
            selector.close()
        key, _, url = line.decode().strip().partition("=")
        if not key.endswith("_URL") or not url.startswith("http://127.0.0.1:"):
            self.stop()
            raise RuntimeError(f"unexpected first line from {self._args[2]}: {line!r}")
        self.url = url
        host, _, port_rest = url.removeprefix("http://").partition(":")
        self.root_url = f"http://{host}:{port_rest.split('/', 1)[0]}"
        return url

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = orjson.dumps(body) if body is not None else None
        request = urllib.request.Request(
            self.root_url + path, data=data, method=method,
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback
            return orjson.loads(response.read())

    def script(self, *behaviours: dict[str, Any]) -> None:
        """Queue behaviours in their JSON form (`behaviour_to_json` of the fake module)."""
        self._call("POST", "/_fake/script", list(behaviours))

    def recorded(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/_fake/requests")
        return result

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def kill(self) -> None:
        """SIGKILL: the fake dies at once, mid-request, without closing anything cleanly."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> FakeServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
