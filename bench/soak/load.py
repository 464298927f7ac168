"""The soak's clients: mixed load on nodes A and B, and the log that proves every request ended.

Each request writes two lines to the client log (JSON lines, flushed as written): `start` before
the request is sent and `end` with its one terminal outcome. Outcomes:

- `ok`: a complete answer (non-stream: 200 with `x_aiproxy`; stream: `x_aiproxy` on the last
  chunk, then `[DONE]`), with its cost and whether its text is exactly the upstream's;
- `http_error`: an HTTP error status in OpenAI's shape (e.g. 503 when nothing could serve);
- `stream_error`: a stream that ended with an error event after its first byte (no `[DONE]`);
- `stream_cut`: a stream that ended with neither `[DONE]` nor an error event (a defect);
- `transport_error`: the connection failed; `timeout`: no end within the client's deadline.

Invariants are checked on the log file afterwards (`invariants.py`), not on memory, so a
request that ended twice or never would show.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.soak.cluster import CHAT_MODEL, EMBED_MODEL
from tests.kit.fake_openai import DEFAULT_TEXT

KINDS = ("chat", "stream", "embed")
WEIGHTS = (0.45, 0.35, 0.20)
REPEATED = 0.1  # share of chat prompts that repeat (cache hits: cost 0, never charged)
REQUEST_TIMEOUT_S = 90.0


@dataclass
class End:
    id: int
    node: str
    kind: str
    outcome: str
    status: int | None = None
    code: str | None = None
    cost: float | None = None
    served_by: str | None = None
    cache: str | None = None
    text_ok: bool | None = None
    header_cost_ok: bool | None = None
    attempts: int | None = None
    seconds: float = 0.0


class ClientLog:
    """Append-only JSON lines; each line is written and flushed at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("ab")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(orjson.dumps(record) + b"\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_log(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


class Load:
    """`clients` concurrent loops over nodes A and B until `deadline` or `max_requests`."""

    def __init__(
        self,
        urls: Callable[[], dict[str, str]],
        log: ClientLog,
        *,
        clients: int,
        deadline: float,
        max_requests: int,
        think_s: float = 0.02,
        seed: int = 1,
    ) -> None:
        self._urls = urls
        self._log = log
        self._clients = clients
        self._deadline = deadline
        self._max = max_requests
        self._think_s = think_s
        self._ids = itertools.count(1)
        self._rng = random.Random(seed)
        self.sent = 0

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=0)
        # no proxies from the environment: loopback only
        async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
            await asyncio.gather(*(self._loop(session) for _ in range(self._clients)))

    async def _loop(self, session: aiohttp.ClientSession) -> None:
        while time.monotonic() < self._deadline and self.sent < self._max:
            self.sent += 1
            rid = next(self._ids)
            node = self._rng.choice(("a", "b"))
            kind = self._rng.choices(KINDS, WEIGHTS)[0]
            repeated = kind == "chat" and self._rng.random() < REPEATED
            self._log.write({"event": "start", "id": rid, "node": node, "kind": kind,
                             "t": time.time()})
            started = time.monotonic()
            end = End(rid, node, kind, "timeout")
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    await self._one(session, self._urls()[node], end, repeated)
            except TimeoutError:
                end.outcome = "timeout"
            except (aiohttp.ClientError, OSError) as exc:
                end.outcome = "transport_error"
                end.code = type(exc).__name__
            end.seconds = round(time.monotonic() - started, 3)
            self._log.write({"event": "end", **asdict(end)})
            await asyncio.sleep(self._think_s)

    async def _one(
        self, session: aiohttp.ClientSession, url: str, end: End, repeated: bool
    ) -> None:
        prompt = "soak repeated question" if repeated else f"soak request {end.id} say hello"
        if end.kind == "embed":
            body: dict[str, Any] = {"model": EMBED_MODEL, "input": [prompt, "second input"]}
            path = "/v1/embeddings"
        else:
            body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": prompt}]}
            path = "/v1/chat/completions"
            if end.kind == "stream":
                body["stream"] = True
            if repeated:
                body["temperature"] = 0  # deterministic: the cache may answer (cost 0)
        async with session.post(url + path, data=orjson.dumps(body),
                                headers={"Content-Type": "application/json"}) as resp:
            end.status = resp.status
            if resp.status != 200:
                end.outcome = "http_error"
                error = (await _json(resp)).get("error") or {}
                end.code = error.get("code") or error.get("type")
                return
            if end.kind == "stream":
                await _read_stream(resp, end)
                return
            data = await _json(resp)
            _served(data.get("x_aiproxy"), end)
            header = resp.headers.get("x-aiproxy-cost")
            end.header_cost_ok = header is not None and end.cost is not None and abs(
                float(header) - end.cost) < 1e-9
            if end.kind == "chat":
                choices = data.get("choices") or [{}]
                end.text_ok = (choices[0].get("message") or {}).get("content") == DEFAULT_TEXT
            else:
                end.text_ok = len(data.get("data") or []) == 2
            end.outcome = "ok" if end.cost is not None else "http_error"


async def _json(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        data = orjson.loads(await resp.read())
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _served(block: Any, end: End) -> None:
    if isinstance(block, dict) and isinstance(block.get("cost"), int | float):
        end.cost = float(block["cost"])
        end.served_by = block.get("node")
        end.cache = block.get("cache")
        attempts = block.get("attempts")
        end.attempts = len(attempts) if isinstance(attempts, list) else None


async def _read_stream(resp: aiohttp.ClientResponse, end: End) -> None:
    text: list[str] = []
    done = errored = False
    async for raw in resp.content:
        line = raw.strip()
        if not line.startswith(b"data: "):
            continue
        payload = line[6:]
        if payload == b"[DONE]":
            done = True
            continue
        if done or errored:
            end.outcome = "stream_cut"  # anything after [DONE] or an error event is a defect
            end.code = "event after the end"
            return
        event = orjson.loads(payload)
        if "error" in event:
            errored = True
            end.code = (event["error"] or {}).get("code") or (event["error"] or {}).get("type")
            continue
        for choice in event.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                text.append(piece)
        if "x_aiproxy" in event:
            _served(event["x_aiproxy"], end)
    if errored:
        end.outcome = "stream_error"
    elif done and end.cost is not None:
        end.outcome = "ok"
        end.text_ok = "".join(text) == DEFAULT_TEXT
    else:
        end.outcome = "stream_cut"
