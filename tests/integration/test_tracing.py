"""One trace across hops: client -> node a -> gRPC -> node b -> the upstream provider.

A real three-node mesh (tests/kit/three_nodes.py); every node writes its spans to a JSON-lines
file (`MESHNODE_TRACES_FILE`, the exporter meant for this). The client sends a W3C
`traceparent`; the model `m2` is offered only by b, so a forwards it. The test then follows the
parent links: a's request span is the child of the client's span, a's attempt span of that,
b's Infer span of a's attempt (the traceparent crossed gRPC in the metadata), b's attempt of
b's Infer, and the `traceparent` the fake upstream received names b's attempt span. With
tracing off (node c) nothing is written.
"""

from __future__ import annotations

import json
import secrets
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kit.three_nodes import ThreeNodes
from tests.kit.wait import wait_for_sync

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ThreeNodes, Path]]:
    workdir = tmp_path_factory.mktemp("tracing")

    def env(name: str) -> dict[str, str]:
        if name == "c":
            return {}
        return {"MESHNODE_TRACES_FILE": str(workdir / f"spans-{name}.jsonl")}

    with ThreeNodes(workdir, env=env) as nodes:
        yield nodes, workdir


def spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def test_one_trace_spans_client_a_b_and_the_provider(traced: tuple[ThreeNodes, Path]) -> None:
    mesh, workdir = traced
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    body = json.dumps({"model": "m2", "messages": [{"role": "user", "content": "hi"}]})
    request = urllib.request.Request(
        mesh.a.url + "/v1/chat/completions", data=body.encode(), method="POST",
        headers={"Content-Type": "application/json",
                 "traceparent": f"00-{trace_id}-{client_span}-01"})
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
        answer = json.loads(response.read())
    assert answer["x_aiproxy"]["node"] == "b"

    def ours(path: Path) -> list[dict[str, Any]]:
        return [s for s in spans(path) if s["context"]["trace_id"] == "0x" + trace_id]

    def complete() -> bool:
        kinds_a = {s["name"] for s in ours(workdir / "spans-a.jsonl")}
        kinds_b = {s["name"] for s in ours(workdir / "spans-b.jsonl")}
        return {"POST /v1/chat/completions", "meshnode.attempt"} <= kinds_a and {
            "meshnode.Infer", "meshnode.attempt"} <= kinds_b

    wait_for_sync(complete, "both nodes wrote their spans of the trace")
    a_spans, b_spans = ours(workdir / "spans-a.jsonl"), ours(workdir / "spans-b.jsonl")
    a_request = next(s for s in a_spans if s["name"] == "POST /v1/chat/completions")
    a_attempt = next(s for s in a_spans if s["name"] == "meshnode.attempt")
    b_infer = next(s for s in b_spans if s["name"] == "meshnode.Infer")
    b_attempt = next(s for s in b_spans if s["name"] == "meshnode.attempt")
    assert a_request["parent_id"] == "0x" + client_span
    assert a_request["kind"] == "SpanKind.SERVER"
    assert a_request["attributes"]["http.response.status_code"] == 200
    assert a_attempt["parent_id"] == a_request["context"]["span_id"]
    assert a_attempt["attributes"]["meshnode.peer"] == "b"
    assert b_infer["parent_id"] == a_attempt["context"]["span_id"]
    assert b_attempt["parent_id"] == b_infer["context"]["span_id"]
    assert b_attempt["attributes"]["meshnode.provider"] == "upstream"
    assert a_request["resource"]["attributes"]["meshnode.node"] == "a"
    assert b_infer["resource"]["attributes"]["meshnode.node"] == "b"
    # The provider's hop: the upstream request carried b's attempt span as its parent.
    sent = [r for r in mesh.fake.requests() if r["path"] == "/v1/chat/completions"
            and r["headers"].get("traceparent", "").startswith(f"00-{trace_id}-")]
    assert len(sent) == 1
    assert sent[0]["headers"]["traceparent"].split("-")[2] == b_attempt["context"]["span_id"][2:]
    # A stream through the same hops: b's Infer span lives across the stream's yields.
    stream = json.dumps({"model": "m2", "stream": True,
                         "messages": [{"role": "user", "content": "hi"}]})
    request = urllib.request.Request(
        mesh.a.url + "/v1/chat/completions", data=stream.encode(), method="POST",
        headers={"Content-Type": "application/json",
                 "traceparent": f"00-{secrets.token_hex(16)}-{client_span}-01"})
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
        assert response.read().rstrip().endswith(b"data: [DONE]")
    wait_for_sync(lambda: len(spans(workdir / "spans-b.jsonl")) >= 4, "b traced the stream")
    for node in (mesh.a, mesh.b):
        assert "Failed to detach context" not in node.logs()


def test_a_node_without_tracing_configured_writes_nothing(
    traced: tuple[ThreeNodes, Path]
) -> None:
    mesh, workdir = traced
    assert mesh.chat("c", "m2")["x_aiproxy"]["node"] == "b"
    assert (workdir / "spans-a.jsonl").exists()
    assert not (workdir / "spans-c.jsonl").exists()
    assert "tracing on" not in mesh.c.logs()
