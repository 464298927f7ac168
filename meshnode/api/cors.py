"""CORS: browser apps on listed origins may call the API (`server.cors`).

With no `allow_origins` (the default) nothing is installed and nothing changes: no CORS header
is ever sent and an `OPTIONS` request gets the router's 405. With origins listed:

- a preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) on any route of the
  app is answered here (`CorsPolicy.preflight`, the front door's first step), before
  authentication (browsers never send credentials on a preflight): 204 with the allowed origin, the route's methods, the headers the browser asked
  for (SDKs send their own, `x-stainless-*`, `anthropic-version`, ...), `Max-Age`, and the
  private-network permission when Chrome asks for it (Private Network Access: a public page
  calling a node on a private address); from an origin that is not listed, or for a method the route lacks, 403 with no CORS header, so the
  browser refuses the call;
- every other answer to a listed origin (errors and streams included: the headers are added
  when the response is prepared) carries `Access-Control-Allow-Origin` and exposes our
  headers (`x-request-id`, `x-aiproxy-*`, `openai-processing-ms`, `Retry-After`, ...).

`*` allows every origin and is sent as `*`; credentials are then never allowed (the config
refuses the combination, and this module never sends `Allow-Credentials` with `*`).
This module owns only these headers; it does not authenticate or route.
"""

from __future__ import annotations

import re

import orjson
from aiohttp import web
from aiohttp.web_exceptions import HTTPMethodNotAllowed

from meshnode.config import CorsConfig

EXPOSED_HEADERS = ", ".join([
    "x-request-id", "request-id", "x-aiproxy-provider", "x-aiproxy-node", "x-aiproxy-cost",
    "openai-processing-ms", "openai-model", "openai-version", "retry-after",
    "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
    "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens",
])
_HEADER_LIST = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*")
_MAX_REQUEST_HEADERS = 2048


class CorsPolicy:
    """Decides per request; built once from `server.cors`."""

    def __init__(self, config: CorsConfig) -> None:
        self.any_origin = "*" in config.allow_origins
        self.origins = frozenset(o for o in config.allow_origins if o != "*")
        self.credentials = config.allow_credentials and not self.any_origin
        self.max_age = str(config.max_age_s)

    def allow_origin(self, origin: str | None) -> str | None:
        """The `Access-Control-Allow-Origin` value for `origin`, or None when not allowed."""
        if not origin:
            return None
        if origin in self.origins:
            return origin
        if self.any_origin:
            return "*"
        return None

    def add_headers(self, headers: web.StreamResponse | web.Response, allowed: str) -> None:
        out = headers.headers
        out["Access-Control-Allow-Origin"] = allowed
        if allowed != "*":
            out["Vary"] = "Origin"
            if self.credentials:
                out["Access-Control-Allow-Credentials"] = "true"

    def preflight(self, request: web.Request) -> web.Response | None:
        """The whole answer to a preflight (204, or 403 refused), or None when `request` is
        not one (or names no route: it gets the usual 404) and is served as usual. The front
        door (`meshnode.api.app`) asks this first, before authentication."""
        origin = request.headers.get("Origin")
        wanted = request.headers.get("Access-Control-Request-Method")
        if request.method != "OPTIONS" or origin is None or wanted is None:
            return None
        allowed = self.allow_origin(origin)
        if allowed is None:
            return _refused(f"origin {origin!r} is not allowed (server.cors.allow_origins)")
        problem = request.match_info.http_exception
        if problem is not None and not isinstance(problem, HTTPMethodNotAllowed):
            return None  # no such route: the usual 404
        methods = (sorted(problem.allowed_methods) if isinstance(problem, HTTPMethodNotAllowed)
                   else [request.method])
        if wanted.upper() not in methods:
            return _refused(f"{wanted} is not allowed on {request.path}")
        response = web.Response(status=204)
        self.add_headers(response, allowed)
        response.headers["Access-Control-Allow-Methods"] = ", ".join(methods)
        asked = request.headers.get("Access-Control-Request-Headers", "").strip()
        if asked and len(asked) <= _MAX_REQUEST_HEADERS and _HEADER_LIST.fullmatch(asked):
            response.headers["Access-Control-Allow-Headers"] = asked
        response.headers["Access-Control-Max-Age"] = self.max_age
        if request.headers.get("Access-Control-Request-Private-Network") == "true":
            # Chrome's Private Network Access: a public page calling a node on this network
            # or on loopback asks first; a listed origin may.
            response.headers["Access-Control-Allow-Private-Network"] = "true"
        return response


CORS = web.AppKey("meshnode_cors_policy", CorsPolicy)


def _refused(reason: str) -> web.Response:
    body = {"error": {"message": reason, "type": "invalid_request_error", "param": None,
                      "code": "cors_refused"}}
    return web.Response(status=403, body=orjson.dumps(body), content_type="application/json")


def install(app: web.Application, config: CorsConfig) -> None:
    """Put the policy where the front door finds it (`CORS`: it answers preflights first) and
    add the response hook, when origins are set."""
    if not config.allow_origins:
        return
    policy = CorsPolicy(config)

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return  # a preflight: answered (or refused) completely by `preflight`
        allowed = policy.allow_origin(request.headers.get("Origin"))
        if allowed is not None:
            policy.add_headers(response, allowed)
            response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS

    app[CORS] = policy
    app.on_response_prepare.append(on_prepare)


__all__ = ["CORS", "CorsPolicy", "EXPOSED_HEADERS", "install"]
