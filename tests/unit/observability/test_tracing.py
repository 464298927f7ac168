"""Tracing switched by the environment: off by default (no-op helpers), and the OTLP exporter
posting real OTLP/HTTP protobuf to a loopback collector, with the client's trace kept."""

from __future__ import annotations

import asyncio
import secrets

from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from meshnode.observability import tracing


def test_off_unless_configured() -> None:
    assert tracing.configure("n", env={}) is False
    assert tracing.configure("n", env={"OTEL_TRACES_EXPORTER": "none",
                                       "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}) is False
    assert not tracing.enabled()
    assert tracing.grpc_metadata() == ()
    with tracing.request_span("x", {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
                              {}) as span:
        assert span is None
    headers: dict[str, str] = {}
    tracing.inject_headers(headers)
    assert headers == {}


async def test_otlp_exporter_sends_the_spans_to_the_collector() -> None:
    received: list[ExportTraceServiceRequest] = []

    async def collect(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        received.append(ExportTraceServiceRequest.FromString(await request.read()))
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    server = TestServer(app)
    await server.start_server()
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    try:
        on = tracing.configure("node-x", env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": str(server.make_url("")).rstrip("/"),
            "OTEL_SERVICE_NAME": "meshnode-test"})
        assert on and tracing.enabled()
        with tracing.request_span("POST /v1/chat/completions",
                                  {"traceparent": f"00-{trace_id}-{parent}-01"}, {"a": 1}):
            with tracing.attempt_span("p", "m", None, 1):
                (name, value), = tracing.grpc_metadata()
                assert name == "traceparent" and value.split("-")[1] == trace_id
        # The batch exporter posts with blocking I/O: flush it off the loop.
        await asyncio.to_thread(tracing.shutdown)
    finally:
        tracing.shutdown()
        await server.close()
    spans = [s for r in received for rs in r.resource_spans for ss in rs.scope_spans
             for s in ss.spans]
    assert {s.name for s in spans} == {"POST /v1/chat/completions", "meshnode.attempt"}
    assert all(s.trace_id.hex() == trace_id for s in spans)
    root = next(s for s in spans if s.name.startswith("POST"))
    assert root.parent_span_id.hex() == parent
    attrs = {a.key: a.value.string_value for r in received for rs in r.resource_spans
             for a in rs.resource.attributes}
    assert attrs["service.name"] == "meshnode-test" and attrs["meshnode.node"] == "node-x"
