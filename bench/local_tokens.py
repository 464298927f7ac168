"""Local worker tokens/s: one stream at a time against N concurrent streams (SPEC §6).

    python -m bench.local_tokens                       # CPU: 1 vs 16 streams, GPT-2 small shape
    python -m bench.local_tokens --hf                  # + transformers' own ways, same model
    python -m bench.local_tokens --device cuda --streams 1 16 64 --model llama-1b --hf
    python -m bench.local_tokens --extra '{"logprobs": 5}'       # what logprobs cost
    python -m bench.local_tokens --chat --extra '{"response_format": {"type": "json_object"}}'

What is measured is the real serving path: a `LocalProvider` (what the node runs) spawns its
worker process with a random-weight model given as a `path:` model, and this process streams
from it exactly as the router would. "1 stream" runs requests one after another; "N streams"
runs N at once, each arriving as the others run (continuous batching). EOS is never emitted
(the random model's generation config has none), so every request makes exactly
`--tokens` tokens; tokens/s = completion tokens / wall time of the phase.

`--hf` then measures, in this process with the worker stopped, plain transformers on the same
weights: `generate` one prompt, `generate` a static batch of N, and the continuous batching of
`generate_batch` with N prompts: the numbers docs/local-worker.md compares the engine against.

Models (random weights, fixed seed, built once under `--cache-dir`):
- `gpt2-small`: GPT-2 small's shape (12 layers, 768 wide, 12 heads, vocab 50,257): 124 M
  parameters, big enough that the forward pass, not Python, is what a step costs on a CPU;
- `llama-1b`: the 1.1 B Llama of the SPEC's H200 table (TinyLlama's shape), for GPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT = (
    "The quick brown fox jumps over the lazy dog while the committee reviews the "
    "quarterly figures and"
)


@dataclass(frozen=True)
class Row:
    way: str
    streams: int
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------- models
def build_model(name: str, cache_dir: Path) -> Path:
    """The random-weight checkpoint `name`, built once (fixed seed) under cache_dir."""
    target = cache_dir / name
    if (target / "config.json").is_file():
        return target
    if name == "gpt2-small":
        from meshnode.worker.builtins import build_random_gpt2

        return build_random_gpt2(
            target, n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024
        )
    if name == "gpt2-small-2k":  # the same shape with 2,048 positions: room for a 1,024 prefix
        from meshnode.worker.builtins import build_random_gpt2

        return build_random_gpt2(
            target, n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=2048
        )
    if name == "gpt2-tiny-2k":  # 2 layers, 128 wide, GPT-2's tokenizer: smoke runs
        from meshnode.worker.builtins import build_random_gpt2

        return build_random_gpt2(
            target, n_layer=2, n_embd=128, n_head=2, vocab_size=50257, n_positions=2048
        )
    if name == "llama-1b":
        return _build_random_llama(target)
    raise SystemExit(f"unknown bench model {name!r}")


def _build_random_llama(target: Path) -> Path:
    import tempfile

    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from meshnode.worker.builtins import build_byte_tokenizer

    tokenizer = build_byte_tokenizer(32000)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(1234)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=None)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    return target


# --------------------------------------------------------------------------- the engine
async def measure_engine(
    model_dir: Path,
    device: str,
    streams: list[int],
    tokens: int,
    single_requests: int,
    threads: int,
    rounds: int,
    spread_s: float = 0.0,
    extra: dict[str, object] | None = None,
    chat: bool = False,
) -> list[Row]:
    from meshnode.config import ProviderConfig, ResolvedProvider, TimeoutsConfig
    from meshnode.providers.local import LocalProvider
    from meshnode.providers.registry import ProviderContext
    from meshnode.types import InferenceRequest, RequestKind

    timeouts = TimeoutsConfig(first_byte_ms=600_000, total_ms=3_600_000)
    config = ProviderConfig.model_validate(
        {
            "device": device,
            "max_batch": max(streams),
            "max_queue": max(streams),
            "models": [{"name": "bench", "path": str(model_dir), "kind": "completion"}],
        }
    )
    provider = LocalProvider(
        ResolvedProvider(name="local", type="local", config=config),
        ProviderContext(node_id="bench", data_dir=model_dir.parent, timeouts=timeouts),
        threads=threads,
        hang_timeout_s=600.0,
    )
    await provider.start()
    while not provider.ready()[0]:
        await asyncio.sleep(0.1)
    offer = provider.offers()[0]

    async def one(delay: float = 0.0) -> int:
        if delay:
            await asyncio.sleep(delay)  # arrivals spread out: streams join a running batch
        body: dict[str, object] = {"model": "bench", "max_tokens": tokens, "temperature": 1.0,
                                   **(extra or {})}
        if chat:
            body["messages"] = [{"role": "user", "content": PROMPT}]
        else:
            body["prompt"] = PROMPT
        kind = RequestKind.CHAT if chat else RequestKind.COMPLETION
        request = InferenceRequest(
            kind, "bench", body, "bench", time.monotonic() + 3600, stream=True
        )
        made = 0
        async for chunk in provider.stream(request, offer, timeouts):
            if chunk.usage is not None:
                made = chunk.usage.completion_tokens
        return made

    # Rounds interleave the phases, so load from other processes on a shared box hits every
    # column alike; each phase's figure is its tokens over its time, summed over the rounds.
    made_by: dict[int, int] = dict.fromkeys(streams, 0)
    time_by: dict[int, float] = dict.fromkeys(streams, 0.0)
    try:
        await one()  # warm the path at this length
        for _ in range(rounds):
            for n in streams:
                started = time.perf_counter()
                if n == 1:
                    made = 0
                    for _ in range(single_requests):
                        made += await one()
                else:
                    made = sum(await asyncio.gather(*(one(i * spread_s / n) for i in range(n))))
                elapsed = time.perf_counter() - started
                made_by[n] += made
                time_by[n] += elapsed
                print(f"  engine  {n:>3} streams: {made / elapsed:8.1f} tok/s", flush=True)
    finally:
        await provider.close()
    return [Row("meshnode engine", n, made_by[n], time_by[n]) for n in streams]


# --------------------------------------------------------------------------- in process
def _load(model_dir: Path, device: str, threads: int) -> tuple[object, object, object]:
    import torch

    from meshnode.worker.models import load_causal_lm

    if threads > 0:
        torch.set_num_threads(threads)
    dev = torch.device("cuda:0" if device in ("auto", "cuda") and torch.cuda.is_available()
                       else ("cpu" if device == "auto" else device))
    model, tokenizer = load_causal_lm(model_dir, dev)
    return model, tokenizer, dev


def _drive(engine: object, prompts: list[list[int]], tokens: int, stagger: bool) -> int:
    """Submit `prompts` (one a step when `stagger`: arrivals while the others run) and step the
    engine until all are done; returns the completion tokens made."""
    from meshnode.worker.params import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=1.0)
    pending = list(enumerate(prompts))
    made = 0
    e = engine  # an engine of either generation: submit / step / has_work
    while pending or e.has_work():  # type: ignore[attr-defined]
        if pending:
            batch = pending[:1] if stagger else pending
            for request_id, prompt in batch:
                e.submit(request_id, prompt, params)  # type: ignore[attr-defined]
            pending = pending[len(batch):]
        result = e.step()  # type: ignore[attr-defined]
        made += sum(d.completion_tokens for d in result.done)
    return made


def measure_inprocess(model_dir: Path, device: str, streams: list[int], tokens: int,
                      single_requests: int, threads: int, rounds: int) -> list[Row]:
    """Today's engine (bench/baseline_engine.py) and the slot engine, driven the same way in
    this process, rounds interleaved: the side-by-side of SPEC §6's CPU targets."""
    import time as _time

    from bench.baseline_engine import GenerationEngine as Baseline
    from meshnode.worker.engine import GenerationEngine

    model, tokenizer, dev = _load(model_dir, device, threads)
    prompt = tokenizer.encode(PROMPT)  # type: ignore[attr-defined]
    ways = {"baseline engine (before slots)": Baseline, "slot engine (in process)":
            GenerationEngine}
    engines = {name: cls(model, tokenizer, dev, max(streams)) for name, cls in ways.items()}
    made_by = {(w, n): 0 for w in ways for n in streams}
    time_by = {(w, n): 0.0 for w in ways for n in streams}
    for engine in engines.values():
        _drive(engine, [prompt], 4, stagger=False)  # warm up
    for _ in range(rounds):
        for n in streams:
            for way, engine in engines.items():
                started = _time.perf_counter()
                if n == 1:
                    made = sum(_drive(engine, [prompt], tokens, False)
                               for _ in range(single_requests))
                else:
                    made = _drive(engine, [prompt] * n, tokens, stagger=True)
                elapsed = _time.perf_counter() - started
                made_by[(way, n)] += made
                time_by[(way, n)] += elapsed
                print(f"  {way:<32} {n:>3} streams: {made / elapsed:8.1f} tok/s", flush=True)
    return [Row(w, n, made_by[(w, n)], time_by[(w, n)]) for w in ways for n in streams]


@dataclass(frozen=True)
class PrefixRow:
    way: str
    prefix: int
    cold_ms: float
    warm_ms: float
    cached_tokens: int

    @property
    def ratio(self) -> float:
        return self.warm_ms / self.cold_ms if self.cold_ms > 0 else 0.0


def measure_prefix(model_dir: Path, device: str, prefix: int, threads: int,
                   rounds: int) -> PrefixRow:
    """First-token time of a prompt whose `prefix`-token start was served before, against the
    same prompt cold (a fresh prefix each round; median over the rounds)."""
    import random as _random
    import statistics
    import time as _time

    from meshnode.worker.engine import GenerationEngine
    from meshnode.worker.params import SamplingParams

    model, tokenizer, dev = _load(model_dir, device, threads)
    engine = GenerationEngine(model, tokenizer, dev, 4)
    vocab = int(model.config.vocab_size)  # type: ignore[attr-defined]
    rng = _random.Random(7)
    params = SamplingParams(max_tokens=1, temperature=0.0)

    def first_token(request_id: int, prompt: list[int]) -> tuple[float, int]:
        started = _time.perf_counter()
        engine.submit(request_id, prompt, params)
        cached = 0
        while engine.has_work():
            result = engine.step()
            for done in result.done:
                cached = done.cached_tokens
        return (_time.perf_counter() - started) * 1000, cached

    first_token(0, [rng.randrange(vocab) for _ in range(prefix + 16)])  # warm up
    cold, warm, cached = [], [], 0
    for r in range(rounds):
        shared = [rng.randrange(vocab) for _ in range(prefix)]
        ms, _ = first_token(10 * r + 1, shared + [rng.randrange(vocab) for _ in range(16)])
        cold.append(ms)
        ms, cached = first_token(10 * r + 2, shared + [rng.randrange(vocab) for _ in range(16)])
        warm.append(ms)
        print(f"  prefix {prefix}: cold {cold[-1]:.0f} ms, served before {warm[-1]:.0f} ms "
              f"({cached} tokens reused)", flush=True)
    return PrefixRow("slot engine, first token", prefix, statistics.median(cold),
                     statistics.median(warm), cached)


# --------------------------------------------------------------------------- transformers
def measure_transformers(
    model_dir: Path,
    device: str,
    streams: list[int],
    tokens: int,
    threads: int,
    ways: tuple[str, ...],
    budget_s: float = 0.0,
) -> list[Row]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from meshnode.worker.models import dtype_for

    if threads > 0:
        torch.set_num_threads(threads)
    dev = torch.device(
        "cuda:0"
        if device in ("auto", "cuda") and torch.cuda.is_available()
        else device
        if device != "auto"
        else "cpu"
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype_for(dev)).to(dev).eval()
    prompt = tokenizer.encode(PROMPT)
    gen = GenerationConfig(
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        eos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
    )

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    rows: list[Row] = []
    with torch.inference_mode():
        ids = torch.tensor([prompt], device=dev)
        model.generate(ids, generation_config=gen)  # warm-up
        began = time.perf_counter()
        for n in streams:
            if budget_s and time.perf_counter() - began > budget_s:
                print(f"  transformers: over the {budget_s:.0f} s budget, skipping {n} and up")
                break
            if "static_compile" in ways:
                # transformers compiles the forward itself for a static cache on a GPU; the
                # first call at a batch size compiles, the second is timed.
                try:
                    static = copy.deepcopy(gen)
                    static.cache_implementation = "static"
                    batch = ids.repeat(n, 1)
                    mask = torch.ones_like(batch)
                    model.generate(batch, generation_config=static, attention_mask=mask)
                    sync()
                    started = time.perf_counter()
                    out = model.generate(batch, generation_config=static, attention_mask=mask)
                    sync()
                    made = (out.shape[1] - ids.shape[1]) * n
                    rows.append(Row("transformers static cache + compile", n, made,
                                    time.perf_counter() - started))
                    print(f"  static+compile {n:>3}: {rows[-1].tokens_per_s:8.1f} tok/s",
                          flush=True)
                except Exception as exc:  # noqa: BLE001 - a foreign API; report and go on
                    print(f"  static+compile {n:>3}: failed: {type(exc).__name__}: {exc}")
            if "generate" in ways:
                batch = ids.repeat(n, 1)
                sync()
                started = time.perf_counter()
                out = model.generate(
                    batch, generation_config=gen, attention_mask=torch.ones_like(batch)
                )
                sync()
                made = (out.shape[1] - ids.shape[1]) * n
                rows.append(
                    Row(
                        "transformers generate (static batch)",
                        n,
                        made,
                        time.perf_counter() - started,
                    )
                )
                print(f"  generate       {n:>3}: {rows[-1].tokens_per_s:8.1f} tok/s", flush=True)
            if "generate_batch" in ways and n > 1:
                try:
                    sync()
                    started = time.perf_counter()
                    results = model.generate_batch(inputs=[prompt] * n, generation_config=gen)
                    sync()
                    made = sum(len(r.generated_tokens) for r in results.values())
                    rows.append(
                        Row(
                            "transformers generate_batch (continuous)",
                            n,
                            made,
                            time.perf_counter() - started,
                        )
                    )
                    print(
                        f"  generate_batch {n:>3}: {rows[-1].tokens_per_s:8.1f} tok/s", flush=True
                    )
                except Exception as exc:  # noqa: BLE001 - a foreign API; report and go on
                    print(f"  generate_batch {n:>3}: failed: {type(exc).__name__}: {exc}")
    return rows


# --------------------------------------------------------------------------- report
def table(rows: list[Row]) -> str:
    ones = {r.way: r.tokens_per_s for r in rows if r.streams == 1}
    lines = [
        "| way | streams | tokens | seconds | tok/s | × this way at 1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        base = ones.get(r.way, 0.0)
        ratio = f"{r.tokens_per_s / base:.2f}×" if base else "—"
        lines.append(
            f"| {r.way} | {r.streams} | {r.tokens} | {r.seconds:.2f} | "
            f"{r.tokens_per_s:.1f} | {ratio} |"
        )
    return "\n".join(lines)


def device_name(device: str) -> str:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="gpt2-small", choices=["gpt2-small", "llama-1b"])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument(
        "--single-requests",
        type=int,
        default=2,
        help="requests run one after another for the 1-stream figure",
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--spread", type=float, default=0.0,
                        help="N streams arrive spread over this many seconds (0 = at once)")
    # One torch thread by default: on a shared 2-core box, two OpenMP threads stall on each
    # other whenever another process takes a core, and batch-1 figures swing 5x run to run.
    # The engine and transformers always get the same setting.
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in the worker and for --hf (0 = torch's default)")
    parser.add_argument("--hf", action="store_true", help="also measure plain transformers")
    parser.add_argument("--hf-ways", default="generate,generate_batch")
    parser.add_argument("--hf-budget", type=float, default=0.0,
                        help="stop starting transformers measurements after this many seconds "
                             "(0 = no limit)")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also drive today's engine (bench/baseline_engine.py) and the slot "
                             "engine in this process, side by side")
    parser.add_argument("--prefix", type=int, default=1024,
                        help="first-token time with a prefix this long served before vs cold "
                             "(0 = skip)")
    parser.add_argument("--prefix-rounds", type=int, default=3)
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".meshnode" / "bench-models")
    parser.add_argument("--out", type=Path, default=None, help="write the table (markdown)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows (json)")
    parser.add_argument("--extra", type=json.loads, default=None,
                        help="JSON object merged into every request body (logprobs, ...)")
    parser.add_argument("--chat", action="store_true",
                        help="chat requests (the prompt as one user message)")
    args = parser.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    streams = sorted(set(args.streams))
    print(f"building/loading {args.model} under {args.cache_dir}", flush=True)
    model_dir = build_model(args.model, args.cache_dir)
    rows = asyncio.run(
        measure_engine(
            model_dir, args.device, streams, args.tokens, args.single_requests, args.threads,
            args.rounds, args.spread, args.extra, args.chat,
        )
    )
    if args.baseline:
        rows += measure_inprocess(model_dir, args.device, streams, args.tokens,
                                  args.single_requests, args.threads, args.rounds)
    if args.hf:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        rows += measure_transformers(
            model_dir,
            args.device,
            streams,
            args.tokens,
            args.threads,
            tuple(args.hf_ways.split(",")),
            args.hf_budget,
        )
    prefix_row = None
    if args.prefix > 0:
        prefix_model = (build_model("gpt2-small-2k", args.cache_dir)
                        if args.model == "gpt2-small" else model_dir)
        prefix_row = measure_prefix(prefix_model, args.device, args.prefix, args.threads,
                                    args.prefix_rounds)
    name = device_name(args.device)
    text = (
        f"Local worker tokens/s — {args.model} (random weights), {args.tokens} new tokens "
        f"per request, device: {name}\n\n{table(rows)}\n"
    )
    by_way: dict[str, dict[int, float]] = {}
    for r in rows:
        by_way.setdefault(r.way, {})[r.streams] = r.tokens_per_s
    for way, figures in by_way.items():
        if 1 in figures and figures[1] > 0 and len(figures) > 1:
            ratios = ", ".join(f"{n} streams {figures[n] / figures[1]:.2f}×"
                               for n in streams if n != 1 and n in figures)
            text += f"\n{way}: speed-up over one stream at a time: {ratios}"
    text += "\n"
    if prefix_row is not None:
        text += (f"\nprefix reuse ({prefix_row.prefix}-token prefix served before, 16 new "
                 f"prompt tokens, first token): cold {prefix_row.cold_ms:.0f} ms, warm "
                 f"{prefix_row.warm_ms:.0f} ms = {100 * prefix_row.ratio:.1f}% of cold "
                 f"({prefix_row.cached_tokens} tokens reused)\n")
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "device": name,
                    "model": args.model,
                    "tokens": args.tokens,
                    "rows": [{**asdict(r), "tokens_per_s": r.tokens_per_s} for r in rows],
                    "prefix": ({**asdict(prefix_row), "ratio": prefix_row.ratio}
                               if prefix_row is not None else None),
                },
                indent=2,
            ),
            encoding="utf-8",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
