"""Traces across hops (OpenTelemetry): one span per request, one per attempt, W3C `traceparent`
taken from clients and handed on to peers (gRPC `Infer` metadata) and upstreams (HTTP headers),
so one trace shows client -> node A -> node B -> provider.

Off unless configured, by the standard OpenTelemetry variables (read once, at `configure()`):
- `OTEL_TRACES_EXPORTER=otlp` or any `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`: OTLP over
  HTTP/protobuf (`opentelemetry-exporter-otlp-proto-http`, batched);
- `OTEL_TRACES_EXPORTER=console`: spans as JSON on stderr;
- `MESHNODE_TRACES_FILE=PATH`: every span as one JSON line appended to PATH as it ends (for tests
  and for a look without a collector);
- `OTEL_TRACES_EXPORTER=none` (or nothing set): off. `OTEL_SERVICE_NAME` defaults to `meshnode`.
While off, every helper here is a constant-time no-op (no SDK objects are touched on the hot
path). The SDK is process-wide state, so this module keeps its own provider (never the global
one other libraries may set) and `shutdown()` flushes it.

This module owns spans and propagation only; it must not decide routing or logging.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
    Sequence,
)
from typing import Any, TextIO, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

_tracer: Any = None  # opentelemetry.trace.Tracer while on
_provider: Any = None
_propagator: Any = None


def enabled() -> bool:
    return _tracer is not None


def _exporter_for(env: Mapping[str, str]) -> tuple[Any, bool] | None:
    """(exporter, batched) by the environment, or None: tracing off."""
    path = env.get("MESHNODE_TRACES_FILE")
    if path:
        return FileSpanExporter(path), False
    choice = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if choice == "none" or (not choice and not endpoint):
        return None
    if choice == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(out=sys.stderr), False
    if choice not in ("", "otlp"):
        log.warning("OTEL_TRACES_EXPORTER=%s is not supported (otlp, console, none): "
                    "tracing stays off", choice)
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # The endpoint from the environment given (the exporter reads os.environ only); headers,
    # timeout and TLS come from the OTEL_EXPORTER_OTLP_* variables as the exporter reads them.
    traces = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    url = traces or (base.rstrip("/") + "/v1/traces" if base else None)
    return (OTLPSpanExporter(endpoint=url) if url else OTLPSpanExporter()), True


def configure(node_id: str, env: Mapping[str, str] | None = None) -> bool:
    """Switch tracing on when the environment asks for it; returns whether it is on."""
    global _tracer, _provider, _propagator
    env = os.environ if env is None else env
    chosen = _exporter_for(env)
    if chosen is None:
        return False
    exporter, batched = chosen
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    shutdown()
    resource = Resource.create({
        "service.name": env.get("OTEL_SERVICE_NAME", "meshnode"),
        "service.instance.id": node_id,
        "meshnode.node": node_id,
    })
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(
        BatchSpanProcessor(exporter) if batched else SimpleSpanProcessor(exporter)
    )
    _provider = provider
    _tracer = provider.get_tracer("meshnode")
    _propagator = TraceContextTextMapPropagator()
    log.info("tracing on (%s)", type(exporter).__name__)
    return True


def shutdown() -> None:
    """Flush and stop the exporter (the node calls it when it stops)."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        try:
            provider.shutdown()
        except Exception:  # noqa: BLE001 - an exporter's failure must not fail the stop
            log.warning("tracing: the exporter failed to flush", exc_info=True)


# ------------------------------------------------------------------ spans
_NOOP = contextlib.nullcontext(None)


def request_span(
    name: str, headers: Mapping[str, str], attributes: Mapping[str, Any]
) -> contextlib.AbstractContextManager[Any]:
    """The server span of one HTTP request, child of the client's `traceparent` if it sent
    one. The span (or None while off) is what the context manager yields."""
    if _tracer is None:
        return _NOOP
    from opentelemetry.trace import SpanKind

    parent = _propagator.extract(headers) if TRACEPARENT in headers else None
    return _tracer.start_as_current_span(  # type: ignore[no-any-return]
        name, context=parent, kind=SpanKind.SERVER, attributes=dict(attributes)
    )


async def peer_stream(
    chunks: AsyncGenerator[T, None],
    metadata: Iterable[tuple[str, Any]] | None,
    attributes: Mapping[str, Any],
) -> AsyncIterator[T]:
    """`chunks` (one forwarded `Infer`'s answer) inside a server span, the child of the
    caller's attempt span (its `traceparent` rides in the gRPC metadata).

    The span is made current only while `chunks` runs a step, never across a `yield`: grpc may
    close the stream from another task, where a context attached here could not be detached."""
    if _tracer is None:
        async for chunk in chunks:
            yield chunk
        return
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind

    carrier = {k: v for k, v in metadata or () if k in (TRACEPARENT, TRACESTATE)
               and isinstance(v, str)}
    parent = _propagator.extract(carrier) if carrier else None
    span = _tracer.start_span("meshnode.Infer", context=parent, kind=SpanKind.SERVER,
                              attributes=dict(attributes))
    current = trace.set_span_in_context(span, parent)
    try:
        while True:
            token = otel_context.attach(current)
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                return
            finally:
                otel_context.detach(token)
            yield chunk
    finally:
        token = otel_context.attach(current)
        try:
            await chunks.aclose()
        finally:
            otel_context.detach(token)
            span.end()


def attempt_span(
    provider: str, model: str, peer: str | None, number: int
) -> contextlib.AbstractContextManager[Any]:
    """One attempt of the failover loop (a client span: it calls a provider or a peer). The
    attributes are built only while tracing is on: this runs once per attempt."""
    if _tracer is None:
        return _NOOP
    from opentelemetry.trace import SpanKind

    return _tracer.start_as_current_span(  # type: ignore[no-any-return]
        "meshnode.attempt", kind=SpanKind.CLIENT,
        attributes={"meshnode.provider": provider, "meshnode.model": model,
                    "meshnode.peer": peer or "", "meshnode.attempt": number},
        record_exception=False, set_status_on_exception=True,
    )


def set_attributes(span: Any, attributes: Mapping[str, Any]) -> None:
    if span is not None:
        span.set_attributes(dict(attributes))


def grpc_metadata() -> Sequence[tuple[str, str]]:
    """`traceparent` (and `tracestate`) of the current span, for a gRPC call's metadata."""
    if _tracer is None:
        return ()
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return tuple(carrier.items())


def inject_headers(headers: MutableMapping[str, str]) -> None:
    """Add the current span's `traceparent` to an outgoing HTTP request's headers."""
    if _tracer is not None:
        _propagator.inject(headers)


def aiohttp_trace_configs() -> list[Any]:
    """For an upstream `aiohttp.ClientSession`: puts `traceparent` on every request it sends
    while tracing is on (read per request, so a session made before `configure` works too)."""
    import aiohttp

    async def on_request_start(session: Any, ctx: Any, params: Any) -> None:
        if _tracer is not None:
            _propagator.inject(params.headers)

    config = aiohttp.TraceConfig()
    config.on_request_start.append(on_request_start)
    return [config]


# ------------------------------------------------------------------ the file exporter
class FileSpanExporter:
    """Appends each finished span as one JSON line (`ReadableSpan.to_json()` compacted)."""

    def __init__(self, path: str) -> None:
        self._lock = threading.Lock()
        self._file: TextIO = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by shutdown

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = [json.dumps(json.loads(span.to_json()), separators=(",", ":")) for span in spans]
        with self._lock:
            self._file.write("".join(line + "\n" for line in lines))
            self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


@contextlib.contextmanager
def spans_to(path: str, node_id: str = "test") -> Iterator[None]:
    """Trace into a JSON-lines file for the duration of a block (tests)."""
    configure(node_id, {"MESHNODE_TRACES_FILE": path})
    try:
        yield
    finally:
        shutdown()
