"""The fallback load generator when `wrk` is not installed: closed-loop keep-alive POSTs on uvloop.

It owns one process's share of the connections: each connection sends the same pre-rendered
request, reads the answer (Content-Length or chunked), and repeats until the time is up. It prints
one JSON line (`PYLOAD_JSON {...}`) with counts and latency percentiles. `bench.loadgen` starts
one such process per load-generator core and adds the results up. It is ~10x costlier per request
than wrk, so `bench.run` says which generator was used.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit

import orjson


async def _read_answer(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    if at >= 0:
        stop = lower.find(b"\r\n", at + 2)
        await reader.readexactly(int(lower[at + 17 : stop]))
    elif b"transfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def _connection(
    host: str,
    port: int,
    raw: bytes,
    deadline: float,
    latencies: list[float],
    counts: dict[str, int],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            writer.write(raw)
            status = await _read_answer(reader)
            latencies.append(time.perf_counter() - t0)
            counts["requests"] += 1
            if status >= 400:
                counts["errors_status"] += 1
    except (OSError, asyncio.IncompleteReadError, ValueError):
        counts["errors_socket"] += 1
    finally:
        writer.close()


async def _run(
    url: str, body: bytes, api_key: str, connections: int, duration_s: float
) -> dict[str, float]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    raw = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {api_key}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    latencies: list[float] = []
    counts = {"requests": 0, "errors_status": 0, "errors_socket": 0}
    start = time.perf_counter()
    deadline = start + duration_s
    await asyncio.gather(
        *(_connection(host, port, raw, deadline, latencies, counts) for _ in range(connections))
    )
    elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0

    return {
        **counts,
        "duration_s": elapsed,
        "p50_ms": pct(0.50) * 1e3,
        "p99_ms": pct(0.99) * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pyload", description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", required=True, help="request body (JSON text)")
    parser.add_argument("--api-key", default="sk-bench")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args(argv)
    runner: Callable[[Coroutine[Any, Any, dict[str, float]]], dict[str, float]] = asyncio.run
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # plain asyncio still works, only slower
        pass
    result = runner(
        _run(args.url, args.body.encode(), args.api_key, args.connections, args.duration)
    )
    print("PYLOAD_JSON " + orjson.dumps(result).decode(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
