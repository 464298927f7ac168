"""CORS in a real headless chromium: a page served from another loopback origin calls a real
node with `fetch` (JSON body and an Authorization header, so the browser sends a preflight).
From the listed origin the preflight passes and the page reads the answer and our exposed
headers; from an origin that is not listed the browser refuses the call and the upstream never
sees it. Skips when chromium is not installed (`apt-get install -y chromium`)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.kit.browser import CHROMIUM, WAIT_S, Browser
from tests.kit.fake_openai import FakeOpenAIProcess
from tests.kit.node_proc import NodeProcess
from tests.kit.wait import wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(CHROMIUM is None,
                       reason="chromium is not installed (apt-get install -y chromium)"),
]

PAGE = b"<!doctype html><html><head><title>cors page</title></head><body>app</body></html>"
CALL = """
fetch(%(url)s, {method: "POST",
  headers: {"Content-Type": "application/json", "Authorization": "Bearer sk-browser",
            "x-stainless-lang": "js"},
  body: JSON.stringify(%(body)s)})
.then(async r => JSON.stringify({status: r.status, provider: r.headers.get("x-aiproxy-provider"),
                                 request_id: r.headers.get("x-request-id"), body: await r.json()}))
.catch(e => JSON.stringify({blocked: String(e)}))
"""


async def _page_server() -> tuple[web.AppRunner, str]:
    async def page(_: web.Request) -> web.Response:
        return web.Response(body=PAGE, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[NodeProcess, FakeOpenAIProcess, str, str]]:
    allowed_runner, allowed = await _page_server()
    other_runner, other = await _page_server()
    fake = FakeOpenAIProcess(models=["gpt-fake"])
    fake.start()
    config = {
        "mesh": {"enabled": False, "mdns": False},
        "server": {"cors": {"allow_origins": [allowed]}},
        "providers": {"local": {"enabled": False}, "up": {
            "type": "openai_compatible", "base_url": fake.base_url,
            "credentials": {"api_key": "sk-up"},
            "models": [{"name": "cloud", "openai_model": "gpt-fake"}]}},
    }
    node = NodeProcess(config, tmp_path, node_id="cors-node")
    try:
        await node.astart()
        yield node, fake, allowed, other
    finally:
        await node.astop()
        fake.stop()
        await allowed_runner.cleanup()
        await other_runner.cleanup()


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    b = Browser(tmp_path / "profile")
    try:
        yield await b.start()
    finally:
        await b.close()


async def _call_from(browser: Browser, origin: str, url: str, body: dict[str, Any]
                     ) -> dict[str, Any]:
    await browser.call("Page.navigate", url=origin + "/")

    async def loaded() -> bool:
        return bool(await browser.evaluate("document.title") == "cors page")

    await wait_for(loaded, f"the page at {origin} is loaded", WAIT_S)
    raw = await browser.evaluate(CALL % {"url": json.dumps(url), "body": json.dumps(body)},
                                 await_promise=True)
    return dict(json.loads(raw))


async def test_browser_fetch_allowed_origin_and_refused_origin(
    setup: tuple[NodeProcess, FakeOpenAIProcess, str, str], browser: Browser
) -> None:
    node, fake, allowed, other = setup
    chat = {"model": "cloud", "messages": [{"role": "user", "content": "hi"}]}
    result = await _call_from(browser, allowed, node.base_url + "/chat/completions", chat)
    assert result.get("status") == 200, result
    assert result["body"]["choices"][0]["message"]["content"] == (
        "Hello from the fake OpenAI server.")
    assert result["provider"] == "up" and result["request_id"]  # exposed headers are readable
    responses = await _call_from(browser, allowed, node.base_url + "/responses",
                                 {"model": "cloud", "input": "hi"})
    assert responses.get("status") == 200, responses
    assert responses["body"]["object"] == "response"
    seen = len(fake.requests())
    assert seen == 2

    refused = await _call_from(browser, other, node.base_url + "/chat/completions", chat)
    assert "blocked" in refused, refused
    assert len(fake.requests()) == seen  # the preflight failed: the POST was never sent
