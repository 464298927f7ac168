"""The dashboard in a real headless browser (Debian's chromium) against a real three-node mesh.

One page stays open the whole test and is driven over the Chrome DevTools Protocol (chromium's
own `--remote-debugging-port`, spoken with aiohttp's websocket client: no driver to install).
Node a has auth on; the page gets the admin key from its fragment (`#key=...`, which never
reaches the server), as an operator would paste it. The test checks that the page shows all
three nodes alive with their models and links, the traffic per provider and the budget left;
then makes a's upstream fail three requests and checks the error rate (75% of four, not the
breaker's 0%), the last errors with their request ids, the history charts per provider and per
node, and the per-key spend; a screenshot of the history section is decoded (a small PNG
reader below) and must show the first series' line colour. Then it SIGKILLs node c and waits
for the same open page to mark c dead (no reload: the page polls the admin API); it saves
screenshots before and after under the test's tmp dir.

Skips when chromium is not installed (`apt-get install -y chromium`).
"""

from __future__ import annotations

import json
import struct
import urllib.error
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kit.browser import CHROMIUM, WAIT_S, Browser
from tests.kit.fake_openai import Behaviour
from tests.kit.three_nodes import ADMIN_SECRET, ThreeNodes
from tests.kit.wait import wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(CHROMIUM is None,
                       reason="chromium is not installed (apt-get install -y chromium)"),
]


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and RGB(A) rows of an 8-bit truecolour PNG (what chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height, channels = 8, b"", 0, 0, 3
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and colour in (2, 6), (depth, colour)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw, stride, rows = zlib.decompress(idat), width * channels, []
    prev = bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b, c = prev[i], prev[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, [bytes(r[i:i + 3]) for r in rows for i in range(0, stride, channels)]


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
  errorRates: Object.fromEntries([...document.querySelectorAll('#providers tbody tr[data-provider]')]
           .map(r => [r.dataset.provider + '/' + r.dataset.model,
                      r.querySelector('[data-error-rate]').textContent])),
  errors: [...document.querySelectorAll('#errors tbody tr[data-request-id]')]
           .map(r => [r.dataset.requestId, r.children[2].textContent, r.children[7].textContent]),
  historyProviders: (document.getElementById('history-provider').dataset.series || '').split(','),
  historyNodes: (document.getElementById('history-node').dataset.series || '').split(','),
  lines: [...document.querySelectorAll('#history-provider polyline')]
           .map(l => l.dataset.series + ':' + l.dataset.field),
  spend: Object.fromEntries([...document.querySelectorAll('#spend tbody tr[data-key]')]
           .map(r => [r.dataset.key, r.children[1].textContent])),
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

    await wait_for(shows_three_alive, "the page shows a, b and c alive", WAIT_S)
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
    assert state["errorRates"][("upstream/m1")] == "0.0%"
    assert "upstream" in state["historyProviders"] and "mesh:b" in state["historyProviders"]
    assert {"a", "b"} <= set(state["historyNodes"])
    assert "upstream:requests" in state["lines"] and "upstream:p95_ms" in state["lines"]
    assert state["spend"]["ops"].startswith("$") and state["spend"]["ops"] != "$0"

    # Three failures of a's own upstream: a client-side 400 the breaker does not count.
    mesh.fake.script(Behaviour.error(400, model="m1", times=3))
    failed = []
    for _ in range(3):
        try:
            mesh.chat("a", "m1")
        except urllib.error.HTTPError as exc:
            assert exc.code == 400
            failed.append(exc.headers["x-request-id"])
    assert len(failed) == 3

    async def shows_the_errors() -> bool:
        state = await page_state(browser)
        return [e[0] for e in state["errors"]][:3] == failed[::-1]

    await wait_for(shows_the_errors,
                   "the page lists the three failed requests, newest first", WAIT_S)
    state = await page_state(browser)
    assert state["errorRates"]["upstream/m1"] == "75.0%"  # 3 of 4
    assert all(status == "400" and attempts == "1" for _, status, attempts in state["errors"][:3])
    before = await browser.screenshot(tmp_path / "dashboard-3-alive.png")
    box = json.loads(await browser.evaluate(
        "JSON.stringify(document.querySelector('#history-provider svg[data-chart=requests]')"
        ".getBoundingClientRect())"))
    shot = await browser.screenshot(
        tmp_path / "dashboard-history.png",
        {"x": box["x"], "y": box["y"] + 0.0, "width": box["width"], "height": box["height"]})
    width, height, pixels = png_pixels(shot.read_bytes())
    assert width >= 200 and height >= 60
    # The chart alone (no legend): each series is a 2 px line in its own colour (the page's
    # palette, in series order) across the 15 minutes; the top one is seen end to end.
    palette = [bytes.fromhex(c) for c in ("58a6ff", "3fb950", "d29922", "f85149")]
    drawn = [sum(1 for px in pixels if px == colour) for colour in palette]
    assert max(drawn) > 1.5 * width, drawn

    mesh.c.kill()

    # The same open page, no reload: it polls /admin/mesh and recolours c.
    async def c_dead() -> bool:
        state = await page_state(browser)
        return state["nodes"].get("c") == "dead" and state["graph"].get("c") == "dead"

    await wait_for(c_dead, "the open page marks c dead", WAIT_S)
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

    await wait_for(asks, "the page shows the key form", WAIT_S)
    state = await page_state(browser)
    assert "HTTP 401" in state["banner"]
    assert state["nodes"] == {}
