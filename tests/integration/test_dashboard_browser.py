"""The dashboard in a real headless browser (Debian's chromium) against a real three-node mesh.

One page stays open the whole test and is driven over the Chrome DevTools Protocol (chromium's
own `--remote-debugging-port`, spoken with aiohttp's websocket client: no driver to install).
Node a has auth on; the page gets the admin key from its fragment (`#key=...`, which never
reaches the server), as an operator would paste it. The test checks that the page shows all
three nodes alive with their models and links, the traffic per provider and the budget left;
then SIGKILLs node c and waits for the same open page to mark c dead (no reload: the page polls
the admin API); it saves screenshots before and after under the test's tmp dir.

Skips when chromium is not installed (`apt-get install -y chromium`).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.kit.three_nodes import ADMIN_SECRET, ThreeNodes

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))
                 if p), None)
WAIT_S = 60.0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(CHROMIUM is None,
                       reason="chromium is not installed (apt-get install -y chromium)"),
]


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
        await wait_until(lambda: port_file.exists() and port_file.read_text().strip() != "",
                         "chromium writes DevToolsActivePort")
        port = int(port_file.read_text().split()[0])
        self.http = aiohttp.ClientSession()
        targets: list[dict[str, Any]] = []

        async def page_target() -> bool:
            assert self.http is not None
            async with self.http.get(f"http://127.0.0.1:{port}/json/list") as r:
                targets[:] = [t for t in await r.json() if t.get("type") == "page"]
            return bool(targets)

        await wait_until(page_target, "chromium has a page")
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

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    async def screenshot(self, path: Path) -> Path:
        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
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


async def wait_until(cond: Any, what: str, timeout: float = WAIT_S) -> None:
    end = time.monotonic() + timeout
    while True:
        result = cond()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > end:
            raise AssertionError(f"not within {timeout:.0f}s: {what}")
        await asyncio.sleep(0.1)


# What the page shows, read from its DOM (the attributes and text a person sees).
# null until the dashboard (not about:blank, not a half-parsed page) is there.
PAGE_STATE = """document.readyState !== 'complete' || !document.getElementById('budget') ? null :
JSON.stringify({
  nodes: Object.fromEntries([...document.querySelectorAll('#nodes tbody tr[data-node-id]')]
           .map(r => [r.dataset.nodeId, r.dataset.status])),
  graph: Object.fromEntries([...document.querySelectorAll('#graph g.node')]
           .map(g => [g.dataset.nodeId, g.dataset.status])),
  links: [...document.querySelectorAll('#graph line.link')].map(l => l.dataset.link),
  rtt: [...document.querySelectorAll('#graph text.rtt')].map(t => t.textContent),
  models: document.querySelector('#nodes tbody') ?
          document.querySelector('#nodes tbody').innerText : '',
  providers: [...document.querySelectorAll('#providers tbody tr[data-provider]')]
           .map(r => [r.dataset.provider, r.dataset.model, r.children[2].textContent]),
  budget: document.getElementById('budget').innerText,
  summary: document.getElementById('summary').textContent,
  banner: document.getElementById('banner').textContent,
  keyForm: !document.getElementById('key-form').classList.contains('hidden'),
  hash: location.hash,
})"""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreeNodes]:
    with ThreeNodes(tmp_path_factory.mktemp("dashboard"), auth_on_a=True) as nodes:
        for model in ("m1", "shared", "shared", "m2"):
            nodes.chat("a", model)
        yield nodes


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    b = Browser(tmp_path / "profile")
    try:
        yield await b.start()
    finally:
        await b.close()


async def page_state(browser: Browser) -> dict[str, Any]:
    raw = await browser.evaluate(PAGE_STATE)
    empty = {"nodes": {}, "graph": {}, "keyForm": False}
    return empty if raw is None else dict(json.loads(raw))


async def test_dashboard_shows_the_mesh_and_marks_a_killed_node_dead(
    mesh: ThreeNodes, browser: Browser, tmp_path: Path
) -> None:
    await browser.call("Page.navigate", url=f"{mesh.a.url}/dashboard#key={ADMIN_SECRET}")

    async def shows_three_alive() -> bool:
        state = await page_state(browser)
        return state["nodes"] == {"a": "alive", "b": "alive", "c": "alive"}

    await wait_until(shows_three_alive, "the page shows a, b and c alive")
    state = await page_state(browser)
    assert state["graph"] == {"a": "alive", "b": "alive", "c": "alive"}
    assert sorted(state["links"]) == ["a-b", "a-c"]
    assert all(label.endswith(" ms") for label in state["rtt"]), state["rtt"]
    for text in ("m1 [openai_compatible] $0.001/$0.001", "m2", "shared", "(this node)"):
        assert text in state["models"], text
    providers = {(p, m): int(n) for p, m, n in state["providers"]}
    assert providers[("upstream", "m1")] == 1 and providers[("mesh:b", "m2")] == 1
    assert sum(n for (_, m), n in providers.items() if m == "shared") == 2
    assert "left" in state["budget"] and "$5" in state["budget"]
    assert "3/3 nodes alive" in state["summary"]
    assert state["banner"] == "" and not state["keyForm"]
    assert state["hash"] == ""  # the key left the address bar
    before = await browser.screenshot(tmp_path / "dashboard-3-alive.png")

    mesh.c.kill()

    # The same open page, no reload: it polls /admin/mesh and recolours c.
    async def c_dead() -> bool:
        state = await page_state(browser)
        return state["nodes"].get("c") == "dead" and state["graph"].get("c") == "dead"

    await wait_until(c_dead, "the open page marks c dead")
    state = await page_state(browser)
    assert state["nodes"]["a"] == "alive" and state["nodes"]["b"] == "alive"
    assert "2/3 nodes alive" in state["summary"]
    after = await browser.screenshot(tmp_path / "dashboard-c-dead.png")
    for shot in (before, after):
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    print(f"screenshots: {before} {after}")


async def test_without_a_key_the_page_asks_for_one(mesh: ThreeNodes, browser: Browser) -> None:
    # A fresh profile: no key in this tab. The shell loads; the admin data is refused.
    await browser.call("Page.navigate", url=f"{mesh.a.url}/dashboard")

    async def asks() -> bool:
        return bool((await page_state(browser))["keyForm"])

    await wait_until(asks, "the page shows the key form")
    state = await page_state(browser)
    assert "HTTP 401" in state["banner"]
    assert state["nodes"] == {}
