"""Continuous batching over a causal LM's forward pass with a KV cache (runs in the worker).

One `GenerationEngine` per chat model. Every `step()`:
1. admits waiting requests while slots are free (a request with `n` choices takes `n` slots),
   prefills their prompts together (left-padded) and samples each new row's first token;
2. merges the new rows into the running batch: all rows share one KV timeline, right-aligned,
   each row's own tokens marked in a 2-D attention mask and numbered by its own position ids;
3. runs one decode step for every running row and samples the next token per row;
4. drops finished rows (`index_select` on the batch dimension) and trims leading columns that
   no row uses any more.

So a new request joins at the next step and a finished one leaves at once, without waiting for
the rest of the batch. The cache is transformers' `DynamicCache`, whose per-layer tensors this
module edits directly; that works for any model whose layers are plain `DynamicLayer`s (GPT-2,
Llama, Qwen, Mistral without sliding window ...).

Per row, on top of that (`sampler.py` chooses tokens, `grammar.py` masks them):
- sampling: temperature (0 = greedy), top_p, an own `torch.Generator` when the request gave a
  seed (choice i uses seed + i), so a seeded answer does not depend on what else is in the batch;
- a grammar matcher when the request constrains its output (JSON, a tool call): one bitmask per
  step over the rows that have one, and the row ends when its grammar is complete;
- logprobs of each chosen token (and, for completions with `echo`, of the prompt), computed
  only for the rows that ask, in one batched pass.
A row that uses none of these costs what it did before: no mask, no extra copy to the host.
Prefill keeps only the last position's logits (`logits_to_keep=1`), except for requests that
want their prompt's logprobs, which are prefilled in a pass of their own with all of them.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from meshnode.worker.grammar import GrammarError, Grammars
from meshnode.worker.params import SamplingParams
from meshnode.worker.sampler import TokenLogprob, prompt_logprobs, sample, token_logprobs
from meshnode.worker.textstream import TextStream

log = logging.getLogger(__name__)


class RequestRejected(Exception):
    """The request cannot be served by this model (prompt too long ...): a 400 for the client."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(slots=True)
class _Row:
    request: _Request
    choice: int
    text: TextStream
    generator: torch.Generator | None
    matcher: Any = None  # llguidance.LLMatcher when the output is constrained
    generated: int = 0
    finish: str | None = None


@dataclass(slots=True)
class _Request:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    matcher: Any = None  # compiled at submit; each row runs its own copy
    rows: list[_Row] = field(default_factory=list)
    open_rows: int = 0
    completion_tokens: int = 0
    cancelled: bool = False

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.echo and self.params.logprobs is not None


@dataclass(frozen=True, slots=True)
class TextEvent:
    """New text for one choice; `finish` ("stop" | "length") on its last event. `logprobs`:
    one entry per token this event stands for, when the request asked for them (an echoed
    prompt's event carries the prompt's tokens)."""

    request_id: int
    choice: int
    text: str
    finish: str | None
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True, slots=True)
class RequestDone:
    request_id: int
    prompt_tokens: int
    completion_tokens: int


@dataclass(slots=True)
class StepResult:
    events: list[TextEvent] = field(default_factory=list)
    done: list[RequestDone] = field(default_factory=list)
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


class GenerationEngine:
    def __init__(self, model: Any, tokenizer: Any, device: torch.device, max_batch: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_batch = max_batch
        self.context = context_length(model, tokenizer)
        self.eos_ids = stop_token_ids(model, tokenizer)
        self._pad_id = int(
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None
            else (next(iter(self.eos_ids)) if self.eos_ids else 0)
        )
        params = inspect.signature(model.forward).parameters
        # transformers 5 renamed `past_key_values` to `cache`; take what this version has.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keeps_logits = "logits_to_keep" in params
        output = model.get_output_embeddings()
        vocab = int(output.weight.shape[0]) if output is not None else int(
            model.config.vocab_size)
        self.grammars = Grammars(tokenizer, vocab, self.eos_ids)
        self._grammar_eos: frozenset[int] = frozenset()
        self._waiting: deque[_Request] = deque()
        self._empty: list[_Request] = []  # max_tokens 0: answered without a forward pass
        self._requests: dict[int, _Request] = {}
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # [rows, T] 1 where the row has a token
        self._pending: torch.Tensor | None = None  # [rows] next input token per row

    # ------------------------------------------------------------------ requests
    def submit(self, request_id: int, prompt_ids: list[int], params: SamplingParams) -> None:
        prompt_len = len(prompt_ids)
        if prompt_len == 0:
            raise RequestRejected("the prompt is empty", "messages")
        if prompt_len >= self.context:
            raise RequestRejected(
                f"the prompt has {prompt_len} tokens; this model's context is {self.context}",
                "messages",
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
        request = _Request(request_id, list(prompt_ids), params, max_tokens, matcher)
        if max_tokens == 0 and not params.echo:
            # A legacy completion's `max_tokens: 0` without echo: nothing to generate or to
            # read, finished at the next step with no forward pass. With echo it is prefilled
            # like any request (its prompt's logprobs need the logits) and ends there.
            self._empty.append(request)
            return
        self._requests[request_id] = request
        self._waiting.append(request)

    def cancel(self, request_id: int) -> None:
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        request.cancelled = True
        if request in self._waiting:
            self._waiting.remove(request)
        for row in request.rows:
            row.finish = row.finish or "cancelled"

    def has_work(self) -> bool:
        return bool(self._waiting or self._rows or self._empty)

    @property
    def active_rows(self) -> int:
        return len(self._rows)

    @property
    def queued(self) -> int:
        return sum(r.params.n for r in self._waiting)

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self) -> StepResult:
        result = StepResult()
        empty, self._empty = self._empty, []
        for request in empty:
            for choice in range(request.params.n):
                result.events.append(TextEvent(request.request_id, choice, "", "length"))
            result.done.append(RequestDone(request.request_id, len(request.prompt_ids), 0))
        admitted = self._admit()
        if admitted:
            self._prefill(admitted, result)
        self._drop_finished()
        if self._rows:
            self._decode(result)
            self._drop_finished()
        return result

    def _admit(self) -> list[_Request]:
        admitted: list[_Request] = []
        used = len(self._rows)
        while self._waiting:
            n = self._waiting[0].params.n
            # An oversized request still runs alone rather than waiting forever.
            if used + n > self.max_batch and (used > 0 or admitted):
                break
            admitted.append(self._waiting.popleft())
            used += n
        return admitted

    def _prefill(self, admitted: list[_Request], result: StepResult) -> None:
        # Prompt logprobs need every position's logits: those requests get a pass of their own,
        # so the others keep the cheap last-position prefill (and bit-identical answers).
        full = [r for r in admitted if r.wants_prompt_logprobs]
        if full:
            self._prefill_group(full, result, all_logits=True)
        rest = [r for r in admitted if not r.wants_prompt_logprobs]
        if rest:
            self._prefill_group(rest, result, all_logits=False)

    def _prefill_group(self, admitted: list[_Request], result: StepResult,
                       all_logits: bool) -> None:
        rows: list[_Row] = []
        prompts: list[list[int]] = []
        for request in admitted:
            for choice in range(request.params.n):
                generator = None
                if request.params.seed is not None:
                    generator = torch.Generator(device=self.device)
                    generator.manual_seed((request.params.seed + choice) % (2**63))
                matcher = request.matcher
                if matcher is not None and request.params.n > 1:
                    matcher = matcher.deep_copy()
                row = _Row(request, choice, TextStream(
                    self.tokenizer, request.prompt_ids, request.params.stop), generator,
                    matcher)
                request.rows.append(row)
                rows.append(row)
                prompts.append(request.prompt_ids)
            request.open_rows = request.params.n
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt):] = 1
        ids = ids.to(self.device)
        mask = mask.to(self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        from transformers import DynamicCache

        cache = DynamicCache()
        extra: dict[str, Any] = {self._cache_kw: cache}
        if self._keeps_logits and not all_logits:
            extra["logits_to_keep"] = 1
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra,
        )
        self._echo(rows, out.logits if all_logits else None, width, result)
        next_tokens, logprobs = self._next_tokens(out.logits[:, -1, :], rows)
        self._merge(rows, cache, mask, next_tokens)
        self._emit(rows, next_tokens.tolist(), result, logprobs)

    def _echo(self, rows: list[_Row], logits: torch.Tensor | None, width: int,
              result: StepResult) -> None:
        """The prompt first, for completions with `echo` (with its logprobs when asked)."""
        done: dict[int, tuple[str, tuple[TokenLogprob, ...] | None]] = {}
        for i, row in enumerate(rows):
            request = row.request
            if not request.params.echo:
                continue
            if request.request_id not in done:
                entries = None
                if logits is not None and request.params.logprobs is not None:
                    start = width - len(request.prompt_ids)
                    entries = tuple(prompt_logprobs(logits[i, start:], request.prompt_ids,
                                                    request.params.logprobs))
                text = self.tokenizer.decode(request.prompt_ids, skip_special_tokens=True)
                done[request.request_id] = (text, entries)
            text, entries = done[request.request_id]
            result.events.append(TextEvent(request.request_id, row.choice, text, None, entries))

    def _decode(self, result: StepResult) -> None:
        assert self._mask is not None and self._pending is not None
        positions = self._mask.sum(1, keepdim=True)
        ones = torch.ones((len(self._rows), 1), dtype=self._mask.dtype, device=self.device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        out = self.model(
            input_ids=self._pending[:, None], attention_mask=self._mask, position_ids=positions,
            use_cache=True, **{self._cache_kw: self._cache},
        )
        next_tokens, logprobs = self._next_tokens(out.logits[:, -1, :], self._rows)
        self._pending = next_tokens
        self._emit(self._rows, next_tokens.tolist(), result, logprobs)

    # ------------------------------------------------------------------ cache surgery
    def _layers(self, cache: Any) -> list[Any]:
        return [layer for layer in cache.layers if getattr(layer, "is_initialized", True)]

    def _merge(self, rows: list[_Row], cache: Any, mask: torch.Tensor,
               next_tokens: torch.Tensor) -> None:
        if self._cache is None or not self._rows:
            self._rows = rows
            self._cache = cache
            self._mask = mask
            self._pending = next_tokens
            return
        assert self._mask is not None and self._pending is not None
        old_t = self._mask.shape[1]
        new_t = mask.shape[1]
        width = max(old_t, new_t)
        for old_layer, new_layer in zip(self._layers(self._cache), self._layers(cache),
                                        strict=True):
            old_layer.keys = torch.cat(
                [_left_pad(old_layer.keys, width), _left_pad(new_layer.keys, width)], dim=0)
            old_layer.values = torch.cat(
                [_left_pad(old_layer.values, width), _left_pad(new_layer.values, width)], dim=0)
        self._mask = torch.cat([_left_pad_mask(self._mask, width),
                                _left_pad_mask(mask, width)], dim=0)
        self._pending = torch.cat([self._pending, next_tokens], dim=0)
        self._rows = self._rows + rows

    def _drop_finished(self) -> None:
        if not self._rows:
            return
        keep = [i for i, row in enumerate(self._rows) if row.finish is None]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows = []
            self._cache = None
            self._mask = None
            self._pending = None
            return
        assert self._mask is not None and self._pending is not None
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self._mask.index_select(0, index)
        used = (mask.sum(0) > 0).nonzero()
        start = int(used[0]) if used.numel() else 0
        for layer in self._layers(self._cache):
            layer.keys = layer.keys.index_select(0, index)[:, :, start:, :]
            layer.values = layer.values.index_select(0, index)[:, :, start:, :]
        self._mask = mask[:, start:]
        self._pending = self._pending.index_select(0, index)
        self._rows = [self._rows[i] for i in keep]

    # ------------------------------------------------------------------ sampling
    def _next_tokens(self, logits: torch.Tensor, rows: list[_Row]
                     ) -> tuple[torch.Tensor, dict[int, TokenLogprob] | None]:
        """Each row's next token, and the logprobs of the rows that asked (by batch index)."""
        logits = logits.float()
        temps: list[float] = []
        top_ps: list[float] = []
        generators: list[torch.Generator | None] = []
        masked: list[int] = []
        wanted: list[int] = []
        for i, row in enumerate(rows):
            params = row.request.params
            temps.append(params.temperature)
            top_ps.append(params.top_p)
            generators.append(row.generator)
            if row.matcher is not None:
                masked.append(i)
            if params.logprobs is not None:
                wanted.append(i)
        if masked:
            self.grammars.apply_masks(logits, masked, [rows[i].matcher for i in masked])
        tokens = sample(logits, temps, top_ps, generators)
        if not wanted:
            return tokens, None
        entries = token_logprobs(
            logits, tokens, wanted, [temps[i] for i in wanted], [top_ps[i] for i in wanted],
            [rows[i].request.params.logprobs or 0 for i in wanted])
        return tokens, dict(zip(wanted, entries, strict=True))

    # ------------------------------------------------------------------ output
    def _emit(self, rows: list[_Row], tokens: list[int], result: StepResult,
              logprobs: dict[int, TokenLogprob] | None) -> None:
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            if row.finish is not None:
                continue  # cancelled while this step ran
            request = row.request
            if request.max_tokens == 0:
                # Echo only (completions scoring a prompt): the sampled token is not kept.
                result.events.append(TextEvent(request.request_id, row.choice, "", "length"))
                self._close(row, "length", result)
                continue
            row.generated += 1
            request.completion_tokens += 1
            result.tokens += 1
            entry = logprobs.get(i) if logprobs is not None else None
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
                                               (entry,) if entry is not None else None))
            if finish is not None:
                self._close(row, finish, result)

    def _close(self, row: _Row, finish: str, result: StepResult) -> None:
        request = row.request
        row.finish = finish
        request.open_rows -= 1
        if request.open_rows == 0:
            self._requests.pop(request.request_id, None)
            result.done.append(RequestDone(
                request.request_id, len(request.prompt_ids), request.completion_tokens))


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - t.shape[-2]
    if missing == 0:
        return t
    pad = torch.zeros((*t.shape[:-2], missing, t.shape[-1]), dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], dim=-2)


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    if missing == 0:
        return mask
    pad = torch.zeros((mask.shape[0], missing), dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=1)


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
