"""`GET /dashboard` and its assets: the files in `static/`, shipped in the package, no build step.

The page is a shell that holds no data: everything it shows it reads from `/admin/*` in the
browser, with the admin key as a Bearer token when auth is on. That is why the shell itself is a
public route in `governance.auth` (a browser cannot put a Bearer token on a page navigation);
the data stays behind admin auth.

It also serves `GET /admin/history` (admin, like every `/admin/*`): the node's last 15 minutes
per provider and per node and its last 20 errors (`observability.history`, fed by the metrics'
record calls), which the page draws as small charts and a table.

The files are read once, at first use, from a fixed list (no path from the request ever reaches
the file system). Must not touch: the admin API itself (its handlers live with their owners).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import orjson
from aiohttp import web

from meshnode.api.state import STATE

STATIC_DIR = Path(__file__).resolve().parent / "static"
ASSETS = {
    "app.js": "text/javascript",
    "style.css": "text/css",
}
# No caching by the browser: a node upgraded in place must serve its new page at once.
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
# The page loads nothing from elsewhere and is never framed.
_PAGE_HEADERS = {
    **_HEADERS,
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'"
    ),
}


@cache
def _read(name: str) -> bytes:
    return (STATIC_DIR / name).read_bytes()


async def dashboard_page(request: web.Request) -> web.Response:
    return web.Response(body=_read("index.html"), content_type="text/html", charset="utf-8",
                        headers=_PAGE_HEADERS)


async def dashboard_asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    content_type = ASSETS.get(name)
    if content_type is None:
        raise web.HTTPNotFound()
    return web.Response(body=_read(name), content_type=content_type, charset="utf-8",
                        headers=_HEADERS)


async def dashboard_slash(request: web.Request) -> web.Response:
    raise web.HTTPFound("/dashboard")


async def admin_history(request: web.Request) -> web.Response:
    """`{"node", "history": RequestHistory.snapshot(), "errors": [last 20, newest first]}`."""
    state = request.app[STATE]
    body = {
        "node": state.node_id,
        "history": state.metrics.history.snapshot(),
        "errors": state.metrics.recent_errors.to_json(),
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def add_dashboard_routes(app: web.Application) -> None:
    """A `create_app` route registrar: `/dashboard`, `/dashboard/`, `/dashboard/<asset>` and
    `/admin/history`."""
    app.router.add_get("/admin/history", admin_history)
    app.router.add_get("/dashboard", dashboard_page)
    app.router.add_get("/dashboard/", dashboard_slash)
    app.router.add_get("/dashboard/{name}", dashboard_asset)
