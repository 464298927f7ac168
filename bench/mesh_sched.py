"""Mesh scheduling (SPEC §6): multi-turn conversations over 3 real nodes, each with a local worker.

    python -m bench.mesh_sched          # 24 conversations, 1,024-token system prompts, GPT-2 small
    python -m bench.mesh_sched --quick  # smoke run: 12 conversations, tiny model, short prompts
    python -m bench.mesh_sched --conversations 12 --turns 4 --max-tokens 8 --spread-s 5
                                        # what fits ~8 minutes of the shared 2-core box

Three `meshnode run` processes on this box join one mesh (gRPC on loopback, mDNS off, a random
mesh secret); each serves model `bench` from its own local worker (a random-weight GPT-2 of the
chosen shape as a `path:` model, `max_batch` small so that load matters, one torch thread,
a prefix pool of a third of the distinct prompt tokens the run's conversations hold at their
last turn unless `--prefix-pool-tokens` says otherwise: the three nodes hold the run once).
`mesh.max_hops` is 1: the entry node decides and the chosen peer serves (no second hop).

The conversations enter through two different nodes (turn t of conversation i through node
(i + t) % 2), so the entry nodes must agree without a leader. Each group of `--group`
conversations shares one system prompt of `--system-tokens` tokens; each turn adds a user
message of `--user-tokens` tokens and the model's answer (`--max-tokens`, EOS never comes);
conversations start `--spread-s` apart and think `--think-s` between turns.

Round robin, least_loaded and cache_aware run one after another against the same nodes, in
`--rounds` rounds (the conversations split between them, so the drifting load of a shared box
falls on all three alike), each phase with its own prompts (a fresh seed, so no strategy finds
another's cache), the strategy chosen per request by a routing policy on a header
(`x-aiproxy-bench-strategy`): the nodes, their models and the arrival schedule are the same for
all three. Per strategy: time to first token (client-side,
from sending the request to the first content chunk) p50/p95, the prefix hit rate (the sum of
`usage.prompt_tokens_details.cached_tokens` over the sum of `prompt_tokens`: the prompt the
engines did not have to compute), tokens/s (completion tokens over the phase's wall time), and
which node served how many turns. Target: cache_aware TTFT p50 <= 50 % of round robin's, and
tokens/s no worse than least_loaded's. Results: bench/results/mesh_sched.{json,md}.

Every wait is bounded: node start, mesh formation, each request (`--request-timeout-s`) and each
phase (`--phase-timeout-s`); an unfinished turn counts as an error and fails the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from bench.local_tokens import build_model
from bench.mesh_common import mesh_view, own_capacity
from bench.procs import ProcessSet
from bench.report import percentile
from bench.targets import REPO, _clean_env

RESULTS_DIR = REPO / "bench" / "results"
STRATEGIES = ("round_robin", "least_loaded", "cache_aware")
STRATEGY_HEADER = "x-aiproxy-bench-strategy"  # policies match x-aiproxy-* headers
WARM_HEADER = "x-aiproxy-bench-warm"  # warm-up requests are served by the entry node's own worker
TARGET_TTFT_RATIO = 0.5
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_WORDS = (
    "alpha bravo cedar delta ember fjord gamma harbor iris juniper kelp lumen meadow nectar "
    "onyx prism quartz raven sierra tundra umber vessel willow xenon yarrow zephyr anchor "
    "basalt canyon dune estuary forge glacier heron inlet jasper kestrel lagoon marble nimbus "
    "orchid pebble quiver ridge summit thicket upland valley wharf yonder zenith"
).split()


@dataclass(frozen=True)
class Sizes:
    conversations: int
    group: int
    turns: int
    system_tokens: int
    user_tokens: int
    max_tokens: int
    spread_s: float
    think_s: float
    model: str
    max_batch: int
    rounds: int
    prefix_pool_tokens: int | None = None  # None: derived from the run (`pool_tokens`)


FULL = Sizes(conversations=24, group=6, turns=5, system_tokens=1024, user_tokens=160,
             max_tokens=16, spread_s=2.0, think_s=1.0, model="gpt2-small-2k", max_batch=2,
             rounds=2)
QUICK = Sizes(conversations=12, group=6, turns=3, system_tokens=256, user_tokens=48,
              max_tokens=8, spread_s=0.5, think_s=0.5, model="gpt2-tiny-2k", max_batch=2,
              rounds=2)


def distinct_prompt_tokens(sizes: Sizes) -> int:
    """The distinct prompt tokens the run's conversations hold at their last turn: each
    group's system prompt once, and each conversation's own user turns and answers (what a
    mesh must keep to hit on every turn; chat-template tokens left out)."""
    groups = -(-sizes.conversations // sizes.group)
    own = sizes.turns * sizes.user_tokens + (sizes.turns - 1) * sizes.max_tokens
    return groups * sizes.system_tokens + sizes.conversations * own


def pool_tokens(sizes: Sizes) -> int:
    """Each engine's prefix pool: as given, else a third of the run's distinct prompt tokens,
    so the three nodes together hold the run once (the mesh's cache is the sum of its nodes'):
    a strategy that keeps a conversation on one node finds its cache, one that sends every
    node every conversation does not."""
    if sizes.prefix_pool_tokens is not None:
        return sizes.prefix_pool_tokens
    return -(-distinct_prompt_tokens(sizes) // 3)


@dataclass
class Turn:
    conversation: int
    turn: int
    entry: str
    ttft_s: float | None = None
    seconds: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    node: str = ""
    error: str = ""


@dataclass
class Phase:
    strategy: str
    wall_s: float
    turns: list[Turn] = field(default_factory=list)

    def merge(self, other: Phase) -> None:
        """Another round of the same strategy: its turns, and its time added."""
        self.wall_s += other.wall_s
        offset = 1 + max((t.conversation for t in self.turns), default=-1)
        for t in other.turns:
            t.conversation += offset
        self.turns.extend(other.turns)

    @property
    def ok(self) -> list[Turn]:
        return [t for t in self.turns if not t.error and t.ttft_s is not None]

    def summary(self) -> dict[str, Any]:
        ok = self.ok
        ttfts = [t.ttft_s * 1000 for t in ok if t.ttft_s is not None]
        prompt = sum(t.prompt_tokens for t in ok)
        made = sum(t.completion_tokens for t in ok)
        return {
            "strategy": self.strategy,
            "turns": len(self.turns),
            "errors": len(self.turns) - len(ok),
            "ttft_p50_ms": percentile(ttfts, 50) if ttfts else None,
            "ttft_p95_ms": percentile(ttfts, 95) if ttfts else None,
            "ttft_mean_ms": statistics.fmean(ttfts) if ttfts else None,
            "prefix_hit_rate": sum(t.cached_tokens for t in ok) / prompt if prompt else 0.0,
            "turns_with_a_hit": sum(1 for t in ok if t.cached_tokens) / len(ok) if ok else 0.0,
            "tokens_per_s": made / self.wall_s if self.wall_s > 0 else 0.0,
            "completion_tokens": made,
            "wall_s": self.wall_s,
            "served_by": dict(sorted(Counter(t.node for t in ok).items())),
        }


# --------------------------------------------------------------------------- the workload
def _words(rng: random.Random, tokenizer: Any, tokens: int) -> str:
    """Random words until the model's tokenizer counts at least `tokens`."""
    words: list[str] = []
    while True:
        words.extend(rng.choice(_WORDS) for _ in range(16))
        text = " ".join(words)
        if len(tokenizer.encode(text)) >= tokens:
            return text


def workload(sizes: Sizes, tokenizer: Any, seed: int) -> tuple[list[str], list[list[str]]]:
    """(system prompt per group, user messages per conversation), all fresh for `seed`."""
    rng = random.Random(seed)
    groups = -(-sizes.conversations // sizes.group)
    systems = [f"[{seed}/{g}] " + _words(rng, tokenizer, sizes.system_tokens)
               for g in range(groups)]
    users = [[_words(rng, tokenizer, sizes.user_tokens) for _ in range(sizes.turns)]
             for _ in range(sizes.conversations)]
    return systems, users


# --------------------------------------------------------------------------- the nodes
def prefix_cache_mb(model_dir: Path, tokens: int) -> int:
    """The engine's prefix pool, in MB, that holds `tokens` tokens of this GPT-2's KV (float32
    keys and values of every layer: what the CPU engine keeps)."""
    config = json.loads((model_dir / "config.json").read_text())
    per_token = config["n_layer"] * 2 * config["n_embd"] * 4
    return max(1, -(-tokens * per_token // (1 << 20)))


def node_config(name: str, work: Path, model_dir: Path, sizes: Sizes, secret: str,
                seeds: list[str]) -> dict[str, Any]:
    policies: list[dict[str, Any]] = [
        {"name": "warm-up", "match": {"header": {WARM_HEADER: "1"}}, "allow": ["local"]},
    ]
    policies += [{"name": s, "match": {"header": {STRATEGY_HEADER: s}}, "strategy": s}
                 for s in STRATEGIES]
    return {
        "node": {"id": name, "data_dir": str(work / f"{name}-data")},
        "server": {"listen_addr": "127.0.0.1:0"},
        "logging": {"level": "warning"},
        "mesh": {"enabled": True, "listen_addr": "127.0.0.1:0", "mdns": False, "seeds": seeds,
                 "secret": secret, "max_hops": 1},
        "providers": {
            "local": {
                "enabled": True,
                "device": "cpu",
                "max_batch": sizes.max_batch,
                "max_queue": 64,
                "max_len": 2048,
                "prefix_cache_mb": prefix_cache_mb(model_dir, pool_tokens(sizes)),
                "models": [{"name": "bench", "path": str(model_dir), "kind": "chat"}],
            },
        },
        "routing": {"strategy": "least_loaded", "policies": policies,
                    "failover": {"fallback_chain": ["local", "mesh"]},
                    "timeouts": {"first_byte_ms": 300_000, "total_ms": 600_000}},
        "cache": {"enabled": False},  # whole-answer caching would hide the engines
        "budget": {"enabled": False},
        "auth": {"enabled": False},
    }


@dataclass(frozen=True)
class Node:
    name: str
    url: str
    grpc: str


def start_nodes(procs: ProcessSet, work: Path, model_dir: Path, sizes: Sizes,
                timeout_s: float) -> list[Node]:
    secret = secrets.token_hex(16)
    # This checkout's code, one torch thread per worker: 3 nodes share this box's cores.
    env = _clean_env({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                      "HF_HUB_OFFLINE": "1"})
    started = []
    first_grpc = ""
    for name in ("node-a", "node-b", "node-c"):  # b and c load their models while a does
        config = node_config(name, work, model_dir, sizes, secret,
                             [first_grpc] if first_grpc else [])
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        argv = [sys.executable, "-m", "meshnode", "run", "--config", str(path)]
        managed = procs.start(name, argv, env=env, cwd=REPO)
        url = managed.wait_for_line(r"^MESHNODE_HTTP=(http://\S+?)/?$", timeout_s).group(1)
        grpc = managed.wait_for_line(r"^MESHNODE_GRPC=(\S+)$", timeout_s).group(1)
        first_grpc = first_grpc or grpc
        started.append((managed, Node(name, url, grpc)))
    for managed, node in started:
        managed.wait_http_ok(node.url + "/health/ready", timeout_s)
    nodes = [node for _, node in started]
    deadline = time.monotonic() + timeout_s
    names = {n.name for n in nodes}
    while True:
        views = [mesh_view(n.url) for n in nodes]
        if all(all(v.get(m) == "alive" for m in names) for v in views):
            return nodes
        if time.monotonic() > deadline:
            raise SystemExit(f"the mesh did not form in {timeout_s:.0f}s: {views}")
        time.sleep(0.2)


# --------------------------------------------------------------------------- the client
async def chat(session: aiohttp.ClientSession, url: str, messages: list[dict[str, str]],
               max_tokens: int, headers: dict[str, str], turn: Turn, timeout_s: float) -> str:
    """One streamed chat turn; fills `turn` (TTFT, usage, serving node); returns the answer."""
    body = {"model": "bench", "messages": messages, "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    text: list[str] = []
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(url + "/v1/chat/completions", data=orjson.dumps(body),
                                    headers={"Content-Type": "application/json",
                                             **headers}) as resp:
                if resp.status != 200:
                    turn.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                    return ""
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    chunk = orjson.loads(line[6:])
                    if "error" in chunk:
                        turn.error = str(chunk["error"])[:200]
                        return ""
                    for choice in chunk.get("choices") or ():
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            if turn.ttft_s is None:
                                turn.ttft_s = time.perf_counter() - started
                            text.append(piece)
                    usage = chunk.get("usage")
                    if usage:
                        turn.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                        turn.completion_tokens = int(usage.get("completion_tokens") or 0)
                        details = usage.get("prompt_tokens_details") or {}
                        turn.cached_tokens = int(details.get("cached_tokens") or 0)
                    served = chunk.get("x_aiproxy")
                    if served:
                        turn.node = str(served.get("node") or "")
    except (TimeoutError, aiohttp.ClientError) as exc:
        turn.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        turn.seconds = time.perf_counter() - started
    if turn.ttft_s is None and not turn.error:
        turn.error = "no content"
    return "".join(text)


async def conversation(session: aiohttp.ClientSession, nodes: list[Node], index: int,
                       system: str, users: list[str], sizes: Sizes, strategy: str,
                       out: list[Turn], timeout_s: float, phase_deadline: float) -> None:
    await asyncio.sleep(index * sizes.spread_s)
    messages = [{"role": "system", "content": system}]
    for number, user in enumerate(users):
        entry = nodes[(index + number) % 2]
        turn = Turn(index, number, entry.name)
        out.append(turn)
        left = phase_deadline - time.monotonic()
        if left <= 0:
            turn.error = "phase timed out"
            continue
        messages.append({"role": "user", "content": user})
        answer = await chat(session, entry.url, messages, sizes.max_tokens,
                            {STRATEGY_HEADER: strategy}, turn, min(timeout_s, left))
        messages.append({"role": "assistant", "content": answer})
        await asyncio.sleep(sizes.think_s)


async def run_phase(nodes: list[Node], sizes: Sizes, strategy: str, systems: list[str],
                    users: list[list[str]], request_timeout_s: float,
                    phase_timeout_s: float) -> Phase:
    turns: list[Turn] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        started = time.monotonic()
        deadline = started + phase_timeout_s
        await asyncio.gather(*(
            conversation(session, nodes, i, systems[i // sizes.group], users[i], sizes,
                         strategy, turns, request_timeout_s, deadline)
            for i in range(sizes.conversations)
        ))
        # The phase ends with its last answer, not with the last think time.
        wall = time.monotonic() - started - sizes.think_s
    return Phase(strategy, wall, sorted(turns, key=lambda t: (t.conversation, t.turn)))


async def warm_up(nodes: list[Node], sizes: Sizes, tokenizer: Any) -> None:
    """Each node's worker runs a prompt of the phases' size once (first-call costs)."""
    rng = random.Random(1)
    async with aiohttp.ClientSession(trust_env=False) as session:
        for node in nodes:
            turn = Turn(-1, 0, node.name)
            messages = [{"role": "user", "content": _words(rng, tokenizer, sizes.system_tokens)}]
            await chat(session, node.url, messages, 2, {WARM_HEADER: "1"}, turn, 300)
            if turn.error:
                raise SystemExit(f"warm-up on {node.name} failed: {turn.error}")


# --------------------------------------------------------------------------- report
def verdict(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rr, ll, ca = rows["round_robin"], rows["least_loaded"], rows["cache_aware"]
    ratio = (ca["ttft_p50_ms"] / rr["ttft_p50_ms"]
             if ca["ttft_p50_ms"] is not None and rr["ttft_p50_ms"] else None)
    ttft_ok = ratio is not None and ratio <= TARGET_TTFT_RATIO
    tps_ok = ca["tokens_per_s"] >= ll["tokens_per_s"]
    errors = sum(r["errors"] for r in rows.values())
    return {"ttft_p50_ratio_vs_round_robin": ratio, "ttft_ok": ttft_ok,
            "tokens_per_s_vs_least_loaded": (ca["tokens_per_s"] / ll["tokens_per_s"]
                                             if ll["tokens_per_s"] else None),
            "tokens_per_s_ok": tps_ok, "errors": errors,
            "pass": ttft_ok and tps_ok and errors == 0}


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(rows: dict[str, dict[str, Any]]) -> str:
    lines = ["| strategy | TTFT p50 ms | TTFT p95 ms | prefix hit rate | turns with a hit "
             "| tokens/s | errors | served by |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        served = ", ".join(f"{k} {v}" for k, v in r["served_by"].items())
        lines.append(
            f"| {name} | {_fmt(r['ttft_p50_ms'], '.0f')} | {_fmt(r['ttft_p95_ms'], '.0f')} "
            f"| {r['prefix_hit_rate']:.0%} | {r['turns_with_a_hit']:.0%} "
            f"| {r['tokens_per_s']:.1f} | {r['errors']} | {served} |"
        )
    return "\n".join(lines)


def target_line(v: dict[str, Any]) -> str:
    ratio = v["ttft_p50_ratio_vs_round_robin"]
    tps = v["tokens_per_s_vs_least_loaded"]
    return (f"cache_aware TTFT p50 = {_fmt(ratio and ratio * 100, '.0f')} % of round robin's "
            f"(target <= {TARGET_TTFT_RATIO:.0%}): {'PASS' if v['ttft_ok'] else 'FAIL'}; "
            f"tokens/s = {_fmt(tps, '.2f')}x least_loaded's (target >= 1): "
            f"{'PASS' if v['tokens_per_s_ok'] else 'FAIL'}; errors {v['errors']}")


def node_speed(capacity: dict[str, Any]) -> dict[str, float]:
    """A node's gossiped, measured speeds (what cache_aware weighs its hits with)."""
    prefill = float(capacity.get("prefill_tokens_per_s") or 0.0)
    decode = float(capacity.get("decode_tokens_per_s") or 0.0)
    return {"prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode,
            "ratio": prefill / decode if prefill > 0 and decode > 0 else 0.0}


def speed_line(speeds: dict[str, dict[str, float]]) -> str:
    parts = [f"{name} {s['prefill_tokens_per_s']:.0f} prefill / {s['decode_tokens_per_s']:.1f} "
             f"decode tok/s a stream (a decoded token = {s['ratio']:.0f} prompt tokens)"
             for name, s in speeds.items()]
    return "measured at the end (gossiped): " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 12 conversations, tiny model, 256-token system prompts")
    parser.add_argument("--conversations", type=int)
    parser.add_argument("--group", type=int, help="conversations sharing one system prompt")
    parser.add_argument("--turns", type=int)
    parser.add_argument("--system-tokens", type=int)
    parser.add_argument("--user-tokens", type=int)
    parser.add_argument("--max-tokens", type=int, help="completion tokens per turn")
    parser.add_argument("--spread-s", type=float, help="between conversation starts")
    parser.add_argument("--think-s", type=float, help="between a conversation's turns")
    parser.add_argument("--model", choices=("gpt2-small-2k", "gpt2-tiny-2k"))
    parser.add_argument("--max-batch", type=int, help="each worker's slots")
    parser.add_argument("--rounds", type=int,
                        help="the conversations are split over this many rounds of the three")
    parser.add_argument("--prefix-pool-tokens", type=int,
                        help="each engine's prefix cache, in tokens (default: a third of the "
                             "distinct prompt tokens this run's conversations hold at their "
                             "last turn, so the three nodes together hold the run once: the "
                             "mesh's cache is the sum of its nodes')")
    parser.add_argument("--request-timeout-s", type=float, default=180.0)
    parser.add_argument("--phase-timeout-s", type=float, default=300.0)
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".meshnode" / "bench-models")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "mesh_sched.json")
    parser.add_argument("--markdown", type=Path, default=RESULTS_DIR / "mesh_sched.md")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    sizes = Sizes(**{k: (getattr(args, k) if getattr(args, k) is not None else v)
                     for k, v in asdict(base).items()})
    sizes = replace(sizes, prefix_pool_tokens=pool_tokens(sizes))  # the report shows the pool

    from transformers import AutoTokenizer

    model_dir = build_model(sizes.model, args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    print(f"sizes: {json.dumps(asdict(sizes))}", flush=True)
    started = time.monotonic()
    phases: dict[str, Phase] = {}
    with tempfile.TemporaryDirectory(prefix="mesh-sched-") as tmp, \
            ProcessSet(Path(tmp) / "logs") as procs:
        work = Path(tmp)
        nodes = start_nodes(procs, work, model_dir, sizes, 180.0)
        print(f"mesh up: {', '.join(n.name for n in nodes)} "
              f"({time.monotonic() - started:.0f}s)", flush=True)
        asyncio.run(warm_up(nodes, sizes, tokenizer))
        # Rounds interleave the strategies (round robin, least_loaded, cache_aware, then again
        # with fresh prompts), so the other load on a shared box hits each alike.
        per_round = replace(sizes, conversations=max(1, sizes.conversations // sizes.rounds))
        seed = 100
        for number in range(sizes.rounds):
            for strategy in STRATEGIES:
                seed += 1
                systems, users = workload(per_round, tokenizer, seed)
                phase = asyncio.run(run_phase(nodes, per_round, strategy, systems, users,
                                              args.request_timeout_s, args.phase_timeout_s))
                s = phase.summary()
                print(f"  round {number + 1} {strategy:<13} TTFT p50 "
                      f"{_fmt(s['ttft_p50_ms'], '.0f')} ms, hit {s['prefix_hit_rate']:.0%}, "
                      f"{s['tokens_per_s']:.1f} tok/s, errors {s['errors']} "
                      f"({phase.wall_s:.0f}s)", flush=True)
                for t in phase.turns:
                    if t.error:
                        print(f"    conversation {t.conversation} turn {t.turn}: {t.error}")
                if strategy in phases:
                    phases[strategy].merge(phase)
                else:
                    phases[strategy] = phase
                time.sleep(2.0)  # the nodes settle and gossip what they hold
        for node in nodes:  # nothing of a phase may be left in a worker's queue
            assert all(v == "alive" for v in mesh_view(node.url).values()), node.name
        speeds = {node.name: node_speed(own_capacity(node.url)) for node in nodes}
    rows = {name: phase.summary() for name, phase in phases.items()}
    v = verdict(rows)
    out_table = table(rows)
    print()
    print(out_table)
    print(target_line(v))
    print(speed_line(speeds))
    elapsed = time.monotonic() - started
    result = {"bench": "mesh_sched", "sizes": asdict(sizes), "strategies": rows, "target": v,
              "measured_speeds": speeds,
              "seconds": elapsed, "cpus": len(os.sched_getaffinity(0)),
              "turns": {name: [asdict(t) for t in p.turns] for name, p in phases.items()}}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    args.markdown.write_text(
        f"# bench.mesh_sched ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n"
        f"sizes: `{json.dumps(asdict(sizes))}`, {result['cpus']} CPUs, {elapsed:.0f} s\n\n"
        f"{out_table}\n\n{target_line(v)}\n\n{speed_line(speeds)}\n"
    )
    print(f"wrote {args.output} and {args.markdown} ({elapsed:.0f}s)")
    return 0 if v["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
