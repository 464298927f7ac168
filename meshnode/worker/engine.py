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

Sampling per row: temperature (0 = greedy), top_p, and an own `torch.Generator` when the
request gave a seed (choice i uses seed + i), so a seeded answer does not depend on what else
is in the batch.
"""

from __future__ import annotations

import inspect
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from meshnode.worker.params import SamplingParams
from meshnode.worker.textstream import TextStream


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
    generated: int = 0
    finish: str | None = None


@dataclass(slots=True)
class _Request:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    rows: list[_Row] = field(default_factory=list)
    open_rows: int = 0
    completion_tokens: int = 0
    cancelled: bool = False


@dataclass(frozen=True, slots=True)
class TextEvent:
    """New text for one choice; `finish` ("stop" | "length") on its last event."""

    request_id: int
    choice: int
    text: str
    finish: str | None


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
        request = _Request(request_id, list(prompt_ids), params, max_tokens)
        if max_tokens == 0:
            # A legacy completion's `max_tokens: 0`: nothing to generate, finished at the next
            # step (echo, which would still read the prompt, is not done here).
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
        rows: list[_Row] = []
        prompts: list[list[int]] = []
        for request in admitted:
            for choice in range(request.params.n):
                generator = None
                if request.params.seed is not None:
                    generator = torch.Generator(device=self.device)
                    generator.manual_seed((request.params.seed + choice) % (2**63))
                row = _Row(request, choice, TextStream(
                    self.tokenizer, request.prompt_ids, request.params.stop), generator)
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
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
            **{self._cache_kw: cache},
        )
        next_tokens = self._sample(out.logits[:, -1, :], rows)
        self._merge(rows, cache, mask, next_tokens)
        self._emit(rows, next_tokens.tolist(), result)

    def _decode(self, result: StepResult) -> None:
        assert self._mask is not None and self._pending is not None
        positions = self._mask.sum(1, keepdim=True)
        ones = torch.ones((len(self._rows), 1), dtype=self._mask.dtype, device=self.device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        out = self.model(
            input_ids=self._pending[:, None], attention_mask=self._mask, position_ids=positions,
            use_cache=True, **{self._cache_kw: self._cache},
        )
        next_tokens = self._sample(out.logits[:, -1, :], self._rows)
        self._pending = next_tokens
        self._emit(self._rows, next_tokens.tolist(), result)

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
    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        logits = logits.float()
        temps = [row.request.params.temperature for row in rows]
        if all(t == 0.0 for t in temps):
            return logits.argmax(dim=-1)
        temp = torch.tensor([t if t > 0 else 1.0 for t in temps], device=logits.device)
        scaled = logits / temp[:, None]
        top_ps = [row.request.params.top_p for row in rows]
        if any(p < 1.0 for p in top_ps):
            top_p = torch.tensor(top_ps, device=logits.device)
            sorted_logits, order = scaled.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            # Drop a token when the tokens before it already cover top_p (the first one stays).
            remove = (probs.cumsum(dim=-1) - probs) > top_p[:, None]
            sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
            scaled = torch.full_like(scaled, float("-inf")).scatter(1, order, sorted_logits)
        probs = scaled.softmax(dim=-1)
        out = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        shared = [i for i, row in enumerate(rows) if row.generator is None]
        if shared:
            index = torch.tensor(shared, device=logits.device)
            out[index] = torch.multinomial(probs.index_select(0, index), 1).squeeze(1)
        for i, row in enumerate(rows):
            if row.generator is not None:
                out[i] = torch.multinomial(probs[i], 1, generator=row.generator)[0]
        greedy = [i for i, t in enumerate(temps) if t == 0.0]
        if greedy:
            index = torch.tensor(greedy, device=logits.device)
            out[index] = logits.index_select(0, index).argmax(dim=-1)
        return out

    # ------------------------------------------------------------------ output
    def _emit(self, rows: list[_Row], tokens: list[int], result: StepResult) -> None:
        for row, token in zip(rows, tokens, strict=True):
            if row.finish is not None:
                continue  # cancelled while this step ran
            request = row.request
            row.generated += 1
            request.completion_tokens += 1
            result.tokens += 1
            finish: str | None = None
            if token in self.eos_ids:
                text = row.text.flush()
                finish = "stop"
            else:
                text = row.text.push(token)
                if row.text.stopped:
                    finish = "stop"
                elif row.generated >= request.max_tokens:
                    text += row.text.flush()
                    finish = "length"
            if text or finish:
                result.events.append(TextEvent(request.request_id, row.choice, text, finish))
            if finish is not None:
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
