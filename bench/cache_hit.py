"""Cache hit latency against a miss, side by side, through one node's HTTP front end.

    python -m bench.cache_hit [--requests 400] [--upstream-delay-ms 0] [--semantic]
    python -m bench.cache_hit --threshold       # the semantic threshold table in docs/cache.md

Setup: the instant bench backend (`bench.backend`, its own process) is the upstream; a node
front end (config -> providers -> router -> app, the response cache installed the way the node
installs it) runs in a second process; this process is one keep-alive client sending, in
interleaved rounds so load drift hits every column alike:
- `miss`: a deterministic request (temperature 0) with a prompt never seen before: the cache
  looks, misses, the request is proxied, the answer is kept;
- `hit`: the same deterministic request again: answered from the cache;
- `uncached`: a sampling request (temperature 0.7): the cache only decides it is not eligible;
  this is the plain proxy path, the baseline of what the cache costs a miss;
- `semantic hit` (with --semantic): a paraphrase of a kept prompt, which embeds the prompt with
  minilm (loaded in the node process) before finding the answer.
With `--upstream-delay-ms` the backend is a fake OpenAI that waits that long before answering,
which is closer to a real cloud: a hit saves the whole wait.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from bench.httpclient import KeepAliveClient

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- the node process
async def _serve(upstream: str, semantic: bool) -> None:
    import tempfile

    from aiohttp import web

    from meshnode.api.app import create_app
    from meshnode.api.state import CACHE
    from meshnode.cache.service import ResponseCache
    from meshnode.config import validate
    from meshnode.observability.metrics import Metrics
    from meshnode.providers.registry import ProviderContext, build_providers
    from meshnode.routing.router import Router

    doc: dict[str, Any] = {
        "providers": {
            "openai": {
                "base_url": upstream,
                "credentials": {"api_key": "sk-bench"},
                "models": [{"name": "bench", "openai_model": "bench", "cost_per_1k_tokens": 0.01}],
            }
        },
        "cache": {"semantic": {"enabled": semantic, "threshold": 0.85}},
    }
    config = validate(doc)
    data_dir = Path(tempfile.mkdtemp(prefix="cache-bench-"))
    providers = build_providers(config, ProviderContext("bench", data_dir, config.routing.timeouts))
    router = Router(config.routing, config.fallback_chain(), providers, "bench")
    metrics = Metrics()
    app = create_app(
        router,
        node_id="bench",
        server=config.server,
        timeouts=config.routing.timeouts,
        metrics=metrics,
    )
    embedder = None
    if semantic:
        from meshnode.cache.embedders import TransformersEmbedder

        embedder = TransformersEmbedder()
    app[CACHE] = ResponseCache(
        config.cache, node_id="bench", embedder=embedder, registry=metrics.registry
    )
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"NODE_HTTP=http://127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()


# --------------------------------------------------------------------------- the client
def _start(cmd: list[str], prefix: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{cmd} exited before announcing {prefix}")
        if line.startswith(prefix + "="):
            return proc, line.strip().split("=", 1)[1]
    raise RuntimeError(f"{cmd} did not announce {prefix}")


def _body(content: str, temperature: float) -> bytes:
    return orjson.dumps(
        {
            "model": "bench",
            "temperature": temperature,
            "messages": [{"role": "user", "content": content}],
        }
    )


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def run(requests: int, delay_ms: float, semantic: bool) -> dict[str, dict[str, float]]:
    if delay_ms > 0:
        upstream_cmd = [sys.executable, "-m", "tests.kit.fake_openai", "--port", "0"]
        upstream, upstream_url = _start(upstream_cmd, "FAKE_OPENAI_URL")
    else:
        upstream, url = _start(
            [sys.executable, "-m", "bench.backend", "--port", "0"], "BACKEND_HTTP"
        )
        upstream_url = url + "/v1"
    node_cmd = [sys.executable, "-m", "bench.cache_hit", "--serve", upstream_url]
    if semantic:
        node_cmd.append("--semantic")
    node, node_url = _start(node_cmd, "NODE_HTTP")
    try:
        if delay_ms > 0:
            with KeepAliveClient(upstream_url.removesuffix("/v1")) as ctl:
                script = orjson.dumps(
                    {"behaviours": [{"kind": "ok", "delay_s": delay_ms / 1000.0, "times": -1}]}
                )
                ctl.request(ctl.build_post("/_fake/script", script))
        columns: dict[str, list[float]] = {"miss": [], "hit": [], "uncached": []}
        if semantic:
            columns["semantic hit"] = []
        with KeepAliveClient(node_url) as client:
            path = "/v1/chat/completions"
            hit_raw = client.build_post(path, _body("What is the capital of France?", 0))
            client.request(hit_raw)  # kept
            para_raw = client.build_post(path, _body("What's the capital city of France?", 0))
            uncached_raw = client.build_post(path, _body("tell me something", 0.7))
            for _ in range(20):  # warm-up: connections, first-call paths
                client.request(hit_raw)
                client.request(uncached_raw)
            for i in range(requests):
                # With the semantic cache on, numbered prompts are paraphrases of each other;
                # `no-cache` makes the miss skip reading but still embed and keep: its full cost.
                miss_raw = client.build_post(
                    path,
                    _body(f"question number {i} {time.time()}", 0),
                    {"Cache-Control": "no-cache"} if semantic else None,
                )
                probes = [("miss", miss_raw), ("hit", hit_raw), ("uncached", uncached_raw)]
                if semantic:
                    # A semantic hit is not kept under the paraphrase's own key, so this
                    # request takes the semantic path (embed, search) every round.
                    probes.append(("semantic hit", para_raw))
                for name, raw in probes:
                    t0 = time.perf_counter()
                    response = client.request(raw)
                    elapsed = time.perf_counter() - t0
                    if response.status != 200:
                        raise RuntimeError(
                            f"{name}: HTTP {response.status} {response.body[:200]!r}"
                        )
                    is_hit = b'"cache":"hit"' in response.body
                    if is_hit != (name in ("hit", "semantic hit")):
                        raise RuntimeError(f"{name}: cache hit {is_hit}, not what it measures")
                    columns[name].append(elapsed * 1000.0)
        return {
            name: {
                "p50_ms": statistics.median(v),
                "p99_ms": _pct(v, 0.99),
                "mean_ms": statistics.fmean(v),
                "n": float(len(v)),
            }
            for name, v in columns.items()
        }
    finally:
        for proc in (node, upstream):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def threshold_table() -> str:
    from meshnode.cache.embedders import TransformersEmbedder
    from tests.unit.cache.paraphrases import NON_PARAPHRASES, PARAPHRASES

    embedder = TransformersEmbedder()

    def sims(pairs: list[tuple[str, str]]) -> list[float]:
        left = embedder.embed_sync([a for a, _ in pairs])
        right = embedder.embed_sync([b for _, b in pairs])
        return [
            sum(x * y for x, y in zip(u, v, strict=True)) for u, v in zip(left, right, strict=True)
        ]

    pos, neg = sims(PARAPHRASES), sims(NON_PARAPHRASES)
    lines = [
        f"paraphrase pairs: {len(pos)}, similarity min {min(pos):.3f} / median "
        f"{statistics.median(pos):.3f} / max {max(pos):.3f}",
        f"non-paraphrase pairs: {len(neg)}, similarity min {min(neg):.3f} / median "
        f"{statistics.median(neg):.3f} / max {max(neg):.3f}",
        "",
        "| threshold | paraphrases that hit (recall) | non-paraphrases that hit (wrong answers) |",
        "|---|---|---|",
    ]
    for t in (0.70, 0.75, 0.80, 0.82, 0.85, 0.88, 0.90, 0.92, 0.95):
        tp = sum(p >= t for p in pos)
        fp = sum(n >= t for n in neg)
        lines.append(
            f"| {t:.2f} | {tp}/{len(pos)} ({100 * tp / len(pos):.0f}%) | {fp}/{len(neg)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--upstream-delay-ms", type=float, default=0.0)
    parser.add_argument("--semantic", action="store_true")
    parser.add_argument("--threshold", action="store_true")
    parser.add_argument("--serve", metavar="UPSTREAM_URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve, args.semantic))
        return
    if args.threshold:
        print(threshold_table())
        return
    results = run(args.requests, args.upstream_delay_ms, args.semantic)
    base = results["uncached"]["p50_ms"]
    upstream = (
        "instant bench backend"
        if not args.upstream_delay_ms
        else f"fake OpenAI, {args.upstream_delay_ms:g} ms before answering"
    )
    print(f"upstream: {upstream}; {args.requests} rounds, one keep-alive client, interleaved")
    print("| path | p50 ms | p99 ms | mean ms | p50 vs uncached |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['mean_ms']:.3f} | "
            f"{r['p50_ms'] / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
