"""A headless chromium driven over the Chrome DevTools Protocol, for browser tests.

    async with ... :
        browser = await Browser(tmp_path / "profile").start()
        await browser.call("Page.navigate", url=...)
        value = await browser.evaluate("document.title")          # returnByValue
        value = await browser.evaluate("fetch(...).then(r => r.status)", await_promise=True)
        await browser.close()

chromium's own `--remote-debugging-port` is spoken with aiohttp's websocket client: no driver
to install. `CHROMIUM` is the binary found on PATH, or None (tests skip with
`apt-get install -y chromium` as the reason). Pages that change on their own are waited on with
`tests.kit.wait.wait_for(cond, what, WAIT_S)`.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp

from tests.kit.wait import wait_for

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))
                 if p), None)
WAIT_S = 60.0  # a page polls the node on its own timer; chromium starts in seconds


class Browser:
    """A headless chromium and one page, driven over the DevTools Protocol."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self.proc: subprocess.Popen[bytes] | None = None
        self.http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)

    async def start(self) -> Browser:
        assert CHROMIUM is not None
        self.profile.mkdir(parents=True)
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={self.profile}",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             "--window-size=1280,1000", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=(self.profile.parent / "chromium.log").open("wb"),
        )
        # Port 0: chromium writes the port it took into the profile.
        port_file = self.profile / "DevToolsActivePort"
        await wait_for(lambda: port_file.exists() and port_file.read_text().strip() != "",
                       "chromium writes DevToolsActivePort", WAIT_S)
        port = int(port_file.read_text().split()[0])
        self.http = aiohttp.ClientSession()
        targets: list[dict[str, Any]] = []

        async def page_target() -> bool:
            assert self.http is not None
            async with self.http.get(f"http://127.0.0.1:{port}/json/list") as r:
                targets[:] = [t for t in await r.json() if t.get("type") == "page"]
            return bool(targets)

        await wait_for(page_target, "chromium has a page", WAIT_S)
        self.ws = await self.http.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=0)
        return self

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        assert self.ws is not None
        call_id = next(self._ids)
        await self.ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads((await asyncio.wait_for(self.ws.receive(), 60)).data)
            if message.get("id") == call_id:  # events (no id) are not needed here
                assert "error" not in message, message
                return dict(message.get("result", {}))

    async def evaluate(self, expression: str, await_promise: bool = False) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=await_promise)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    async def screenshot(self, path: Path, clip: dict[str, float] | None = None) -> Path:
        params: dict[str, Any] = {"format": "png", "captureBeyondViewport": True}
        if clip is not None:
            params["clip"] = {**clip, "scale": 1}
        shot = await self.call("Page.captureScreenshot", **params)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    async def close(self) -> None:
        if self.ws is not None:
            try:
                await self.call("Browser.close")
            # TypeError: the socket closes (data None) before the answer to Browser.close.
            except (TimeoutError, AssertionError, aiohttp.ClientError, TypeError):
                pass
            await self.ws.close()
        if self.http is not None:
            await self.http.close()
        if self.proc is not None:
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

