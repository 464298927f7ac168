"""The local provider: models served by PyTorch worker processes on this machine.

Owns the worker processes (one per CUDA device, or one CPU worker) through
`meshnode.worker.client.WorkerProcess`, and turns their events into OpenAI-shaped answers.
It never imports torch: model code runs only in the workers, so the node's event loop never
blocks on it.

Errors, translated here once:
- bad sampling values, a prompt over the context: `InvalidRequest` (400, not retryable);
- no worker ready, the queue over its bound (`local_queue_full`), a worker that died before
  anything was streamed, a step that ran out of memory for this request while the worker
  goes on (`local_out_of_memory`): `UpstreamUnavailable` (retryable: the router fails over);
- a worker that died after chunks were streamed: `StreamBroken` (never retried);
- no first token within `first_byte_ms`: `UpstreamTimeout` (retryable).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshnode.config import ResolvedProvider, TimeoutsConfig
from meshnode.errors import (
    ConfigError,
    DeadlineExceeded,
    InvalidRequest,
    StreamBroken,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from meshnode.providers.base import Provider
from meshnode.providers.embeddings import EmbeddingOptions, encode_vectors, parse_embedding_options
from meshnode.providers.local_choices import ChatChoice, CompletionLogprobs
from meshnode.providers.registry import ProviderContext
from meshnode.routing.prefix import MAX_NAMES, worker_route
from meshnode.types import (
    Capacity,
    Completion,
    InferenceRequest,
    ModelOffer,
    RequestKind,
    StreamChunk,
    Usage,
    mean_rate,
)
from meshnode.worker.client import (
    Call,
    Embedded,
    Event,
    Finished,
    Heartbeat,
    Rejected,
    StepFailed,
    TextDelta,
    WorkerGone,
    WorkerProcess,
    WorkerState,
)
from meshnode.worker.main import WorkerConfig
from meshnode.worker.models import ModelSpec, check_spec
from meshnode.worker.params import (
    chat_messages,
    check_token_ids,
    completion_prompts,
    embedding_inputs,
    parse_chat_format,
    parse_sampling,
    parse_tools,
)

log = logging.getLogger(__name__)

_TEXT_KINDS = frozenset({RequestKind.CHAT, RequestKind.COMPLETION})


class LocalProvider(Provider):
    kind = "local"

    def __init__(
        self,
        resolved: ResolvedProvider,
        ctx: ProviderContext,
        *,
        hang_timeout_s: float = 60.0,
        load_timeout_s: float = 600.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        threads: int = 0,
    ) -> None:
        self.name = resolved.name
        self._config = resolved.config
        self._ctx = ctx
        self._worker_options: dict[str, Any] = {
            "hang_timeout_s": hang_timeout_s, "load_timeout_s": load_timeout_s,
            "backoff_initial_s": backoff_initial_s, "backoff_max_s": backoff_max_s,
        }
        self._threads = threads
        device = resolved.config.device
        if device not in ("auto", "cpu", "cuda") and not (
            device.startswith("cuda:") and device[5:].isdigit()
        ):
            raise ConfigError([f"providers.{self.name}.device: must be auto, cpu, cuda or "
                               f"cuda:N (got {device!r})"])
        errors: list[str] = []
        specs: list[ModelSpec] = []
        offers: list[ModelOffer] = []
        for i, model in enumerate(resolved.config.models):
            if model.kind not in ("chat", "completion", "embedding"):
                errors.append(f"providers.{self.name}.models[{i}].kind: local models serve "
                              f"chat, completion or embedding (got {model.kind!r})")
                continue
            spec = ModelSpec(model.name, model.kind,
                             str(model.path) if model.path is not None else None, model.builtin)
            problem = check_spec(spec)
            if problem:
                field = "path" if model.path is not None else "builtin"
                errors.append(f"providers.{self.name}.models[{i}].{field}: {problem}")
                continue
            specs.append(spec)
            kinds = (frozenset({RequestKind.EMBEDDING}) if model.kind == "embedding"
                     else _TEXT_KINDS)
            offers.append(ModelOffer(
                model=model.name, provider=self.name, provider_kind="local",
                upstream_model=model.name, kinds=kinds,
                cost_per_1k_input=model.input_price, cost_per_1k_output=model.output_price,
                priority=resolved.config.priority, max_context_tokens=model.max_context_tokens,
            ))
        if errors:
            raise ConfigError(errors)
        self._specs = tuple(specs)
        self._offers = tuple(offers)
        self._matryoshka = frozenset(m.name for m in resolved.config.models if m.matryoshka)
        self._workers: list[WorkerProcess] = []
        self._rr = 0

    # ------------------------------------------------------------------ lifecycle
    def offers(self) -> Sequence[ModelOffer]:
        return self._offers

    async def start(self) -> None:
        """Spawn the worker(s) and return at once; `ready()` turns true after warm-up."""
        if not self._specs or self._workers:
            return
        device = self._config.device
        first = "cuda:0" if device == "cuda" else device
        self._add_worker(first, on_hello=self._on_first_hello if device == "auto" else None)

    def _add_worker(self, device: str, on_hello: Any = None) -> None:
        config = WorkerConfig(
            device=device, data_dir=str(Path(self._ctx.data_dir).resolve()),
            max_batch=self._config.max_batch, models=tuple(s.to_wire() for s in self._specs),
            threads=self._threads, dtype=self._config.dtype, max_len=self._config.max_len,
            prefill_chunk=self._config.prefill_chunk,
            prefix_cache_mb=self._config.prefix_cache_mb, cuda_graphs=self._config.cuda_graphs,
        )
        worker = WorkerProcess(config, name=f"{self.name}/{device}", on_hello=on_hello,
                               **self._worker_options)
        self._workers.append(worker)
        worker.start()

    def _on_first_hello(self, worker: WorkerProcess, hello: dict[str, Any]) -> None:
        # `auto` found several GPUs: one more worker per extra device (once).
        count = int(hello.get("cuda_count", 0))
        if len(self._workers) == 1 and count > 1:
            for index in range(1, count):
                self._add_worker(f"cuda:{index}")

    async def close(self) -> None:
        workers, self._workers = self._workers, []
        await asyncio.gather(*(w.close() for w in workers))

    @property
    def workers(self) -> Sequence[WorkerProcess]:
        return tuple(self._workers)

    def ready(self) -> tuple[bool, str]:
        if not self._specs:
            return True, ""
        if not self._workers:
            return False, f"{self.name}: workers not started"
        ready = [w for w in self._workers if w.state is WorkerState.READY]
        if ready:
            return True, ""
        reasons = "; ".join(
            f"{w.name} {w.state.value}" + (f" ({w.last_error})" if w.last_error else "")
            for w in self._workers
        )
        return False, f"{self.name}: {reasons}"

    def capacity(self) -> Capacity:
        total = busy = queued = memory = 0
        tps = 0.0
        prefixes: list[str] = []
        beats: list[Heartbeat] = []
        for worker in self._workers:
            if worker.state is not WorkerState.READY:
                continue
            slots = self._config.max_batch
            in_use = worker.slots_busy
            total += slots
            busy += min(in_use, slots)
            queued += max(0, in_use - slots)
            tps += worker.heartbeat.tokens_per_s
            memory += worker.heartbeat.memory_bytes
            prefixes.extend(worker.heartbeat.prefix_blocks)
            beats.append(worker.heartbeat)
        if len(beats) == 1:  # one worker: its heartbeat's set, built once per heartbeat
            names, held = beats[0].routed, beats[0].routed_set
        else:
            names = tuple(dict.fromkeys(n for b in beats for n in b.routed))[:MAX_NAMES]
            held = frozenset(names)
        return Capacity(slots_total=total, slots_free=total - busy, queue_depth=queued,
                        tokens_per_s=tps, memory_used_bytes=memory,
                        prefix_blocks=tuple(dict.fromkeys(prefixes)),
                        prefix_names=held, prefix_recent=names,
                        prefill_tokens_per_s=mean_rate(b.prefill_tokens_per_s for b in beats),
                        decode_tokens_per_s=mean_rate(b.decode_tokens_per_s for b in beats))

    # ------------------------------------------------------------------ dispatch
    async def _pick_worker(self, timeouts: TimeoutsConfig, deadline: float,
                           slots: int) -> WorkerProcess:
        """The least loaded ready worker; waits up to `connect_ms` for one that is starting."""
        ready = [w for w in self._workers if w.state is WorkerState.READY]
        if not ready:
            starting = [w for w in self._workers if w.state is not WorkerState.STOPPED]
            wait = min(timeouts.connect_ms / 1000.0, max(0.0, deadline - time.monotonic()))
            if starting and wait > 0:
                waits = [asyncio.ensure_future(w.wait_ready(wait)) for w in starting]
                done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
                ready = [w for w in self._workers if w.state is WorkerState.READY]
            if not ready:
                _, why = self.ready()
                raise UpstreamUnavailable(f"local worker not ready ({why})",
                                          code="local_not_ready", provider=self.name)
        worker = min(ready, key=lambda w: w.slots_busy)
        if slots and worker.slots_busy + slots > self._config.max_batch + self._config.max_queue:
            raise UpstreamUnavailable(
                f"local worker queue is full ({worker.slots_busy} sequences in flight)",
                code="local_queue_full", provider=self.name,
            )
        return worker

    async def _open_text(self, request: InferenceRequest, offer: ModelOffer,
                         timeouts: TimeoutsConfig) -> _TextCalls:
        """Start the generations of one request: one call for chat, one per prompt for a
        legacy completion, all feeding one queue."""
        if request.kind not in _TEXT_KINDS:
            raise InvalidRequest(f"{offer.model} does not serve {request.kind.value} requests",
                                 param="model")
        body = request.body
        chat = request.kind is RequestKind.CHAT
        messages: list[dict[str, str]] | None = None
        prompts: list[str] | list[list[int]] = []
        tools_wire: list[dict[str, Any]] | None = None
        tool_names: frozenset[str] | None = None
        if chat:
            messages = chat_messages(body)
            tools, tool_choice = parse_tools(body)
            constraint = parse_chat_format(body, tools, tool_choice)
            params = parse_sampling(body, constraint=constraint)
            # Calls are read from free text only: a forced call is a call by construction,
            # and JSON under a response_format is the answer, not a call.
            if tool_choice is not None and (constraint is None
                                            or constraint.kind == "tool_call"):
                tool_names = frozenset(t.name for t in tools)
            if tool_choice is not None:
                tools_wire = [t.to_wire() for t in tools]
        else:
            params = parse_sampling(body, completion=True)
            prompts = completion_prompts(body)
        count = 1 if chat else len(prompts)
        worker = await self._pick_worker(timeouts, request.deadline, params.n * count)
        model = worker.models.get(offer.upstream_model, {})
        if not chat and "vocab" in model:
            check_token_ids(prompts, int(model["vocab"]), "prompt")
        events: asyncio.Queue[Event] = asyncio.Queue()
        wire = params.to_wire()
        # The routing names of a one-prompt request, which the worker ties to its KV blocks:
        # the router's when its ranking named the prompt, else made here from the same body.
        route = worker_route(request.model, body, request.prefix) if count == 1 else None
        if chat:
            calls = [worker.generate(offer.upstream_model, messages, None, wire, params.n,
                                     events=events, tools=tools_wire, route=route)]
        else:
            calls = [worker.generate(offer.upstream_model, None, prompt, wire, params.n,
                                     events=events, choice_offset=i * params.n, route=route)
                     for i, prompt in enumerate(list[Any](prompts))]
        return _TextCalls(worker, calls, events, params.n * count,
                          str(model.get("fingerprint", "fp_local")), chat, tool_names,
                          params.logprobs is not None)

    async def _next(self, events: asyncio.Queue[Event], timeout: float,
                    streamed: bool) -> Event:
        try:
            return await asyncio.wait_for(events.get(), timeout)
        except TimeoutError:
            if streamed:
                raise DeadlineExceeded("the request's deadline passed while generating",
                                       provider=self.name) from None
            raise UpstreamTimeout("the local worker made no first token in time",
                                  provider=self.name) from None

    def _gone(self, event: WorkerGone | StepFailed, streamed: bool) -> Exception:
        if isinstance(event, StepFailed) and not streamed:
            # The worker is fine, this step was not: another candidate (or a retry) may serve it.
            return UpstreamUnavailable(f"local worker could not serve this request: "
                                       f"{event.reason}", code="local_out_of_memory",
                                       provider=self.name)
        if streamed:
            return StreamBroken(f"local worker failed mid-stream: {event.reason}",
                                provider=self.name)
        return UpstreamUnavailable(f"local worker failed: {event.reason}",
                                   code="local_worker_failed", provider=self.name)

    @staticmethod
    def _first_timeout(request: InferenceRequest, timeouts: TimeoutsConfig) -> float:
        return max(0.0, min(timeouts.first_byte_ms / 1000.0, request.deadline - time.monotonic()))

    async def _text_events(self, request: InferenceRequest, timeouts: TimeoutsConfig,
                           text: _TextCalls, *, stream: bool
                           ) -> AsyncGenerator[TextDelta | Usage, None]:
        """The text deltas of every call, then their usage summed. Until the first delta the
        wait is bounded by `first_byte_ms`; after it, in a stream, a failure is a broken
        stream (never retried) rather than a retryable one."""
        waiting = len(text.calls)
        prompt_tokens = completion_tokens = cached_tokens = 0
        got_any = False
        try:
            while waiting:
                timeout = (self._first_timeout(request, timeouts) if not got_any
                           else max(0.0, request.deadline - time.monotonic()))
                event = await self._next(text.events, timeout, stream and got_any)
                if isinstance(event, TextDelta):
                    got_any = True
                    yield event
                elif isinstance(event, Finished):
                    waiting -= 1
                    prompt_tokens += event.prompt_tokens
                    completion_tokens += event.completion_tokens
                    cached_tokens += event.cached_tokens
                elif isinstance(event, Rejected):
                    raise InvalidRequest(event.message, param=event.param)
                elif isinstance(event, WorkerGone | StepFailed):
                    raise self._gone(event, stream and got_any)
            yield Usage(prompt_tokens, completion_tokens, cached_tokens=cached_tokens)
        finally:
            # Also reached on errors, aclose() and cancellation: the worker stops generating
            # for every call still running (calls that finished are already forgotten).
            for call in text.calls:
                text.worker.release(call, cancel=True)

    # ------------------------------------------------------------------ non-stream
    async def complete(self, request: InferenceRequest, offer: ModelOffer,
                       timeouts: TimeoutsConfig) -> Completion:
        if request.kind is RequestKind.EMBEDDING:
            return await self._embed(request, offer, timeouts)
        text = await self._open_text(request, offer, timeouts)
        chats = [ChatChoice(i, text.tool_names, text.logprobs) for i in range(text.choices)]
        completion_lps = [CompletionLogprobs() for _ in range(text.choices)]
        texts = [""] * text.choices
        finishes: list[str | None] = [None] * text.choices
        fired: list[str | None] = [None] * text.choices
        usage = Usage(0, 0)
        async with contextlib.aclosing(self._text_events(request, timeouts, text,
                                                         stream=False)) as events:
            async for event in events:
                if isinstance(event, Usage):
                    usage = event
                    continue
                i = event.choice
                if text.chat:
                    chats[i].feed(event.text, event.logprobs)
                    if event.finish is not None:
                        chats[i].end()
                else:
                    texts[i] += event.text
                    if event.logprobs is not None:
                        completion_lps[i].add(event.logprobs)
                if event.finish is not None:
                    finishes[i] = event.finish
                    fired[i] = event.stop_sequence
        if text.chat:
            body = _chat_body(offer, chats, finishes, fired, usage, text.fingerprint)
        else:
            body = _completion_body(offer, texts, completion_lps if text.logprobs else None,
                                    finishes, fired, usage, text.fingerprint)
        return Completion(body=body, usage=usage)

    async def _embed(self, request: InferenceRequest, offer: ModelOffer,
                     timeouts: TimeoutsConfig) -> Completion:
        inputs = embedding_inputs(request.body)
        worker = await self._pick_worker(timeouts, request.deadline, 0)
        model = worker.models.get(offer.upstream_model, {})
        options = parse_embedding_options(
            request.body, model=offer.model, width=model.get("dimensions"),
            matryoshka=offer.upstream_model in self._matryoshka)
        if "vocab" in model:
            check_token_ids(inputs, int(model["vocab"]), "input")
        call = worker.embed(offer.upstream_model, inputs)
        finished = False
        try:
            event = await self._next(call.events, self._first_timeout(request, timeouts), False)
            finished = True
        finally:
            worker.release(call, cancel=not finished)
        if isinstance(event, Rejected):
            raise InvalidRequest(event.message, param=event.param)
        if isinstance(event, WorkerGone):
            raise self._gone(event, streamed=False)
        if not isinstance(event, Embedded):
            raise UpstreamUnavailable("local worker sent an unexpected answer",
                                      provider=self.name)
        data = [
            {"object": "embedding", "index": i, "embedding": vector}
            for i, vector in enumerate(_vectors(event, len(inputs), options))
        ]
        usage = Usage(prompt_tokens=event.tokens, completion_tokens=0)
        body = {
            "object": "list", "data": data, "model": offer.model,
            "usage": {"prompt_tokens": event.tokens, "total_tokens": event.tokens},
        }
        return Completion(body=body, usage=usage)

    # ------------------------------------------------------------------ stream
    async def stream(self, request: InferenceRequest, offer: ModelOffer,
                     timeouts: TimeoutsConfig) -> AsyncIterator[StreamChunk]:
        text = await self._open_text(request, offer, timeouts)
        chat = request.kind is RequestKind.CHAT
        chunk_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        base = {"id": chunk_id, "object": obj, "created": created, "model": offer.model,
                "system_fingerprint": text.fingerprint}
        chats = [ChatChoice(i, text.tool_names, text.logprobs) for i in range(text.choices)]
        completion_lps = [CompletionLogprobs() for _ in range(text.choices)]
        started = [False] * text.choices
        async with contextlib.aclosing(self._text_events(request, timeouts, text,
                                                         stream=True)) as events:
            async for event in events:
                if isinstance(event, Usage):
                    yield StreamChunk({**base, "choices": [], "usage": event.to_openai()},
                                      usage=event)
                    return
                i = event.choice
                if chat:
                    for choice in _chat_stream_choices(chats[i], event):
                        yield StreamChunk({**base, "choices": [choice]})
                    continue
                if event.text or event.logprobs is not None or not started[i]:
                    logprobs = (completion_lps[i].add(event.logprobs)
                                if event.logprobs is not None else None)
                    started[i] = True
                    yield StreamChunk({**base, "choices": [{
                        "text": event.text, "index": i, "logprobs": logprobs,
                        "finish_reason": None}]})
                if event.finish is not None:
                    yield StreamChunk({**base, "choices": [{
                        "text": "", "index": i, "logprobs": None,
                        "finish_reason": event.finish, **_stop_reason(event.stop_sequence)}]})


@dataclass(frozen=True, slots=True)
class _TextCalls:
    """The worker calls of one text request, feeding one queue."""

    worker: WorkerProcess
    calls: list[Call]
    events: asyncio.Queue[Event]
    choices: int  # prompts x n
    fingerprint: str
    chat: bool
    tool_names: frozenset[str] | None  # set: tool calls are read from the text
    logprobs: bool


def _vectors(event: Embedded, count: int, options: EmbeddingOptions) -> list[Any]:
    """The worker's float32 rows (native byte order) as the client asked."""
    flat = array.array("f")
    flat.frombytes(event.vectors)
    dim = event.dim
    return encode_vectors([flat[i * dim:(i + 1) * dim] for i in range(count)], options)


def _chat_stream_choices(builder: ChatChoice, event: TextDelta) -> list[dict[str, Any]]:
    """Stream choices for one worker event of one chat choice (content, calls, finish)."""
    out: list[dict[str, Any]] = []
    text, calls, logprobs = builder.feed(event.text, event.logprobs)
    if event.finish is not None:
        more_text, more_calls = builder.end()
        text += more_text
        calls = calls + more_calls
    i = builder.index
    if text or logprobs is not None or not builder.started:
        delta: dict[str, Any] = {"content": text}
        if not builder.started:
            delta = {"role": "assistant", "content": text, "refusal": None}
        out.append({"index": i, "delta": delta,
                    "logprobs": {"content": logprobs, "refusal": None}
                    if logprobs is not None else None,
                    "finish_reason": None})
        builder.started = True
    if calls:
        out.append({"index": i, "delta": {"tool_calls": builder.call_deltas(calls)},
                    "logprobs": None, "finish_reason": None})
    if event.finish is not None:
        out.append({"index": i, "delta": {}, "logprobs": None,
                    "finish_reason": builder.finish_reason(event.finish),
                    **_stop_reason(event.stop_sequence)})
    return out


def _stop_reason(fired: str | None) -> dict[str, str]:
    """vLLM's `stop_reason` on a choice that a stop string ended: which one fired. The Anthropic
    adapter sets the same field and the Anthropic door reads it (`stop_sequence`); OpenAI's own
    shape is unchanged (`finish_reason` stays "stop", the field is absent otherwise)."""
    return {"stop_reason": fired} if fired is not None else {}


def _chat_body(offer: ModelOffer, chats: list[ChatChoice], finishes: list[str | None],
               fired: list[str | None], usage: Usage, fingerprint: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
        "created": int(time.time()), "model": offer.model, "system_fingerprint": fingerprint,
        "choices": [
            {"index": c.index, "message": c.message(), "logprobs": c.logprobs(),
             "finish_reason": c.finish_reason(finishes[c.index]), **_stop_reason(fired[c.index])}
            for c in chats
        ],
        "usage": usage.to_openai(),
    }


def _completion_body(offer: ModelOffer, texts: list[str],
                     logprobs: list[CompletionLogprobs] | None, finishes: list[str | None],
                     fired: list[str | None], usage: Usage, fingerprint: str) -> dict[str, Any]:
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
        "created": int(time.time()), "model": offer.model, "system_fingerprint": fingerprint,
        "choices": [
            {"text": text, "index": i,
             "logprobs": logprobs[i].whole if logprobs is not None else None,
             "finish_reason": finishes[i] or "stop", **_stop_reason(fired[i])}
            for i, text in enumerate(texts)
        ],
        "usage": usage.to_openai(),
    }
