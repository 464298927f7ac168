"""Typed state shared by the app, its front-door middleware and its handlers.

`STATE` (an `aiohttp.web.AppKey`) holds the app-wide `ApiState`; `CONTEXT` (a `RequestKey`)
holds the per-request `RequestContext` the front door creates and the handlers fill in; `GATE`
holds the admission step (governance: auth, rate limits) the front door runs before a handler,
when a registrar installed one. Kept apart from `app.py` so handlers can import it without a
cycle.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from meshnode.cache.service import ResponseCache
from meshnode.observability.metrics import Metrics
from meshnode.routing.outcome import Served
from meshnode.routing.router import Router

if TYPE_CHECKING:
    from meshnode.governance.keys import KeyRecord
    from meshnode.governance.ratelimit import RateDecision


@dataclass(frozen=True, slots=True)
class ApiState:
    """What handlers may use. One per app; never mutated."""

    router: Router
    node_id: str
    metrics: Metrics
    max_body_bytes: int
    timeout_s: float  # routing.timeouts.total_ms: the whole-request deadline
    started_at: float = field(default_factory=time.time)


@dataclass(slots=True)
class RequestContext:
    """Per-request facts gathered for the request log line and metrics, and what the gate
    decided (`key`, `rate`: set by governance's gate, read through `governance.http`)."""

    request_id: str
    started: float  # time.perf_counter()
    kind: str | None = None  # set by inference handlers only
    model: str | None = None  # set once the model is known to be served here
    stream: bool = False
    served: Served | None = None
    ttft_s: float | None = None
    error_code: str | None = None
    error_provider: str | None = None
    attempts: tuple[object, ...] = ()  # what the router tried, for a request that failed
    key: KeyRecord | None = None  # the API key that authenticated the request
    rate: RateDecision | None = None  # its rate-limit decision, for the x-ratelimit-* headers

    @property
    def key_name(self) -> str | None:
        return self.key.name if self.key is not None else None

    def processing_ms(self) -> str:
        """`openai-processing-ms`, as OpenAI sends it: the time from the request to its
        headers (for a stream, to its first event)."""
        return str(int((time.perf_counter() - self.started) * 1000))


class Gate(Protocol):
    """Admission the front door runs for every request before its handler, after the body
    size check and before the body is read (governance: `meshnode.governance.http`).

    Runs on the event loop; raises a `MeshError` to refuse (the front door maps it)."""

    def admit(self, request: web.Request) -> Awaitable[bool]:
        """Refuse, or admit; True when `settle` must run once the handler is done."""
        ...

    def settle(self, request: web.Request) -> None:
        """After the handler (answered, failed or cancelled), for an admitted request whose
        `admit` returned True. Must not raise."""
        ...


STATE = web.AppKey("meshnode_api_state", ApiState)
# The response cache, when the node has one (`meshnode.cache`); handlers go through it.
CACHE = web.AppKey("meshnode_response_cache", ResponseCache)
CONTEXT = web.RequestKey("meshnode_request_context", RequestContext)
GATE: web.AppKey[Gate] = web.AppKey("meshnode_admission_gate")


# A random per-process prefix and a counter: unique across nodes and restarts without a
# syscall per request (os.urandom showed up at ~2% of the node's CPU under load).
_ID_PREFIX = "req_" + os.urandom(6).hex()
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):010x}"
