"""`POST /v1/images/generations`: OpenAI's image endpoint, served where a provider draws
(Cloudflare's `@cf/stabilityai/...` models today).

This module owns the validation of the images body and the thin handler; the router picks the
provider like for any other kind (`RequestKind.IMAGE`), and the provider returns OpenAI's images
response (`{"created", "data": [{"b64_json"}]}`), to which `x_aiproxy` is added.

`model` may be left out (OpenAI's client allows it): the node then uses its one image model, and
asks for `model` when it has several.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

from meshnode.api.answer import JSON
from meshnode.api.handlers import _aiproxy_headers, _served_headers
from meshnode.api.protocol import loads_body, strip_redirects
from meshnode.api.state import CONTEXT, STATE
from meshnode.errors import InvalidRequest
from meshnode.governance.http import key_name_of
from meshnode.providers.tokens import estimate_tokens
from meshnode.routing.router import Router
from meshnode.types import InferenceRequest, RequestKind

MAX_IMAGES = 10
MAX_PROMPT_CHARS = 32_000
RESPONSE_FORMATS = ("b64_json", "url")


def _image_models(router: Router) -> list[str]:
    return [m["id"] for m in router.models() if RequestKind.IMAGE.value in m.get("kinds", ())]


def parse_images(
    body: dict[str, Any],
    router: Router,
    *,
    request_id: str,
    deadline: float,
    headers: dict[str, str] | None = None,
    key_name: str | None = None,
) -> InferenceRequest:
    """Validate an images body (each problem an InvalidRequest naming its `param`)."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequest("'prompt' is required and must be a non-empty string",
                             param="prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequest(f"'prompt' is longer than {MAX_PROMPT_CHARS} characters",
                             param="prompt")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES:
        raise InvalidRequest(f"'n' must be an integer from 1 to {MAX_IMAGES}", param="n")
    size = body.get("size")
    if size is not None and not isinstance(size, str):
        raise InvalidRequest("'size' must be a string like '1024x1024'", param="size")
    response_format = body.get("response_format")
    if response_format is not None and response_format not in RESPONSE_FORMATS:
        raise InvalidRequest("'response_format' must be 'b64_json' or 'url'",
                             param="response_format")
    model = body.get("model")
    if model is None:
        candidates = _image_models(router)
        if len(candidates) != 1:
            raise InvalidRequest(
                "'model' is required: this node serves "
                + (", ".join(candidates) if candidates else "no image model"),
                param="model",
            )
        model = candidates[0]
        body = {**body, "model": model}
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' must be a non-empty string", param="model")
    return InferenceRequest(
        kind=RequestKind.IMAGE,
        model=model,
        body=strip_redirects(body),
        request_id=request_id,
        deadline=deadline,
        key_name=key_name,
        headers=headers or {},
        prompt_tokens_estimate=estimate_tokens(prompt),
    )


async def images_generations(request: web.Request) -> web.Response:
    """`POST /v1/images/generations`."""
    state = request.app[STATE]
    ctx = request[CONTEXT]
    ctx.kind = RequestKind.IMAGE.value
    inference = parse_images(
        loads_body(await request.read()), state.router, request_id=ctx.request_id,
        deadline=time.monotonic() + state.timeout_s, headers=_aiproxy_headers(request),
        key_name=key_name_of(request),
    )
    if not state.router.has_model(inference.model, RequestKind.IMAGE):
        if state.router.has_model(inference.model):
            raise InvalidRequest(
                f"model {inference.model!r} does not generate images here", param="model"
            )
        raise state.router.missing_model(inference.model)
    ctx.model = inference.model
    state.metrics.in_flight.inc()
    try:
        routed = await state.router.complete(inference)
    finally:
        state.metrics.in_flight.dec()
    ctx.served = routed.served
    return web.Response(
        body=orjson.dumps({**routed.completion.body, "x_aiproxy": routed.served.to_json()}),
        content_type=JSON, headers=_served_headers(routed.served),
    )


def add_image_routes(app: web.Application) -> None:
    """Register `POST /v1/images/generations` (a `RouteRegistrar`)."""
    app.router.add_post("/v1/images/generations", images_generations)


__all__ = ["add_image_routes", "images_generations", "parse_images"]
