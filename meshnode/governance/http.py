"""The aiohttp side of governance: the auth + rate-limit gate, the `x-ratelimit-*` headers,
and the key-management routes `/admin/keys` (`POST`/`DELETE` answer 404
`key_management_disabled` on a node with auth off: docs/security.md).

`install(app, governance)` (via `Governance.install`, which has the `RouteRegistrar` shape that
`create_app(extra_routes=...)` takes) puts a `GovernanceGate` at `GATE`, which the front door
(`meshnode.api.app`) runs after the body size check and before the body is read: our
`AuthenticationError` / `PermissionDenied` / `RateLimited` become OpenAI-shaped 401 / 403 / 429
answers in the one place that maps errors. Headers are added in
`on_response_prepare`, the one moment that sees streamed and error answers alike before their
headers leave.

Per request, on `POST /v1/*` with a key that has limits: one request is taken from the key's
request bucket before the handler runs, and the answer's real token usage is taken from its
token bucket after it (`ratelimit.py` explains why after). A key limited to some models has its
body's `model` checked here (the body is read once; aiohttp keeps it for the handler).

The request's key (its record) is put on the request's context (`key_of(request)`), for the
handler to pass the key name to the router (policies, per-key budgets) and to the request log
line.
Nothing here writes the Authorization header, the key or its hash anywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from meshnode.api.state import CONTEXT, GATE
from meshnode.errors import InvalidRequest, RateLimited
from meshnode.governance.auth import Authenticator, RouteClass, route_class
from meshnode.governance.keys import KeyRecord
from meshnode.governance.spend_report import spend_report

if TYPE_CHECKING:
    from meshnode.governance.service import Governance

GOVERNANCE: web.AppKey[Any] = web.AppKey("meshnode_governance", object)


def key_of(request: web.Request) -> KeyRecord | None:
    """The API key that authenticated this request (None when auth is off or the route is
    public). It is kept on the request's context (`RequestContext.key`): a miss in the
    request's own mapping costs an exception, and this is asked on every request."""
    ctx = request.get(CONTEXT)
    return ctx.key if ctx is not None else None


def key_name_of(request: web.Request) -> str | None:
    ctx = request.get(CONTEXT)
    return ctx.key_name if ctx is not None else None


def _presented(request: web.Request) -> str | None:
    """`Authorization: Bearer ...`, or Anthropic clients' `x-api-key` (the /v1/messages door)."""
    header = request.headers.get("Authorization")
    if header is None:
        api_key = request.headers.get("x-api-key")
        if api_key:
            return "Bearer " + api_key
    return header


async def _peek_model(request: web.Request) -> str | None:
    # Within server.body_timeout_s, like every body. (Imported here: meshnode.api.server
    # imports the handlers, which import this module.)
    from meshnode.api.server import read_body

    raw = await read_body(request)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None  # the handler answers 400 with the details
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else None


class GovernanceGate:
    """The front door's admission step (`meshnode.api.state.Gate`) on a node with auth on:
    authenticate and authorize, check a model-limited key's model, take one request from the
    key's request bucket; after the handler, charge the answer's tokens."""

    def __init__(self, gov: Governance) -> None:
        self._authenticator = gov.authenticator
        self._limiter = gov.limiter

    async def admit(self, request: web.Request) -> bool:
        route = route_class(request.path)
        if route is RouteClass.PUBLIC:
            return False
        record = self._authenticator.authenticate(_presented(request))
        Authenticator.authorize(record, route)
        ctx = request[CONTEXT]  # the front door made it before asking the gate
        ctx.key = record
        if request.method != "POST" or not request.path.startswith("/v1/"):
            return False
        if record.models is not None:
            model = await _peek_model(request)
            if model is not None:
                Authenticator.authorize_model(record, model)
        if record.rpm is None and record.tpm is None:
            return False
        decision = self._limiter.acquire(record.name, record.rpm, record.tpm)
        ctx.rate = decision
        if not decision.allowed:
            per = "requests" if decision.limited_by == "requests" else "tokens"
            limit = decision.limit_requests if per == "requests" else decision.limit_tokens
            raise RateLimited(
                f"Rate limit reached for API key '{record.name}': {limit} {per} per minute. "
                f"Try again in {decision.retry_after_s:.3g}s.",
                retry_after=decision.retry_after_s,
            )
        return True

    def settle(self, request: web.Request) -> None:
        ctx = request[CONTEXT]
        record, served = ctx.key, ctx.served
        if record is not None and served is not None:
            self._limiter.charge_tokens(record.name, record.tpm, served.usage.total_tokens)


async def _rate_headers(request: web.Request, response: web.StreamResponse) -> None:
    ctx = request.get(CONTEXT)
    decision = ctx.rate if ctx is not None else None
    if decision is not None:
        response.headers.update(decision.headers())


# --------------------------------------------------------------------------- /admin/keys
def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _opt_number(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise InvalidRequest(f"'{name}' must be a number >= 0", param=name)
    if kind is int and not float(value).is_integer():
        raise InvalidRequest(f"'{name}' must be an integer", param=name)
    return kind(value)


class KeyManagementDisabled(InvalidRequest):
    """Key management on a node with auth off: it cannot tell who asks (404: not served)."""

    status = 404
    code = "key_management_disabled"


def _require_auth(gov: Governance) -> None:
    if not gov.auth_enabled:
        raise KeyManagementDisabled(
            "Key management is not served by this node: it runs with auth.enabled: false, so "
            "it cannot tell who is asking, and a key it created would be trusted by the mesh. "
            "Manage keys on a node with auth on (or with `meshnode keys` on this host)."
        )


async def create_key(request: web.Request) -> web.Response:
    gov = request.app[GOVERNANCE]
    _require_auth(gov)
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise InvalidRequest("the body must be a JSON object") from None
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        raise InvalidRequest("'name' is required", param="name")
    models = body.get("models")
    if models is not None and (
        not isinstance(models, list) or not all(isinstance(m, str) for m in models)
    ):
        raise InvalidRequest("'models' must be a list of model names", param="models")
    record, secret = gov.keys.create(
        body["name"],
        rpm=_opt_number(body, "rpm", int),
        tpm=_opt_number(body, "tpm", int),
        daily_limit=_opt_number(body, "daily_limit", float),
        monthly_limit=_opt_number(body, "monthly_limit", float),
        models=models,
        admin=bool(body.get("admin", False)),
    )
    return _json({**record.public(), "key": secret}, status=201)


async def list_keys(request: web.Request) -> web.Response:
    gov = request.app[GOVERNANCE]
    return _json({"object": "list", "data": [r.public() for r in gov.keys.records()]})


async def revoke_key(request: web.Request) -> web.Response:
    gov = request.app[GOVERNANCE]
    _require_auth(gov)
    record = gov.keys.revoke(request.match_info["name"])
    return _json(record.public())


async def admin_budget(request: web.Request) -> web.Response:
    gov = request.app[GOVERNANCE]
    return _json(gov.budget_summary())


async def admin_spend(request: web.Request) -> web.Response:
    """Per key and per node, today and this month (`spend_report`)."""
    gov = request.app[GOVERNANCE]
    summary = gov.ledger.summary()
    return _json(spend_report(gov.node_id, summary["day"], summary["month"],
                              gov.ledger.export_counters(), gov.keys.records()))


def install(app: web.Application, gov: Governance) -> None:
    app[GOVERNANCE] = gov
    if gov.auth_enabled:  # with auth off the gate would only cost time (and no rate is ever decided)
        app[GATE] = GovernanceGate(gov)
        app.on_response_prepare.append(_rate_headers)
    app.router.add_post("/admin/keys", create_key)
    app.router.add_get("/admin/keys", list_keys)
    app.router.add_delete("/admin/keys/{name}", revoke_key)
    app.router.add_get("/admin/budget", admin_budget)
    app.router.add_get("/admin/spend", admin_spend)
