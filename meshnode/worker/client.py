"""The node's side of one worker process: spawn, talk, watch, restart.

`WorkerProcess` owns one child process (`python -m meshnode.worker.main`) and the socketpair to
it. Everything here runs on the node's event loop and never blocks it: the child is started
with `asyncio.create_subprocess_exec`, frames are read by one task, and model code only ever
runs in the child.

Supervision:
- the child dies (socket EOF): every in-flight call gets `WorkerGone`, the child is restarted
  after a backoff (doubling, capped; reset once a child stayed up `STABLE_S`);
- the child hangs (no frame, heartbeats included, for `hang_timeout_s` once ready, or not
  ready within `load_timeout_s`): it is killed, which then looks like a death.

Callers see a `Call` per request: an asyncio queue of `Event`s. Translation into MeshErrors is
the provider's business (it knows whether anything was streamed yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import meshnode
from meshnode.routing.prefix import decode_names
from meshnode.worker.main import WorkerConfig
from meshnode.worker.protocol import FrameError, encode, read_frame

log = logging.getLogger(__name__)

STABLE_S = 30.0


class WorkerState(enum.StrEnum):
    STARTING = "starting"  # spawned, loading or warming up
    READY = "ready"
    DOWN = "down"  # dead, waiting for the restart backoff
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class TextDelta:
    choice: int
    text: str
    finish: str | None
    # When asked: [[token bytes, logprob | None, [[bytes, logprob], ...]], ...] (protocol.py)
    logprobs: list[Any] | None = None
    stop_sequence: str | None = None  # the stop string that ended this choice, if one did


@dataclass(frozen=True, slots=True)
class Finished:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV the worker reused


@dataclass(frozen=True, slots=True)
class Embedded:
    dim: int
    vectors: bytes  # float32 row-major
    tokens: int


@dataclass(frozen=True, slots=True)
class Rejected:
    message: str
    param: str | None


@dataclass(frozen=True, slots=True)
class WorkerGone:
    reason: str


@dataclass(frozen=True, slots=True)
class StepFailed:
    """The worker could not serve this request (out of memory in its step) but goes on serving:
    retryable elsewhere or later."""

    reason: str


Event = TextDelta | Finished | Embedded | Rejected | WorkerGone | StepFailed


@dataclass(slots=True)
class Call:
    """One request in flight on a worker."""

    call_id: int
    slots: int  # batch slots it takes (n for generation, 0 for embeddings)
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    # Added to the worker's choice numbers: the calls of one multi-prompt completion share
    # one queue, choices numbered prompt by prompt as OpenAI does.
    choice_offset: int = 0


@dataclass(frozen=True, slots=True)
class Heartbeat:
    tokens_per_s: float = 0.0
    memory_bytes: int = 0
    active: int = 0
    queued: int = 0
    prefix_blocks: tuple[str, ...] = ()
    # Routing names (meshnode.routing.prefix) whose KV the worker's engines hold, most recent
    # first, and the same as a set: what cache_aware matches and the node gossips.
    routed: tuple[bytes, ...] = ()
    routed_set: frozenset[bytes] = frozenset()
    # Measured prefill tokens/s and decode tokens/s per stream (meshnode.worker.rates; 0.0:
    # not measured yet): what cache_aware weighs a hit's saved prefill with.
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0


class WorkerProcess:
    def __init__(
        self,
        config: WorkerConfig,
        *,
        name: str,
        hang_timeout_s: float = 60.0,
        load_timeout_s: float = 600.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        on_hello: Callable[[WorkerProcess, dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config
        self.name = name
        self.hang_timeout_s = hang_timeout_s
        self.load_timeout_s = load_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self._on_hello = on_hello
        self.state = WorkerState.STOPPED
        self.last_error = ""
        self.models: dict[str, dict[str, Any]] = {}
        self.heartbeat = Heartbeat()
        self.pid: int | None = None
        self.restarts = 0
        self._calls: dict[int, Call] = {}
        self._ids = itertools.count(1)
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._closing = False
        self._last_frame = 0.0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Spawn the child in the background; returns at once."""
        if self._supervisor is None:
            self.state = WorkerState.STARTING
            self._supervisor = asyncio.create_task(self._supervise(), name=f"worker-{self.name}")

    async def close(self, grace_s: float = 5.0) -> None:
        self._closing = True
        if self._writer is not None and not self._writer.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                self._writer.write(encode({"t": "stop"}))
        proc = self._proc
        if proc is not None and proc.returncode is None:
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        self._fail_all("the local worker is shutting down")
        self.state = WorkerState.STOPPED

    async def wait_ready(self, timeout: float) -> bool:
        if self.state is WorkerState.READY:
            return True
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return self.state is WorkerState.READY

    def kill(self) -> None:
        """Kill the child now (tests, and the hang watchdog); supervision restarts it."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGKILL)

    # ------------------------------------------------------------------ load
    @property
    def slots_busy(self) -> int:
        return sum(c.slots for c in self._calls.values())

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    # ------------------------------------------------------------------ calls
    def generate(self, model: str, messages: list[dict[str, str]] | None,
                 prompt: str | list[int] | None, params: dict[str, Any], slots: int, *,
                 events: asyncio.Queue[Event] | None = None, choice_offset: int = 0,
                 tools: list[dict[str, Any]] | None = None,
                 route: tuple[bytes, int] | None = None) -> Call:
        """Start one generation. `prompt` is text or token ids; `events` lets several calls
        share one queue (their choices told apart by `choice_offset`); `tools` (ToolSpec
        wire dicts) are rendered into a chat prompt; `route` is the request's routing names
        (packed) and its rendering's length, which the worker ties to the prompt's KV blocks."""
        call = self._new_call(slots)
        if events is not None:
            call.events = events
        call.choice_offset = choice_offset
        frame: dict[str, Any] = {"t": "gen", "id": call.call_id, "model": model,
                                 "params": params}
        if messages is not None:
            frame["messages"] = messages
        elif isinstance(prompt, list):
            frame["prompt_ids"] = prompt
        else:
            frame["prompt"] = prompt
        if tools:
            frame["tools"] = tools
        if route is not None:
            frame["rpfx"], frame["rlen"] = route
        self._send(frame, call)
        return call

    def embed(self, model: str, inputs: list[str] | list[list[int]]) -> Call:
        call = self._new_call(0)
        self._send({"t": "emb", "id": call.call_id, "model": model, "input": inputs}, call)
        return call

    def release(self, call: Call, *, cancel: bool) -> None:
        """Forget a call; `cancel` tells the worker to stop generating for it."""
        if self._calls.pop(call.call_id, None) is not None and cancel:
            self._send({"t": "cancel", "id": call.call_id}, None)

    def _new_call(self, slots: int) -> Call:
        call = Call(next(self._ids), slots)
        self._calls[call.call_id] = call
        return call

    def _send(self, frame: dict[str, Any], call: Call | None) -> None:
        writer = self._writer
        if self.state is not WorkerState.READY or writer is None or writer.is_closing():
            if call is not None:
                self._calls.pop(call.call_id, None)
                call.events.put_nowait(WorkerGone("the local worker is not running"))
            return
        # Frames are small and the worker drains its socket continuously; a transport buffer
        # filling up would only mean a dead worker, which the reader notices.
        writer.write(encode(frame))

    # ------------------------------------------------------------------ supervision
    async def _supervise(self) -> None:
        backoff = self.backoff_initial_s
        while not self._closing:
            started = time.monotonic()
            try:
                await self._run_once()
            except (OSError, FrameError) as exc:
                self.last_error = f"worker I/O failed: {exc}"
                log.warning("local worker %s: %s", self.name, self.last_error)
            self._ready.clear()
            self._fail_all(self.last_error or "the local worker died")
            if self._closing:
                break
            self.state = WorkerState.DOWN
            if time.monotonic() - started >= STABLE_S:
                backoff = self.backoff_initial_s
            log.warning("local worker %s down (%s); restarting in %.1fs",
                        self.name, self.last_error, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.backoff_max_s)
            self.restarts += 1
            self.state = WorkerState.STARTING

    async def _run_once(self) -> None:
        self.last_error = ""
        parent_sock, child_sock = socket.socketpair()
        try:
            env = dict(os.environ)
            root = str(Path(meshnode.__file__).resolve().parent.parent)
            env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"]
                                        if env.get("PYTHONPATH") else "")
            env["HF_HUB_OFFLINE"] = "1"
            env["TRANSFORMERS_OFFLINE"] = "1"
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "meshnode.worker.main",
                "--fd", str(child_sock.fileno()), "--spec", self.config.to_json(),
                pass_fds=(child_sock.fileno(),), stdin=asyncio.subprocess.DEVNULL, env=env,
            )
        finally:
            child_sock.close()
        self.pid = self._proc.pid
        reader, writer = await asyncio.open_unix_connection(sock=parent_sock)
        self._writer = writer
        self._last_frame = time.monotonic()
        spawned = self._last_frame
        watchdog = asyncio.create_task(self._watch(spawned))
        try:
            await self._read_loop(reader)
        finally:
            watchdog.cancel()
            self.state = WorkerState.DOWN if not self._closing else WorkerState.STOPPED
            writer.close()
            self.kill()
            code = await self._proc.wait()
            if not self.last_error:
                self.last_error = f"worker exited with code {code}"

    async def _watch(self, spawned: float) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.hang_timeout_s / 4))
            now = time.monotonic()
            if self.state is WorkerState.READY and now - self._last_frame > self.hang_timeout_s:
                self.last_error = f"worker hung (no heartbeat for {self.hang_timeout_s:.0f}s)"
                log.error("local worker %s: %s; killing it", self.name, self.last_error)
                self.kill()
                return
            if self.state is WorkerState.STARTING and now - spawned > self.load_timeout_s:
                self.last_error = f"worker not ready after {self.load_timeout_s:.0f}s"
                log.error("local worker %s: %s; killing it", self.name, self.last_error)
                self.kill()
                return

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        while True:
            message = await read_frame(reader)
            if message is None:
                return
            self._last_frame = time.monotonic()
            kind = message["t"]
            if kind == "step":
                self._on_step(message)
            elif kind == "hb":
                blob = message.get("rpfx")
                routed = decode_names(blob) if isinstance(blob, bytes) else ()
                self.heartbeat = Heartbeat(float(message["tps"]), int(message["mem"]),
                                           int(message["active"]), int(message["queued"]),
                                           tuple(str(h) for h in message.get("pfx", ())),
                                           routed, frozenset(routed),
                                           _rate(message.get("pps")), _rate(message.get("dps")))
            elif kind == "emb":
                call = self._calls.pop(message["id"], None)
                if call is not None:
                    call.events.put_nowait(
                        Embedded(message["dim"], message["vectors"], message["tokens"]))
            elif kind == "err":
                call = self._calls.pop(message["id"], None)
                if call is not None:
                    call.events.put_nowait(Rejected(message["message"], message.get("param")))
            elif kind == "fail":
                call = self._calls.pop(message["id"], None)
                if call is not None:
                    call.events.put_nowait(StepFailed(message["message"]))
            elif kind == "ready":
                self.models = message["models"]
                self.state = WorkerState.READY
                self._ready.set()
            elif kind == "hello":
                if self._on_hello is not None:
                    self._on_hello(self, message)
            elif kind == "fatal":
                self.last_error = f"worker failed to load: {message['message']}"
                log.error("local worker %s: %s", self.name, self.last_error)

    def _on_step(self, message: dict[str, Any]) -> None:
        calls = self._calls
        for item in message["ev"]:
            call = calls.get(item[0])
            if call is not None:
                call.events.put_nowait(TextDelta(item[1] + call.choice_offset, item[2], item[3],
                                                 item[4] if len(item) > 4 else None,
                                                 item[5] if len(item) > 5 else None))
        for request_id, prompt_tokens, completion_tokens, *rest in message["done"]:
            call = calls.pop(request_id, None)
            if call is not None:
                call.events.put_nowait(Finished(prompt_tokens, completion_tokens,
                                                int(rest[0]) if rest else 0))

    def _fail_all(self, reason: str) -> None:
        calls, self._calls = self._calls, {}
        for call in calls.values():
            call.events.put_nowait(WorkerGone(reason))
        self._writer = None


def _rate(value: object) -> float:
    """A measured rate from a heartbeat: a finite number >= 0, else 0.0 (not measured)."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return 0.0
    return float(value)
