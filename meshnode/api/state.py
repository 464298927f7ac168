"""Typed state shared by the app, its middlewares and its handlers.

`STATE` (an `aiohttp.web.AppKey`) holds the app-wide `ApiState`; `CONTEXT` (a `RequestKey`)
holds the per-request `RequestContext` the request middleware creates and the handlers fill in.
Kept apart from `app.py` so handlers can import it without a cycle.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field

from aiohttp import web

from meshnode.cache.service import ResponseCache
from meshnode.observability.metrics import Metrics
from meshnode.routing.outcome import Served
from meshnode.routing.router import Router


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
    """Per-request facts gathered for the request log line and metrics."""

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


STATE = web.AppKey("meshnode_api_state", ApiState)
# The response cache, when the node has one (`meshnode.cache`); handlers go through it.
CACHE = web.AppKey("meshnode_response_cache", ResponseCache)
CONTEXT = web.RequestKey("meshnode_request_context", RequestContext)


# A random per-process prefix and a counter: unique across nodes and restarts without a
# syscall per request (os.urandom showed up at ~2% of the node's CPU under load).
_ID_PREFIX = "req_" + os.urandom(6).hex()
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):010x}"
