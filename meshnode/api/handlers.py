"""The route layer: thin handlers that parse, call the router, and write the answer.

Each handler reads its body once (`protocol` parses it once with orjson), asks the router, and
serialises the answer once. Errors are raised as `MeshError` and turned into HTTP by the request
middleware (`meshnode.api.errors`); handlers never build error bodies themselves. No routing,
retry or provider logic lives here.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import orjson
from aiohttp import web
from multidict import istr

from meshnode.api import sse
from meshnode.api.answer import JsonAnswer
from meshnode.api.errors import no_capacity
from meshnode.api.fastdoor import HeadHeaders
from meshnode.api.protocol import parse_request
from meshnode.api.state import CACHE, CONTEXT, STATE, ApiState
from meshnode.errors import InvalidRequest, ModelNotFound
from meshnode.governance.http import GOVERNANCE
from meshnode.routing.outcome import RoutedStream, Served
from meshnode.types import InferenceRequest, RequestKind

_KIND_NAMES = {
    RequestKind.CHAT: "chat completions",
    RequestKind.COMPLETION: "completions",
    RequestKind.EMBEDDING: "embeddings",
}


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # By position: a class called with keywords packs them into a dict for its `__init__`.
    return JsonAnswer(orjson.dumps(data), status, headers)


def _aiproxy_headers(request: web.Request) -> dict[str, str]:
    """The client's `x-aiproxy-*` headers, lower-cased (policies match on them)."""
    headers = request.headers
    # All the names searched at once first (in the head's text on the fast door; else join,
    # lower and find, in C): most requests carry none, and an SDK sends 15-20 headers (the
    # openai client's x-stainless-* among them), which cost ~200 ns each through the loop
    # below (~3 µs a request) and 50 ns here.
    if type(headers) is HeadHeaders:
        if not headers.has_prefix(b"x-aiproxy-"):
            return {}
    elif "x-aiproxy-" not in "\n".join(headers).lower():
        return {}
    out: dict[str, str] = {}
    for name, value in headers.items():
        if len(name) > 10 and name[:10].lower() == "x-aiproxy-":
            out[name.lower()] = value
    return out


# As `istr`: the answer's multidict takes their lower-cased form from them, not anew per answer.
_PROVIDER, _NODE, _COST = istr("x-aiproxy-provider"), istr("x-aiproxy-node"), istr("x-aiproxy-cost")


def _served_headers(served: Served) -> dict[str, str]:
    return {_PROVIDER: served.offer.provider, _NODE: served.node, _COST: f"{served.cost:.8f}"}


def require_model(state: ApiState, model: str, kind: RequestKind) -> None:
    """404 for a model nobody serves (503 for one offered recently whose only provider left:
    `Router.missing_model`); 400 for one served, but not for `kind`."""
    router = state.router
    if not router.has_model(model, kind):
        if router.has_model(model):
            raise InvalidRequest(
                f"model {model!r} does not serve {_KIND_NAMES[kind]} here", param="model"
            )
        raise router.missing_model(model)


# --------------------------------------------------------------------------- inference
async def _infer(kind: RequestKind, kind_value: str, request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    ctx = request[CONTEXT]
    ctx.kind = kind_value  # `kind.value`, given by the route (an enum property per request)
    raw = await request.read()
    inference = parse_request(
        kind, raw, request_id=ctx.request_id, timeout_s=state.timeout_s,
        headers=_aiproxy_headers(request), key_name=ctx.key_name,
    )
    router = state.router
    require_model(state, inference.model, kind)
    ctx.model = inference.model
    ctx.stream = inference.stream
    metrics = state.metrics
    metrics.in_flight.inc()
    try:
        if inference.stream:
            # (Here, not in a coroutine of its own: one frame less on every resumption.)
            response, stream = await open_event_stream(request, state, inference)
            if stream is not None:
                encoder = sse.ChatEvents(stream.served, include_usage=inference.include_usage,
                                         request_id=ctx.request_id)
                await sse.relay(response, stream, encoder, ctx)
            return response
        cache = request.app.get(CACHE)
        if cache is not None:
            routed = await cache.complete(router, inference, request.headers.get("Cache-Control"))
        else:
            routed = await router.complete(inference)
        served = routed.served
        ctx.served = served
        # One serialisation: the provider's body plus our block (a shallow copy, never a
        # mutation of the provider's dict).
        return _json(
            {**routed.completion.body, "x_aiproxy": served.to_json()},
            headers=_served_headers(served),
        )
    finally:
        metrics.in_flight.dec()


# The routes' handlers: `_infer` itself (a partial is a coroutine function to aiohttp), not a
# coroutine that awaits it, which cost one more frame on every resumption of the request. Its
# arguments bound by position, the request last: a partial with keywords calls through a dict.
chat_completions = functools.partial(_infer, RequestKind.CHAT, RequestKind.CHAT.value)
completions = functools.partial(_infer, RequestKind.COMPLETION, RequestKind.COMPLETION.value)
embeddings = functools.partial(_infer, RequestKind.EMBEDDING, RequestKind.EMBEDDING.value)


async def open_event_stream(
    request: web.Request, state: ApiState, inference: InferenceRequest, *, cached: bool = True,
    headers: dict[str, str] | None = None,
) -> tuple[web.StreamResponse, RoutedStream | None]:
    """Route a streamed request (through the answer cache when `cached` and the app has one)
    and send the event-stream headers: the one opening of every SSE answer (chat, completions,
    Responses, Anthropic's messages).

    `(response, None)` when the client went away before the headers went out: the route is
    closed, the request is recorded as `client_closed` (not an internal error with a
    traceback), and the handler returns the unwritten response, which aiohttp drops quietly.
    """
    ctx = request[CONTEXT]
    cache = request.app.get(CACHE) if cached else None
    if cache is not None:
        routed = await cache.open_stream(
            state.router, inference, request.headers.get("Cache-Control"))
    else:
        routed = await state.router.open_stream(inference)
    ctx.served = routed.served
    head = _served_headers(routed.served)
    head["Content-Type"] = "text/event-stream"
    head["Cache-Control"] = "no-cache"
    head["x-request-id"] = ctx.request_id
    head["openai-processing-ms"] = ctx.processing_ms()  # to the head, sent with the first events
    if headers:
        head.update(headers)
    # Its head goes out with the first events, in one write.
    response = sse.event_stream(request, head)
    try:
        await response.prepare(request)
    except ConnectionError:
        await routed.aclose()
        ctx.error_code = "client_closed"
        return response, None
    except BaseException:
        await routed.aclose()
        raise
    return response, routed


# --------------------------------------------------------------------------- models
async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    from meshnode.api import anthropic_door  # the door imports this module: no cycle at load

    if anthropic_door.is_anthropic_client(request):
        return _json(anthropic_door.models_page(state.router.models()))
    return _json(
        {
            "object": "list",
            "data": state.router.models(),
            "x_aiproxy": {"node": state.node_id},
        }
    )


async def get_model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    model_id = request.match_info["model_id"]
    for entry in state.router.models():
        if entry.get("id") == model_id:
            from meshnode.api import anthropic_door

            if anthropic_door.is_anthropic_client(request):
                return _json(anthropic_door.model_info(entry))
            return _json(entry)
    raise ModelNotFound(f"the model {model_id!r} does not exist on this node", param="model")


# --------------------------------------------------------------------------- health, metrics
async def live(request: web.Request) -> web.Response:
    return _json({"status": "live", "node": request.app[STATE].node_id})


async def ready(request: web.Request) -> web.Response:
    """200 when the node can serve: a provider that offers models is ready, and no local worker
    is still warming up (a node is not put in a load balancer while its models load). Else 503
    with every provider's reason. A provider offering nothing (the mesh with no peers yet)
    neither makes the node ready nor holds it back."""
    state = request.app[STATE]
    providers: dict[str, dict[str, Any]] = {}
    any_ready = False
    warming = False
    # What the router learned serving (an upstream that rejects this node's key) outranks
    # what a provider says of itself.
    problems = state.router.provider_problems()
    for provider in state.router.providers:
        ok, why = provider.ready()
        problem = problems.get(provider.name)
        if problem is not None:
            ok, why = False, problem
        offers = bool(provider.offers())
        any_ready = any_ready or (ok and offers)
        warming = warming or (provider.kind == "local" and offers and not ok)
        providers[provider.name] = {"ready": ok, "models": offers, "reason": why or None}
    any_ready = any_ready and not warming
    reasons = [f"{name}: {p['reason'] or 'not ready'}" for name, p in providers.items()
               if not p["ready"]]
    if not any(p["models"] for p in providers.values()):
        reasons.append("no provider offers a model")
    body = {
        "status": "ready" if any_ready else "not_ready",
        "node": state.node_id,
        "providers": providers,
        "reasons": reasons,
    }
    if any_ready:
        return _json(body)
    retry = no_capacity("not ready")
    return _json(body, status=503, headers={"Retry-After": str(int(retry.retry_after or 1))})


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    response = web.Response(body=state.metrics.render())
    response.headers["Content-Type"] = state.metrics.content_type
    return response


# --------------------------------------------------------------------------- admin
async def admin_route(request: web.Request) -> web.Response:
    """GET ?model=M, or POST a chat/completions body: then the ranking weighs its prompt too
    (`cache_aware`: the prefix hit per candidate)."""
    state = request.app[STATE]
    body: dict[str, Any] = {}
    if request.method == "POST":
        try:
            posted = await request.json()
        except ValueError:
            raise InvalidRequest("the body is not JSON") from None
        if not isinstance(posted, dict):
            raise InvalidRequest("the body must be a JSON object")
        body = posted
    model = body.get("model") or request.query.get("model")
    if not model or not isinstance(model, str):
        raise InvalidRequest("'model' is required (query parameter or body)", param="model")
    if not state.router.has_model(model):
        raise ModelNotFound(f"the model {model!r} does not exist on this node", param="model")
    kind = RequestKind.COMPLETION if "prompt" in body else RequestKind.CHAT
    return _json(state.router.explain(model, headers=_aiproxy_headers(request), kind=kind,
                                      body=body))


async def admin_stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body: dict[str, Any] = {
        "node": state.node_id,
        "uptime_s": round(time.time() - state.started_at, 3),
    }
    body.update(state.router.stats())
    governance = request.app.get(GOVERNANCE)
    if governance is not None:
        body["budget"] = governance.budget_summary()  # spent and left (SPEC §4)
    return _json(body)
