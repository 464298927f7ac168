"""The one place where errors become HTTP answers in OpenAI's shape.

`MeshError` subclasses carry their status, type and code (see `meshnode.errors`); this module
adds the headers (`Retry-After` on 429 and 503, `x-request-id`) and the body
`{"error": {"message", "type", "param", "code"}}`. Anything else (a bug) becomes a 500 with a
generic message naming the request id, and is logged with its traceback; the body never carries
a stack trace or a secret (messages pass through redaction too, since an adapter may quote an
upstream body).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import orjson
from aiohttp import web

from meshnode.api.answer import JsonAnswer
from meshnode.errors import MeshError, NoCapacity, PayloadTooLarge
from meshnode.observability.redact import redact

log = logging.getLogger(__name__)

# When we have no better hint, tell clients to come back in a second rather than hammer us.
DEFAULT_RETRY_AFTER_S = 1.0


def error_body(exc: MeshError) -> dict[str, Any]:
    """OpenAI's error object for `exc`, with the message and param redacted. An OpenAI-shaped upstream
    error keeps its own `type` and `code` (clients branch on `context_length_exceeded`);
    ours go in `x_aiproxy` then."""
    wire = exc.upstream_wire
    body: dict[str, Any] = {
        "error": {
            "message": redact(exc.message),
            "type": exc.error_type if wire is None else wire[0],
            "param": redact(exc.param) if exc.param is not None else None,
            "code": exc.code if wire is None else wire[1],
        }
    }
    if wire is not None:
        body["x_aiproxy"] = {"error_type": exc.error_type, "error_code": exc.code,
                             "provider": exc.provider}
    return body


def internal_error_message(request_id: str) -> str:
    """What a client is told of a bug: nothing of it, only the request id to quote."""
    return f"internal error; quote request id {request_id} when reporting it"


def internal_error_body(request_id: str) -> dict[str, Any]:
    return {
        "error": {
            "message": internal_error_message(request_id),
            "type": "internal_error",
            "param": None,
            "code": "internal_error",
        }
    }


def retry_after_header(exc: MeshError) -> str | None:
    """`Retry-After` in whole seconds for 429 and 503 answers, else None."""
    if exc.status != 429 and exc.status != 503:
        return None
    seconds = exc.retry_after
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        seconds = DEFAULT_RETRY_AFTER_S
    return str(max(1, math.ceil(seconds)))


def error_response(exc: MeshError, request_id: str, node_id: str) -> web.Response:
    """The HTTP answer for a MeshError."""
    headers = {"x-request-id": request_id, "x-aiproxy-node": node_id}
    retry_after = retry_after_header(exc)
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    if exc.provider:
        headers["x-aiproxy-provider"] = exc.provider
    return JsonAnswer(orjson.dumps(error_body(exc)), status=exc.status, headers=headers)


def unexpected_error_response(
    exc: BaseException, request_id: str, node_id: str
) -> web.Response:
    """A 500 for a bug: logged with its traceback here, generic in the body."""
    log.error(
        "unhandled error serving request %s: %s",
        request_id,
        type(exc).__name__,
        exc_info=exc,
        extra={"request_id": request_id},
    )
    return JsonAnswer(orjson.dumps(internal_error_body(request_id)), status=500,
                      headers={"x-request-id": request_id, "x-aiproxy-node": node_id})


def stream_error_event(exc: BaseException, request_id: str) -> bytes:
    """The SSE event that ends a stream which broke after its first byte (no `[DONE]` follows).
    Anything but a MeshError gets the generic body; the relay (`meshnode.api.sse`) logs it."""
    body = error_body(exc) if isinstance(exc, MeshError) else internal_error_body(request_id)
    return b"data: " + orjson.dumps(body) + b"\n\n"


def no_capacity(reason: str) -> NoCapacity:
    return NoCapacity(reason, retry_after=DEFAULT_RETRY_AFTER_S)


def http_error_response(
    exc: web.HTTPException, request_id: str, node_id: str, max_body_bytes: int
) -> web.Response:
    """aiohttp's own refusals (unknown route, wrong method, body too large) in OpenAI's shape."""
    if exc.status == 413:
        return error_response(
            PayloadTooLarge(f"request body is larger than {max_body_bytes} bytes"),
            request_id,
            node_id,
        )
    error_type = "invalid_request_error" if exc.status < 500 else "internal_error"
    body = {
        "error": {
            "message": exc.reason if exc.status != 404 else "no such route",
            "type": error_type,
            "param": None,
            "code": {404: "not_found", 405: "method_not_allowed"}.get(exc.status),
        }
    }
    headers = {"x-request-id": request_id, "x-aiproxy-node": node_id}
    allow = exc.headers.get("Allow")
    if allow:
        headers["Allow"] = allow
    return JsonAnswer(orjson.dumps(body), status=exc.status, headers=headers)
