"""Continuous batching over a causal LM with fixed KV slots (runs in the worker).

One `GenerationEngine` per chat model ties the engine room together:
- `kvcache.SlotCache`: the preallocated KV cache, a row of the batch is a slot;
- `scheduler.Scheduler`: who is admitted, which prefill chunk runs, which slots decode (pure);
- `prefix.PrefixStore`: KV of recently seen prompt prefixes, copied into a new row's slot;
- `sampler.sample`: every row's next token in one batched pass;
- `graphs.DecodeGraphs`: the decode step captured per batch bucket (CUDA only).

Every `step()`: admit waiting requests into free slots (a request with `n` choices takes `n`),
loading any held prefix of their prompt; run at most one prefill forward (chunks of the
prefilling prompts, `prefill_chunk` query positions in all) and one decode forward (one token
for every running row, each at its own length); sample; then one copy to the host (the sampled
ids) and the text/finish bookkeeping. A row that finishes frees its slot at once; a newcomer
joins at the next step; nobody else's cache is touched by either.

Memory: the slot cache (`max_batch` x `max_len` positions) and the prefix pool are allocated
at start, sized from free memory when the config leaves them open (`size_memory`), so the only
allocations a step makes are activations. An out-of-memory error inside a step fails only the
requests admitted or prefilling in that step (or, in a pure decode step, the newest running
one), frees the allocator's cache, and the engine goes on serving the rest.

Per row, on top of that (`sampler.py` chooses tokens and computes logprobs, `grammar.py` masks):
- a grammar matcher when the request constrains its output (JSON, a tool call): one bitmask per
  step over the rows that have one, and the row ends when its grammar is complete. A row with
  a matcher decodes from the step after its first token (its mask needs that token consumed);
- logprobs of each chosen token, only for the rows that ask (one more copy to the host in a
  step that has such rows), and for completions with `echo` those of the prompt: such a
  request is prefilled with every position's logits, chunk by chunk, and without prefix reuse
  (a reused prefix has no logits).
A row that uses none of these costs nothing for them.

Answers are the same alone and in any batch on the CPU in float32 (greedy and seeded: the
sampler's draws depend on the seed and the token number only); in bf16/fp16 on a GPU the batch
shape can change the rounding of the matmuls, so there batch independence is best-effort.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from meshnode.worker.grammar import GrammarError, Grammars
from meshnode.worker.graphs import DecodeGraphs
from meshnode.worker.kvcache import CacheShape, SlotCache, probe_shape
from meshnode.worker.params import SamplingParams
from meshnode.worker.prefix import DEFAULT_BLOCK, PrefixStore, Route, chain_hashes
from meshnode.worker.rates import StepRates
from meshnode.worker.sampler import TokenLogprob, prompt_logprobs, sample, token_logprobs
from meshnode.worker.scheduler import Plan, Scheduler, Sequence
from meshnode.worker.textstream import TextStream

log = logging.getLogger(__name__)

# The test hook for worker processes: after warm-up, the worker sets `inject_oom` from it.
INJECT_OOM_ENV = "MESHNODE_TEST_INJECT_OOM"


class RequestRejected(Exception):
    """The request cannot be served by this model (prompt too long ...): a 400 for the client."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """The engine's slice of the local provider config (0 / -1 = sized automatically)."""

    max_len: int = 0  # positions per slot; 0 = the model's context (capped by memory)
    prefill_chunk: int = 256  # query positions per prefill forward
    prefix_cache_mb: int = -1  # prefix pool; -1 = a quarter of the slot cache, 0 = off
    memory_fraction: float = 0.0  # of free memory for KV; 0 = 0.85 on CUDA, 0.25 of RAM on CPU
    cuda_graphs: bool = True


@dataclass(slots=True)
class _Row:
    request: _Request
    choice: int
    slot: int
    text: TextStream
    seed: int | None
    matcher: Any = None  # llguidance.LLMatcher when the output is constrained
    generated: int = 0
    length: int = 0  # positions of this row in its slot
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None


@dataclass(slots=True)
class _Request:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    sequence: Sequence
    matcher: Any = None  # compiled at submit; each row runs its own copy
    rows: list[_Row] = field(default_factory=list)
    open_rows: int = 0
    completion_tokens: int = 0
    cancelled: bool = False
    first_block: bytes | None = None  # the chained name of its prompt's first block
    route: Route | None = None  # its routing names, tied to its prompt's blocks once stored
    # echo + logprobs only: every prompt position's logits, by chunk start (a retried chunk
    # overwrites its own entry)
    prompt_logits: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.echo and self.params.logprobs is not None


@dataclass(frozen=True, slots=True)
class TextEvent:
    """New text for one choice; `finish` ("stop" | "length") on its last event, with
    `stop_sequence` set when one of the request's stop strings ended it. `logprobs`: one entry
    per token this event stands for, when the request asked for them (an echoed prompt's event
    carries the prompt's tokens)."""

    request_id: int
    choice: int
    text: str
    finish: str | None
    logprobs: tuple[TokenLogprob, ...] | None = None
    stop_sequence: str | None = None


@dataclass(frozen=True, slots=True)
class RequestDone:
    request_id: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix store


@dataclass(frozen=True, slots=True)
class RequestFailed:
    """The step serving this request ran out of memory (or failed otherwise): retryable."""

    request_id: int
    message: str


@dataclass(slots=True)
class StepResult:
    events: list[TextEvent] = field(default_factory=list)
    done: list[RequestDone] = field(default_factory=list)
    failed: list[RequestFailed] = field(default_factory=list)
    tokens: int = 0


def context_length(model: Any, tokenizer: Any) -> int:
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10**7:
        return limit
    return 2048


def stop_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """End-of-sequence ids from the generation config (a model may list several)."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        return frozenset()
    if isinstance(eos, int):
        return frozenset({eos})
    return frozenset(int(e) for e in eos)


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 4 << 30


def size_memory(shape: CacheShape, context: int, max_batch: int, options: EngineOptions,
                device: torch.device) -> tuple[int, int, int]:
    """(max_batch, max_len, prefix pool blocks) for the memory at hand.

    The budget is `memory_fraction` of free memory (after the weights are loaded): 0.85 on
    CUDA, 0.25 of available RAM on the CPU (the box is shared with the node and others). Slots
    keep the configured length (the model's context by default) and the count shrinks to fit
    (at least 1, at most the configured `max_batch`); the prefix pool gets a quarter of the
    slot cache's size unless `prefix_cache_mb` says otherwise, within the same budget."""
    fraction = options.memory_fraction or (0.85 if device.type == "cuda" else 0.25)
    budget = int(free_memory_bytes(device) * fraction)
    per_token = shape.bytes_per_token()
    max_len = min(context, options.max_len) if options.max_len > 0 else context
    prefix_share = 0.2 if options.prefix_cache_mb < 0 else 0.0
    slots_budget = int(budget * (1 - prefix_share))
    if options.prefix_cache_mb > 0:
        slots_budget -= options.prefix_cache_mb << 20
    fit = max(1, slots_budget // max(1, per_token * max_len))
    if fit < max_batch:
        log.warning("KV memory fits %d slots of %d positions, not %d: serving %d at a time",
                    fit, max_len, max_batch, fit)
        max_batch = fit
    slot_bytes = per_token * max_len * max_batch
    if options.prefix_cache_mb < 0:
        pool_bytes = min(slot_bytes // 4, max(0, budget - slot_bytes))
    else:
        pool_bytes = options.prefix_cache_mb << 20
    blocks = pool_bytes // (per_token * DEFAULT_BLOCK)
    return max_batch, max_len, int(blocks)


class GenerationEngine:
    def __init__(self, model: Any, tokenizer: Any, device: torch.device, max_batch: int,
                 options: EngineOptions | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.options = options or EngineOptions()
        self.eos_ids = stop_token_ids(model, tokenizer)
        self._pad_id = int(
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None
            else (next(iter(self.eos_ids)) if self.eos_ids else 0)
        )
        params = inspect.signature(model.forward).parameters
        # transformers 5 renamed `past_key_values` to `cache`; take what this version has.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keeps_logits = "logits_to_keep" in params
        attn = getattr(model.config, "_attn_implementation", "sdpa")
        if attn not in ("sdpa", "eager") and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("sdpa")  # a 4-D per-row mask needs sdpa or eager
            attn = "sdpa"
        self._dtype = next(model.parameters()).dtype
        output = model.get_output_embeddings()
        vocab = int(output.weight.shape[0]) if output is not None else int(
            model.config.vocab_size)
        self.grammars = Grammars(tokenizer, vocab, self.eos_ids)
        self._grammar_eos: frozenset[int] = frozenset()
        shape = probe_shape(model, self._cache_kw, device)
        self.max_batch, max_len, blocks = size_memory(
            shape, context_length(model, tokenizer), max_batch, self.options, device)
        self.context = max_len  # what a slot holds is what this engine serves
        self.cache = SlotCache(shape, self.max_batch, max_len, device, bool_mask=attn == "sdpa")
        self.prefix = PrefixStore(self.cache, blocks)
        self.scheduler = Scheduler(self.max_batch, max(1, self.options.prefill_chunk))
        self.graphs: DecodeGraphs | None = None
        self._empty: list[_Request] = []  # max_tokens 0 without echo: no forward pass
        self._requests: dict[int, _Request] = {}
        self._by_slot: dict[int, _Row] = {}
        self._next_input = torch.full((self.max_batch,), self._pad_id, dtype=torch.long,
                                      device=device)
        self.prefilled_tokens = 0  # prompt positions computed (not reused): for tests, bench
        self.rates = StepRates()  # measured prefill and decode speed (heartbeats, cache_aware)
        self.inject_oom = 0  # test hook: this many next steps raise torch.OutOfMemoryError
        log.info("engine: %d slots x %d positions (%.0f MB KV), prefix pool %d blocks "
                 "(%.0f MB), prefill chunk %d", self.max_batch, max_len, self.cache.size_bytes / 1e6,
                 blocks, self.prefix.size_bytes / 1e6, self.scheduler.chunk_tokens)

    def prepare(self) -> None:
        """Capture the decode graphs (CUDA, when enabled); a no-op on the CPU."""
        if self.device.type == "cuda" and self.options.cuda_graphs and self.graphs is None:
            graphs = DecodeGraphs(self.model, self.cache, self._cache_kw, self._dtype)
            if graphs.capture():
                self.graphs = graphs

    # ------------------------------------------------------------------ requests
    def submit(self, request_id: int, prompt_ids: list[int], params: SamplingParams,
               route: Route | None = None) -> None:
        prompt_len = len(prompt_ids)
        if prompt_len == 0:
            raise RequestRejected("the prompt is empty", "messages")
        if prompt_len >= self.context:
            raise RequestRejected(
                f"the prompt has {prompt_len} tokens; this model's context is {self.context}",
                "messages",
            )
        if params.n > self.max_batch:
            raise RequestRejected(
                f"n={params.n} choices need {params.n} slots; this worker has {self.max_batch}",
                "n",
            )
        room = self.context - prompt_len
        if params.max_tokens is None:
            max_tokens = room
        elif params.max_tokens > room:
            raise RequestRejected(
                f"max_tokens {params.max_tokens} + prompt {prompt_len} tokens exceeds this "
                f"model's context of {self.context}",
                "max_tokens",
            )
        else:
            max_tokens = params.max_tokens
        matcher = None
        if params.constraint is not None:
            try:
                matcher = self.grammars.compile(params.constraint)
            except GrammarError as exc:
                raise RequestRejected(exc.message, exc.param) from None
            self._grammar_eos = self.grammars.stop_ids()
        sequence = Sequence(request_id, prompt_len, params.n)
        request = _Request(request_id, list(prompt_ids), params, max_tokens, sequence, matcher,
                           route=route)
        if max_tokens == 0 and not params.echo:
            # A legacy completion's `max_tokens: 0`: nothing to generate or show, finished at
            # the next step without a slot.
            self._empty.append(request)
            return
        names = chain_hashes(request.prompt_ids[:self.prefix.block], self.prefix.block)
        request.first_block = names[0] if names and prompt_len > self.prefix.block else None
        self._requests[request_id] = request
        self.scheduler.add(sequence)

    def cancel(self, request_id: int) -> None:
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        request.cancelled = True
        self._drop(request, "cancelled")

    def _drop(self, request: _Request, finish: str) -> None:
        open_slots = []
        for row in request.rows:
            if row.finish is None:
                row.finish = finish
                open_slots.append(row.slot)
                self._by_slot.pop(row.slot, None)
        if not request.rows:  # still prefilling: its slots hold no rows yet
            open_slots = list(request.sequence.slots)
        self.scheduler.drop(request.sequence, open_slots)

    def has_work(self) -> bool:
        s = self.scheduler
        return bool(s.waiting or s.prefilling or s.decoding or self._empty)

    @property
    def active_rows(self) -> int:
        return self.max_batch - self.scheduler.free_slots

    @property
    def queued(self) -> int:
        return sum(s.n for s in self.scheduler.waiting)

    def abort_all(self, message: str) -> list[RequestFailed]:
        """Fail every admitted request (the worker calls this when a step raised something
        unexpected); waiting ones stay queued."""
        failed = []
        for request in list(self._requests.values()):
            if request.sequence.slots:
                self._requests.pop(request.request_id, None)
                self._drop(request, "failed")
                failed.append(RequestFailed(request.request_id, message))
        return failed

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self) -> StepResult:
        result = StepResult()
        empty, self._empty = self._empty, []
        for request in empty:
            for choice in range(request.params.n):
                result.events.append(TextEvent(request.request_id, choice, "", "length"))
            result.done.append(RequestDone(request.request_id, len(request.prompt_ids), 0))
        admitted = self.scheduler.admit(self._ready)
        for sequence in admitted:
            request = self._requests[sequence.key]
            if request.wants_prompt_logprobs:
                continue  # every prompt position's logits are wanted: nothing to reuse
            covered, blocks = self.prefix.match(request.prompt_ids)
            if covered:
                self.prefix.load(sequence.slots[0], blocks)
            sequence.computed = sequence.cached = covered
        plan = self.scheduler.plan()
        try:
            if self.inject_oom > 0:
                self.inject_oom -= 1
                raise torch.OutOfMemoryError("injected out-of-memory (test hook)")
            started = time.perf_counter()
            firsts, drew, host, entries = self._forward(plan)
            seconds = time.perf_counter() - started  # to the step's one host sync
        except torch.OutOfMemoryError as exc:
            self._out_of_memory(plan, admitted, exc, result)
            return result
        self.rates.record(sum(c.end - c.start for c in plan.chunks), len(drew) > len(firsts),
                          seconds)
        self._emit_step(plan, firsts, drew, host, entries, result)
        return result

    def _ready(self, sequence: Sequence) -> bool:
        """False while another request is prefilling the same first prompt block and the store
        does not hold it yet: this one waits that one prefill and then reuses its prefix
        (sixteen chats with one system prompt arriving together compute it once)."""
        request = self._requests[sequence.key]
        name = request.first_block
        if name is None or request.wants_prompt_logprobs or self.prefix.capacity == 0:
            return True
        if self.prefix.holds(name):
            return True
        for other in self.scheduler.prefilling:
            other_request = self._requests.get(other.key)
            if other_request is not None and other_request.first_block == name:
                return False
        return True

    def _forward(self, plan: Plan) -> tuple[list[_Row], list[_Row], list[int],
                                            dict[int, TokenLogprob]]:
        """Run the plan's forwards and sampling. Returns the rows that got their first token,
        every row that drew a token (firsts, then decode rows), the drawn ids (after the step's
        one host sync) and the logprob entries by position in that list."""
        parts: list[torch.Tensor] = []
        firsts: list[_Row] = []
        entries: dict[int, TokenLogprob] = {}
        if plan.chunks:
            logits = self._prefill(plan)
            rows_logits: list[torch.Tensor] = []
            for i, chunk in enumerate(plan.chunks):
                if not chunk.last:
                    continue
                rows = self._start_rows(self._requests[chunk.sequence.key])
                firsts.extend(rows)
                rows_logits.append(logits[i:i + 1].expand(len(rows), -1))
            if firsts:
                tokens, drawn = self._choose(torch.cat(rows_logits), firsts, [0] * len(firsts))
                entries.update(drawn)
                slots = torch.tensor([r.slot for r in firsts], dtype=torch.long,
                                     device=self.device)
                self._next_input[slots] = tokens
                parts.append(tokens)
        # A fresh row decodes in this step too, unless its grammar must first see its first
        # token or it wants no second one.
        fresh = [r for r in firsts if r.matcher is None and r.request.max_tokens > 1]
        decoding = [self._by_slot[s] for s in plan.decode if s in self._by_slot] + fresh
        decoding.sort(key=lambda r: r.slot)
        if decoding:
            fresh_ids = {id(r) for r in fresh}
            counters = [r.generated + (1 if id(r) in fresh_ids else 0) for r in decoding]
            tokens, drawn = self._decode(decoding, counters)
            entries.update({len(firsts) + i: e for i, e in drawn.items()})
            parts.append(tokens)
        host: list[int] = torch.cat(parts).tolist() if parts else []
        if decoding:
            # The next input of the rows that decoded, only once the step cannot fail any more
            # (a failed step is planned again with the inputs it had).
            index = torch.tensor([r.slot for r in decoding], dtype=torch.long,
                                 device=self.device)
            self._next_input[index] = parts[-1]
        return firsts, firsts + decoding, host, entries

    def _start_rows(self, request: _Request) -> list[_Row]:
        """The request's rows once its prompt is in its first slot (copied to the others)."""
        sequence = request.sequence
        if request.rows:
            return request.rows  # a retried step: the rows exist already
        for choice, slot in enumerate(sequence.slots):
            if choice > 0:
                self.cache.copy_slot(sequence.slots[0], slot, sequence.prompt_len)
            seed = request.params.seed
            row_seed = (seed + choice) % (2**63) if seed is not None else None
            matcher = request.matcher
            if matcher is not None and request.params.n > 1:
                matcher = matcher.deep_copy()
            row = _Row(request, choice, slot, TextStream(
                self.tokenizer, request.prompt_ids, request.params.stop), row_seed, matcher,
                length=sequence.prompt_len)
            request.rows.append(row)
        return request.rows

    def _prefill(self, plan: Plan) -> torch.Tensor:
        """One forward over this step's chunks (left-padded to the widest); the logits of each
        chunk's last position, [chunks, vocab]. Requests that want their prompt's logprobs
        keep every position's logits of each chunk."""
        width = plan.width
        scratch = self.cache.scratch
        ids, write, real = [], [], []
        kv_len = 0
        for chunk in plan.chunks:
            request = self._requests[chunk.sequence.key]
            size = chunk.end - chunk.start
            pad = width - size
            ids.append([self._pad_id] * pad + request.prompt_ids[chunk.start:chunk.end])
            # Padding writes this row's future positions (rewritten before anyone reads them).
            write.append([min(chunk.end + j, scratch) for j in range(pad)]
                         + list(range(chunk.start, chunk.end)))
            real.append([False] * pad + [True] * size)
            kv_len = max(kv_len, chunk.end)
        dev = self.device
        ids_t = torch.tensor(ids, dtype=torch.long, device=dev)
        write_t = torch.tensor(write, dtype=torch.long, device=dev)
        real_t = torch.tensor(real, dtype=torch.bool, device=dev)
        first_slots = [c.sequence.slots[0] for c in plan.chunks]
        slots = torch.tensor(first_slots, dtype=torch.long, device=dev)
        consecutive = first_slots == list(range(first_slots[0], first_slots[0] + len(first_slots)))
        self.cache.plan_prefill(slots, write_t, kv_len,
                                (first_slots[0], first_slots[-1] + 1) if consecutive else None)
        mask = self.cache.prefill_mask(write_t, real_t, kv_len, self._dtype)
        all_logits = any(self._requests[c.sequence.key].wants_prompt_logprobs
                         for c in plan.chunks)
        extra: dict[str, Any] = {self._cache_kw: self.cache}
        if self._keeps_logits and not all_logits:
            extra["logits_to_keep"] = 1
        out = self.model(input_ids=ids_t, attention_mask=mask, position_ids=write_t,
                         use_cache=True, **extra)
        if all_logits:
            for i, chunk in enumerate(plan.chunks):
                request = self._requests[chunk.sequence.key]
                if request.wants_prompt_logprobs:
                    pad = width - (chunk.end - chunk.start)
                    request.prompt_logits[chunk.start] = out.logits[i, pad:].float().clone()
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def _decode(self, rows: list[_Row], counters: list[int]
                ) -> tuple[torch.Tensor, dict[int, TokenLogprob]]:
        """One token for every running row; the batch is slots 0 .. the highest running one
        (free slots in between are padding rows)."""
        width = rows[-1].slot + 1
        scratch = self.cache.scratch
        positions = [0] * width
        write = [scratch] * width
        seen = [1] * width
        for row in rows:
            positions[row.slot] = row.length
            write[row.slot] = row.length
            seen[row.slot] = row.length + 1
        dev = self.device
        positions_t = torch.tensor(positions, dtype=torch.long, device=dev)
        write_t = torch.tensor(write, dtype=torch.long, device=dev)
        seen_t = torch.tensor(seen, dtype=torch.long, device=dev)
        ids = self._next_input[:width, None]
        bucket = self.graphs.bucket(width, max(seen)) if self.graphs is not None else None
        if self.graphs is not None and bucket is not None:
            logits = self.graphs.run(bucket, ids, positions_t[:, None], write_t, seen_t)
        else:
            # Eager: attention reads only as far as the longest row (rounded, fewer shapes).
            kv_len = min(self.cache.max_len, -(-(max(seen) + 1) // 64) * 64)
            self.cache.plan_decode(width, write_t, kv_len)
            mask = self.cache.decode_mask(seen_t, kv_len, self._dtype)
            extra: dict[str, Any] = {self._cache_kw: self.cache}
            if self._keeps_logits:
                extra["logits_to_keep"] = 1
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions_t[:, None],
                             use_cache=True, **extra)
            logits = out.logits[:, -1, :]
        index = torch.tensor([r.slot for r in rows], dtype=torch.long, device=dev)
        if len(rows) < width:
            logits = logits.index_select(0, index)
        elif self.graphs is not None:
            logits = logits.clone()  # the graph's output buffer: masks must not write into it
        return self._choose(logits, rows, counters)

    def _choose(self, logits: torch.Tensor, rows: list[_Row], counters: list[int]
                ) -> tuple[torch.Tensor, dict[int, TokenLogprob]]:
        """Each row's next token (grammar masks first, for the rows that have one), and the
        logprobs of the rows that asked, by index in `rows`. `counters`: each row's draw
        number (tokens it drew before), what makes a seeded draw repeatable."""
        logits = logits.float()
        masked = [i for i, row in enumerate(rows) if row.matcher is not None]
        if masked:
            self.grammars.apply_masks(logits, masked, [rows[i].matcher for i in masked])
        temps = [row.request.params.temperature for row in rows]
        top_ps = [row.request.params.top_p for row in rows]
        tokens = sample(logits, temps, top_ps, [row.seed for row in rows], counters)
        wanted = [i for i, row in enumerate(rows) if row.request.params.logprobs is not None]
        if not wanted:
            return tokens, {}
        drawn = token_logprobs(
            logits, tokens, wanted, [temps[i] for i in wanted], [top_ps[i] for i in wanted],
            [rows[i].request.params.logprobs or 0 for i in wanted])
        return tokens, dict(zip(wanted, drawn, strict=True))

    # ------------------------------------------------------------------ after the sync
    def _emit_step(self, plan: Plan, firsts: list[_Row], drew: list[_Row], host: list[int],
                   entries: dict[int, TokenLogprob], result: StepResult) -> None:
        for chunk in plan.chunks:
            self.scheduler.advance(chunk)
            self.prefilled_tokens += chunk.end - chunk.start
        echoed: set[int] = set()
        for row in firsts:
            self._by_slot[row.slot] = row
            request = row.request
            request.open_rows = len(request.rows)
            if row.choice == 0:  # its prompt's blocks, for the next prompt that starts alike
                self.prefix.store(request.prompt_ids, row.slot, request.route)
            if request.params.echo and request.request_id not in echoed:
                echoed.add(request.request_id)
                self._echo(request, result)
        for i, (row, token) in enumerate(zip(drew, host, strict=True)):
            self._emit(row, token, entries.get(i), result)

    def _echo(self, request: _Request, result: StepResult) -> None:
        """The prompt first, for completions with `echo` (with its logprobs when asked)."""
        logprobs = None
        if request.wants_prompt_logprobs and request.prompt_logits:
            logits = torch.cat([request.prompt_logits[k] for k in sorted(request.prompt_logits)])
            logprobs = tuple(prompt_logprobs(logits, request.prompt_ids,
                                             request.params.logprobs or 0))
            request.prompt_logits.clear()
        text = self.tokenizer.decode(request.prompt_ids, skip_special_tokens=True)
        for row in request.rows:
            result.events.append(TextEvent(request.request_id, row.choice, text, None, logprobs))

    def _emit(self, row: _Row, token: int, entry: TokenLogprob | None,
              result: StepResult) -> None:
        if row.finish is not None:
            return  # cancelled while this step ran, or ended on its first token
        request = row.request
        if request.max_tokens == 0:
            # Echo only (completions scoring a prompt): the sampled token is not kept.
            result.events.append(TextEvent(request.request_id, row.choice, "", "length"))
            self._leave(row, "length", result)
            return
        row.generated += 1
        row.tokens.append(token)
        row.length = request.sequence.prompt_len + row.generated - 1
        request.completion_tokens += 1
        result.tokens += 1
        finish: str | None = None
        matcher = row.matcher
        accepted = matcher.consume_token(token) if matcher is not None else True
        if token in self.eos_ids or (matcher is not None and token in self._grammar_eos):
            text = row.text.flush()
            finish = "stop"
            entry = None  # the end token is not part of the text
        else:
            text = row.text.push(token)
            if row.text.stopped:
                finish = "stop"
            elif matcher is not None and (matcher.is_stopped() or not accepted):
                if not accepted:
                    log.warning("grammar refused a masked token: %s", matcher.get_error())
                text += row.text.flush()
                finish = "stop"
            elif row.generated >= request.max_tokens:
                text += row.text.flush()
                finish = "length"
        if text or finish or entry is not None:
            result.events.append(TextEvent(request.request_id, row.choice, text, finish,
                                           (entry,) if entry is not None else None,
                                           row.text.stop_sequence))
        if finish is not None:
            self._leave(row, finish, result)

    def _leave(self, row: _Row, finish: str, result: StepResult) -> None:
        request = row.request
        row.finish = finish
        # What this row's slot holds (prompt + all but the last token) may start a later
        # prompt (the next turn of a chat): keep its full blocks before the slot is reused.
        self.prefix.store(request.prompt_ids + row.tokens[:-1], row.slot)
        self._by_slot.pop(row.slot, None)
        self.scheduler.release(row.slot)
        request.open_rows -= 1
        if request.open_rows == 0:
            self._requests.pop(request.request_id, None)
            result.done.append(RequestDone(
                request.request_id, len(request.prompt_ids), request.completion_tokens,
                request.sequence.cached))

    # ------------------------------------------------------------------ out of memory
    def _out_of_memory(self, plan: Plan, admitted: list[Sequence], exc: BaseException,
                       result: StepResult) -> None:
        """Fail the requests this step brought in (admitted, or prefilling in it); in a pure
        decode step, the newest running request. Everything else is retried next step."""
        keys = {s.key for s in admitted} | {c.sequence.key for c in plan.chunks}
        if not keys and self._by_slot:
            keys = {max(self._by_slot.values(), key=lambda r: r.request.request_id)
                    .request.request_id}
        log.warning("out of memory in a step (%s): failing %d request(s)", exc, len(keys))
        message = "the local worker ran out of memory for this request; try again"
        for key in keys:
            request = self._requests.pop(key, None)
            if request is None:
                continue
            self._drop(request, "failed")
            result.failed.append(RequestFailed(key, message))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ reporting
    def prefix_summary(self, limit: int = 256) -> list[str]:
        return self.prefix.summary(limit)

    def routed_names(self, limit: int) -> list[bytes]:
        """The routing names of the prompts whose blocks the prefix store still holds, most
        recent first (what the node gossips for cache-aware routing)."""
        return self.prefix.routes.names(limit)


class ThroughputMeter:
    """Tokens per second, exponentially weighted over ~seconds (reported in heartbeats)."""

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.value = 0.0
        self._tokens = 0
        self._since = time.monotonic()

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def sample(self) -> float:
        now = time.monotonic()
        elapsed = now - self._since
        if elapsed <= 0:
            return self.value
        rate = self._tokens / elapsed
        self.value = rate if self.value == 0.0 else self.alpha * rate + (1 - self.alpha) * self.value
        self._tokens = 0
        self._since = now
        return self.value
