"""The MeshError tree: every failure meshnode reports, and how it maps to HTTP and to retries.

Foreign errors (aiohttp, grpc, torch, an upstream's JSON) are translated into these once, at the
edge that meets them (an adapter, the rpc layer, the worker client). Everything inside meshnode
raises and catches only these. The API layer turns one into OpenAI's error shape in one place
(`meshnode.api.errors`).

    MeshError                         500 internal_error            not retryable
    ├── InvalidRequest                400 invalid_request_error     not retryable (client's fault)
    ├── AuthenticationError           401 authentication_error
    ├── PermissionDenied              403 permission_error
    ├── ModelNotFound                 404 invalid_request_error, code model_not_found
    ├── NotFound                      404 invalid_request_error, code not_found (a stored object)
    ├── RequestTimeout                408 invalid_request_error     (the body did not arrive)
    ├── PayloadTooLarge               413 invalid_request_error
    ├── RateLimited                   429 code rate_limit_exceeded  (our own limits, Retry-After)
    ├── BudgetExceeded                429 code budget_exceeded      (Retry-After)
    ├── NoCapacity                    503 service_unavailable       (nothing can serve now)
    ├── DeadlineExceeded              504 timeout
    ├── ConfigError                   not an HTTP error: the node refuses to start
    ├── StateFileError                not an HTTP error: a file in data_dir cannot be trusted,
    │                                 the node refuses to start (one line naming the file)
    └── UpstreamError                 502 upstream_error            retryable elsewhere
        ├── UpstreamUnavailable       502  connection refused/reset, 5xx, bad body: retryable
        ├── UpstreamTimeout           504  connect or first-byte timeout: retryable
        ├── UpstreamRateLimited       429 upstream said slow down: retryable elsewhere, with its
        │                                 Retry-After kept for the cooldown
        ├── UpstreamBadRequest        400 upstream rejected the request itself: NOT retryable,
        │                                 another provider would reject it too
        ├── UpstreamAuthError         502 upstream rejected our credentials: not retryable on the
        │                                 same provider; the router still fails over (the request
        │                                 is fine), cools it down and reports it
        └── StreamBroken              502 the stream broke after the first byte reached the
                                          client: never retried (text would be duplicated)

`retryable` says whether the router may try the same request on another candidate. It is only
ever consulted before the first byte of an answer reaches the client.
"""

from __future__ import annotations


class MeshError(Exception):
    """Base of every error meshnode raises on purpose."""

    status: int = 500
    error_type: str = "internal_error"
    code: str | None = None
    retryable: bool = False
    # What the router tried before giving up (routing.outcome.Attempt), for the request's log
    # line and metrics; empty for errors raised outside the failover loop.
    attempts: tuple[object, ...] = ()
    # An OpenAI-shaped upstream error's own `type` and `code` (`context_length_exceeded`,
    # `insufficient_quota`): the client gets those, clients branch on them; ours then go in
    # the body's `x_aiproxy`. None for errors that are ours.
    upstream_wire: tuple[str, str | None] | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        provider: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after
        self.provider = provider

    def to_openai(self) -> dict[str, object]:
        """OpenAI's error body. Never carries a stack trace or a secret."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(MeshError):
    """The client sent something we cannot serve; no provider would do better."""

    status = 400
    error_type = "invalid_request_error"


class AuthenticationError(MeshError):
    status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(MeshError):
    status = 403
    error_type = "permission_error"
    code = "permission_denied"


class ModelNotFound(MeshError):
    status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class NotFound(MeshError):
    """A stored object (a response of the Responses API) that does not exist for this caller."""

    status = 404
    error_type = "invalid_request_error"
    code = "not_found"
class RequestTimeout(MeshError):
    """The client did not send its request body within `server.body_timeout_s`."""

    status = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(MeshError):
    status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(MeshError):
    status = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class BudgetExceeded(MeshError):
    status = 429
    error_type = "rate_limit_error"
    code = "budget_exceeded"


class NoCapacity(MeshError):
    """Nothing can serve the request now (all candidates failed, cooled down or forbidden)."""

    status = 503
    error_type = "service_unavailable"
    code = "no_capacity"


class DeadlineExceeded(MeshError):
    status = 504
    error_type = "timeout"
    code = "deadline_exceeded"


class ConfigError(MeshError):
    """The configuration is invalid; `errors` lists every problem as 'path: message'."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("invalid configuration:\n  " + "\n  ".join(errors))
        self.errors = errors


class StateFileError(MeshError):
    """A file in data_dir is missing, empty or damaged where the node must not guess. The
    message names the file and, when there is one, the flag that accepts starting afresh."""

    def __init__(self, path: object, problem: str, remedy: str | None = None) -> None:
        message = f"{path} {problem}"
        if remedy:
            message += f"; {remedy}"
        super().__init__(message)
        self.path = path
        self.problem = problem


class UpstreamError(MeshError):
    """A provider (cloud, local worker or peer) failed. Retryable elsewhere unless a subclass
    says otherwise."""

    status = 502
    error_type = "upstream_error"
    code = "upstream_error"
    retryable = True


class UpstreamUnavailable(UpstreamError):
    """Connection refused or reset, a 5xx, or a body we cannot read: another candidate may work."""


class UpstreamTimeout(UpstreamError):
    """Connect or first-byte deadline passed: another candidate may be faster."""

    status = 504
    error_type = "timeout"
    code = "upstream_timeout"


class UpstreamRateLimited(UpstreamError):
    """The upstream said 429: another candidate may have room; `retry_after` feeds the cooldown."""

    status = 429
    error_type = "rate_limit_error"
    code = "upstream_rate_limited"


class UpstreamBadRequest(UpstreamError):
    """The upstream rejected the request itself (400/404/422). Not retryable: the request is
    the problem and another provider would reject it too."""

    status = 400
    error_type = "invalid_request_error"
    code = "upstream_bad_request"
    retryable = False


class UpstreamAuthError(UpstreamError):
    """The upstream rejected the operator's credentials (401/403). Not retryable on this
    provider (the key will not heal); the router moves on to the next candidate all the same,
    since the request is not at fault, and makes the misconfiguration visible instead: an
    ERROR line, a cooldown, `/health/ready` and a metric (meshnode.routing.router)."""

    status = 502
    error_type = "upstream_error"
    code = "upstream_auth_error"
    retryable = False


class StreamBroken(UpstreamError):
    """A stream broke after its first byte reached the client. Never retried."""

    retryable = False
    code = "stream_broken"
