"""MeshError -> OpenAI error JSON, status and headers, in one place."""

from __future__ import annotations

import orjson
import pytest

from meshnode.api.errors import error_response, retry_after_header, unexpected_error_response
from meshnode.errors import (
    BudgetExceeded,
    DeadlineExceeded,
    InvalidRequest,
    MeshError,
    ModelNotFound,
    NoCapacity,
    PayloadTooLarge,
    RateLimited,
    UpstreamAuthError,
    UpstreamTimeout,
    UpstreamUnavailable,
)


@pytest.mark.parametrize(
    ("exc", "status", "type_", "code"),
    [
        (InvalidRequest("bad", param="n"), 400, "invalid_request_error", None),
        (ModelNotFound("nope", param="model"), 404, "invalid_request_error", "model_not_found"),
        (PayloadTooLarge("big"), 413, "invalid_request_error", "request_too_large"),
        (RateLimited("slow", retry_after=2.2), 429, "rate_limit_error", "rate_limit_exceeded"),
        (BudgetExceeded("broke"), 429, "rate_limit_error", "budget_exceeded"),
        (UpstreamUnavailable("reset"), 502, "upstream_error", "upstream_error"),
        (UpstreamAuthError("401"), 502, "upstream_error", "upstream_auth_error"),
        (NoCapacity("none"), 503, "service_unavailable", "no_capacity"),
        (DeadlineExceeded("late"), 504, "timeout", "deadline_exceeded"),
        (UpstreamTimeout("slow"), 504, "timeout", "upstream_timeout"),
    ],
)
def test_mapping(exc: MeshError, status: int, type_: str, code: str | None) -> None:
    response = error_response(exc, "req-1", "node-a")
    assert response.status == status
    assert response.headers["x-request-id"] == "req-1"
    assert response.headers["x-aiproxy-node"] == "node-a"
    assert response.body is not None
    body = orjson.loads(response.body)  # type: ignore[arg-type]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type_
    assert body["error"]["code"] == code
    assert body["error"]["param"] == exc.param
    if status in (429, 503):
        assert int(response.headers["Retry-After"]) >= 1
    else:
        assert "Retry-After" not in response.headers


def test_retry_after_rounds_up_and_defaults() -> None:
    assert retry_after_header(RateLimited("x", retry_after=2.2)) == "3"
    assert retry_after_header(NoCapacity("x")) == "1"
    assert retry_after_header(NoCapacity("x", retry_after=float("inf"))) == "1"
    assert retry_after_header(NoCapacity("x", retry_after=0.01)) == "1"
    assert retry_after_header(InvalidRequest("x")) is None


def test_secret_in_a_message_is_redacted() -> None:
    exc = UpstreamAuthError("upstream said: invalid key sk-live1234567890abcdef")
    body = orjson.loads(error_response(exc, "r", "n").body)  # type: ignore[arg-type]
    assert "sk-live1234567890abcdef" not in body["error"]["message"]


def test_unexpected_error_is_generic_with_request_id() -> None:
    try:
        raise KeyError("api_key=sk-abcdefghijklmnop")
    except KeyError as exc:
        response = unexpected_error_response(exc, "req-42", "n")
    assert response.status == 500
    text = response.body.decode()  # type: ignore[union-attr]
    assert "req-42" in text
    assert "sk-" not in text and "Traceback" not in text and "KeyError" not in text
