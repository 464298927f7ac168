"""The dashboard's HTTP side over a real server: the page and its assets, nothing else.

The page is a public shell (a browser cannot send a Bearer token on navigation); the data it
shows stays behind admin auth (`/admin/*`), which the browser test exercises with auth on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from meshnode.dashboard import add_dashboard_routes
from meshnode.dashboard.routes import ASSETS, STATIC_DIR
from meshnode.governance.auth import RouteClass, route_class


@pytest.fixture
async def client() -> AsyncIterator[TestClient]:
    app = web.Application()
    add_dashboard_routes(app)
    async with TestClient(TestServer(app, host="127.0.0.1", port=0)) as c:
        yield c


async def test_the_page_and_its_assets_are_served(client: TestClient) -> None:
    page = await client.get("/dashboard")
    assert page.status == 200
    assert page.content_type == "text/html"
    html = await page.text()
    assert '<script src="/dashboard/app.js">' in html and "/dashboard/style.css" in html
    assert "connect-src 'self'" in page.headers["Content-Security-Policy"]
    for name, content_type in ASSETS.items():
        asset = await client.get(f"/dashboard/{name}")
        assert asset.status == 200, name
        assert asset.content_type == content_type
        assert await asset.read() == (STATIC_DIR / name).read_bytes()
    slash = await client.get("/dashboard/", allow_redirects=False)
    assert slash.status == 302 and slash.headers["Location"] == "/dashboard"


@pytest.mark.parametrize("path", ["/dashboard/index.htm", "/dashboard/..%2f__init__.py",
                                  "/dashboard/%2e%2e/routes.py", "/dashboard/app.js.map"])
async def test_nothing_but_the_listed_assets(client: TestClient, path: str) -> None:
    assert (await client.get(path)).status == 404


def test_the_page_reads_only_admin_routes_of_this_node() -> None:
    js = (STATIC_DIR / "app.js").read_text()
    for path in ("/admin/mesh", "/admin/stats", "/admin/budget"):
        assert f'"{path}"' in js
    assert "innerHTML" not in js  # gossiped names go in as text, never as markup
    assert "http://" not in js.replace("http://www.w3.org/2000/svg", "")


def test_route_classes() -> None:
    assert route_class("/dashboard") is RouteClass.PUBLIC
    assert route_class("/dashboard/app.js") is RouteClass.PUBLIC
    assert route_class("/dashboards") is RouteClass.KEY
    assert route_class("/admin/mesh") is RouteClass.ADMIN
