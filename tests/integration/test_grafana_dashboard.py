"""The shipped Grafana dashboard (deploy/grafana/meshnode-dashboard.json) against a live mesh.

A real three-node mesh (tests/kit/three_nodes.py, node a with auth on): traffic through a (its
own upstream, a model forwarded to b, a chat from b forwarded to a, one refused request), then
a's `/metrics` is scraped with its admin key. Every metric name that any panel's PromQL names
must be a series that scrape really carries (samples, not only a `# TYPE` line), and the new
per-peer, mesh, budget and per-key series carry the values that traffic implies.
"""

from __future__ import annotations

import contextlib
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.kit.three_nodes import ADMIN_SECRET, DAILY_LIMIT, ThreeNodes
from tests.kit.wait import wait_for_sync

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "meshnode-dashboard.json"
METRIC = re.compile(r"\bmeshnode_[a-z0-9_]+")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreeNodes]:
    # Auth on b too: a (auth on) serves b's forwarded request only for a key b authenticated.
    with ThreeNodes(tmp_path_factory.mktemp("grafana"), auth_on=("a", "b")) as nodes:
        nodes.chat("a", "m1")
        nodes.chat("a", "m2")  # forwarded to b
        nodes.chat("b", "m1")  # forwarded to a
        stream_chat(nodes.a.url, "m1", ADMIN_SECRET)  # time-to-first-token series
        yield nodes


def stream_chat(url: str, model: str, key: str) -> None:
    body = json.dumps({"model": model, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = urllib.request.Request(
        url + "/v1/chat/completions", data=body, method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
        assert response.read().rstrip().endswith(b"data: [DONE]")


def scrape(url: str, key: str | None) -> dict[str, list[tuple[dict[str, str], float]]]:
    request = urllib.request.Request(url + "/metrics")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        text = response.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def dashboard_metric_names() -> set[str]:
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    assert len(exprs) >= 15
    return {name for e in exprs for name in METRIC.findall(e)}


def test_every_dashboard_query_resolves_against_a_live_node(mesh: ThreeNodes) -> None:
    # Cache and the refused (404) request: a needs one of each for their series to exist.
    try:
        mesh.chat("a", "no-such-model")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
    names = dashboard_metric_names()

    def missing() -> list[str]:
        got = scrape(mesh.a.url, ADMIN_SECRET)
        return sorted(n for n in names if n not in got)

    # Per-peer series (RTT, gossip bytes) appear once a has probed and gossiped with a peer.
    with contextlib.suppress(AssertionError):
        wait_for_sync(lambda: not missing(), "a exposes every series the dashboard names")
    assert missing() == [], f"queries name series a live node does not expose: {missing()}"


def test_peer_mesh_budget_and_key_series_carry_the_traffic(mesh: ThreeNodes) -> None:
    def value(series: str, **labels: str) -> float:
        return sum(v for lab, v in got.get(series, [])
                   if all(lab.get(k) == want for k, want in labels.items()))

    def probed_and_gossiped() -> bool:
        nonlocal got
        got = scrape(mesh.a.url, ADMIN_SECRET)
        return {lab["peer"] for lab, _ in got.get("meshnode_peer_rtt_seconds", [])} == {
            "b", "c"} and all(value("meshnode_gossip_bytes_total", peer=p, direction=d) > 0
                              for p in ("b", "c") for d in ("sent", "received"))

    got: dict[str, list[tuple[dict[str, str], float]]] = {}
    # Probes and gossip pick peers at random each round: wait until a met both.
    wait_for_sync(probed_and_gossiped, "a has probed and gossiped with b and c")
    assert value("meshnode_peer_forwarded_requests_total", peer="b", outcome="ok") >= 1
    assert value("meshnode_peer_received_requests_total", peer="b", kind="chat") == 1
    assert value("meshnode_mesh_members", status="alive") == 3
    assert value("meshnode_mesh_members", status="dead") == 0
    assert all(0 < v < 5 for _, v in got["meshnode_peer_rtt_seconds"])
    assert value("meshnode_budget_limit_usd", period="day") == DAILY_LIMIT
    assert value("meshnode_budget_spent_usd", period="day") > 0
    assert value("meshnode_key_requests_total", key="ops", status="200") >= 2
    assert value("meshnode_key_cost_usd_total", key="ops") > 0
    assert value("meshnode_upstream_attempts_total", provider="upstream", outcome="ok") >= 1
