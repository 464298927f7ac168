"""One-client probes: sequential request latency and streaming time to first token.

It owns the sampling loops. Targets are probed in interleaved rounds (direct, meshnode, LiteLLM,
direct, ...) over one keep-alive connection each, so slow drifts of a shared machine hit every
target alike and "added latency" stays a difference measured under the same conditions.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.httpclient import HttpClientError, KeepAliveClient
from bench.targets import API_KEY, CHAT_PATH, MODEL, SLOW_MODEL, Target, chat_body


@dataclass
class Samples:
    seconds: list[float] = field(default_factory=list)
    totals: list[float] = field(default_factory=list)  # streams: time to the end of the stream
    errors: int = 0
    last_error: str = ""
    on_cpu_s: float = 0.0  # target's process tree, summed over the batches (schedstat)
    runqueue_wait_s: float = 0.0  # ... and the time it was runnable but had no CPU


def _client(target: Target) -> KeepAliveClient:
    return KeepAliveClient(target.base_url, timeout_s=30.0)


def _headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def warm_up(targets: Sequence[Target], requests: int = 50) -> None:
    """A few requests each so connection pools, caches and JITs are warm before sampling."""
    for target in targets:
        with _client(target) as client:
            plain = client.build_post(CHAT_PATH, chat_body(), _headers())
            stream = client.build_post(CHAT_PATH, chat_body(stream=True), _headers())
            for _ in range(requests):
                client.request(plain)
                client.stream(stream)


def sequential_latency(targets: Sequence[Target], requests: int, rounds: int) -> dict[str, Samples]:
    """`requests` non-stream chat completions per target, one at a time, in `rounds` rounds."""
    out = {t.name: Samples() for t in targets}
    clients = {t.name: _client(t) for t in targets}
    try:
        raws = {
            t.name: clients[t.name].build_post(CHAT_PATH, chat_body(), _headers()) for t in targets
        }
        per_round = max(1, requests // max(1, rounds))
        done = 0
        while done < requests:
            batch = min(per_round, requests - done)
            for target in targets:
                client, raw, samples = clients[target.name], raws[target.name], out[target.name]
                cpu_before, wait_before = target.process.schedstat()
                for _ in range(batch):
                    t0 = time.perf_counter()
                    try:
                        answer = client.request(raw)
                    except (HttpClientError, OSError) as exc:
                        samples.errors += 1
                        samples.last_error = str(exc)
                        client.close()
                        continue
                    elapsed = time.perf_counter() - t0
                    if answer.status == 200:
                        samples.seconds.append(elapsed)
                    else:
                        samples.errors += 1
                        samples.last_error = f"HTTP {answer.status}: {answer.body[:200]!r}"
                cpu_after, wait_after = target.process.schedstat()
                samples.on_cpu_s += cpu_after - cpu_before
                samples.runqueue_wait_s += wait_after - wait_before
            done += batch
    finally:
        for client in clients.values():
            client.close()
    return out


def stream_ttft(
    targets: Sequence[Target], requests: int, rounds: int, slow: bool = False
) -> dict[str, Samples]:
    """Time to first content token of `stream: true` chat completions, interleaved like above.

    With `slow`, the model is `bench-slow`: the backend pauses between chunks, which tells a
    proxy that relays chunks as they arrive from one that buffers the stream.
    """
    out = {t.name: Samples() for t in targets}
    clients = {t.name: _client(t) for t in targets}
    body = chat_body(SLOW_MODEL if slow else MODEL, stream=True)
    try:
        raws = {t.name: clients[t.name].build_post(CHAT_PATH, body, _headers()) for t in targets}
        per_round = max(1, requests // max(1, rounds))
        done = 0
        while done < requests:
            batch = min(per_round, requests - done)
            for target in targets:
                client, raw, samples = clients[target.name], raws[target.name], out[target.name]
                for _ in range(batch):
                    try:
                        timing = client.stream(raw)
                    except (HttpClientError, OSError) as exc:
                        samples.errors += 1
                        samples.last_error = str(exc)
                        client.close()
                        continue
                    if timing.status == 200 and timing.content:
                        samples.seconds.append(timing.ttft_s)
                        samples.totals.append(timing.total_s)
                    else:
                        samples.errors += 1
                        samples.last_error = f"HTTP {timing.status}, {timing.events} events"
            done += batch
    finally:
        for client in clients.values():
            client.close()
    return out
