"""Fixed KV slots: the one preallocated key/value cache of a model (worker side).

Per layer, keys and values are `[max_batch, kv_heads, max_len, head_dim]` tensors allocated
once, zero-filled (so a slot never holds NaN). A row of the batch *is* a slot: a newcomer's
prefill is written into its free slot, a leaving row just frees its slot; no row's tensors are
ever concatenated, padded or copied because another row came or went.

`SlotCache` is what the model's attention layers see (it subclasses transformers' `Cache`, whose
`update(key, value, layer_idx)` every supported model calls). Before each forward the engine
sets a plan, and `update` writes the new keys/values at each row's own positions and returns the
slots' keys/values for attention:
- `plan_prefill(slots, write_positions, kv_len)`: a batch of prompt chunks (one row per slot,
  each at its own offset), returning those slots' first `kv_len` positions;
- `plan_decode(rows, write_positions, kv_len)`: one token for each of the first `rows` slots
  (a view, no copy: slots are handed out lowest-first so the running rows stay packed).
The attention mask (`prefill_mask`, `decode_mask`) is a 4-D mask built from per-row lengths,
which transformers passes through to SDPA untouched; position ids are per row as well. That is
everything GPT-2 and the Llama family (SmolLM2, TinyLlama, Qwen2, Mistral without a sliding
window) need; a model whose attention does not go through `Cache.update` is refused at start.

Write positions that belong to nobody (padding of a short chunk, a free slot inside the decode
batch) go to positions no one reads before rewriting them (`SCRATCH`: a row's future positions
or its last one), and their queries attend key 0, so no step ever produces NaN.

This module owns the tensors and the slot copies (`copy_slot`, `read_span`, `write_span`, used
by the prefix store); it does not decide who gets a slot (`scheduler.py` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache


@dataclass(frozen=True, slots=True)
class LayerShape:
    kv_heads: int
    key_dim: int
    value_dim: int


@dataclass(frozen=True, slots=True)
class CacheShape:
    layers: tuple[LayerShape, ...]
    dtype: torch.dtype

    def bytes_per_token(self) -> int:
        size = torch.empty((), dtype=self.dtype).element_size()
        return sum(s.kv_heads * (s.key_dim + s.value_dim) * size for s in self.layers)


def probe_shape(model: Any, cache_kw: str, device: torch.device) -> CacheShape:
    """The KV shape of every layer, read from a one-token forward with a dynamic cache (works for
    any model that caches through `Cache.update`, whatever its config calls its heads)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    ids = torch.zeros((1, 1), dtype=torch.long, device=device)
    with torch.inference_mode():
        model(input_ids=ids, use_cache=True, **{cache_kw: cache})
    shapes = []
    dtype = None
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or values is None or keys.dim() != 4:
            raise ValueError(f"{type(model).__name__}: a cache layer without plain keys/values "
                             "(sliding window or linear attention) is not supported")
        shapes.append(LayerShape(int(keys.shape[1]), int(keys.shape[3]), int(values.shape[3])))
        dtype = keys.dtype
    if not shapes or dtype is None:
        raise ValueError(f"{type(model).__name__} does not use a KV cache")
    return CacheShape(tuple(shapes), dtype)


class SlotCache(Cache):
    def __init__(self, shape: CacheShape, max_batch: int, max_len: int, device: torch.device,
                 bool_mask: bool = True) -> None:
        super().__init__(layers=[])
        self.shape = shape
        self.max_batch = max_batch
        self.max_len = max_len
        self.device = device
        self.bool_mask = bool_mask
        self.keys = [torch.zeros((max_batch, s.kv_heads, max_len, s.key_dim), dtype=shape.dtype,
                                 device=device) for s in shape.layers]
        self.values = [torch.zeros((max_batch, s.kv_heads, max_len, s.value_dim),
                                   dtype=shape.dtype, device=device) for s in shape.layers]
        self._rows_index = torch.arange(max_batch, device=device)
        # The plan of the forward about to run (see the module docstring).
        self._slots: torch.Tensor | None = None  # prefill: [b] slot ids
        self._rows = 0  # decode: the first `rows` slots
        self._write: torch.Tensor = self._rows_index[:1]  # [b, q] (prefill) or [b] (decode)
        self._kv_len = 0
        self._span: tuple[int, int] | None = None

    @property
    def size_bytes(self) -> int:
        return self.shape.bytes_per_token() * self.max_batch * self.max_len

    @property
    def scratch(self) -> int:
        """A position no row reads before writing it: a row's length is at most max_len - 1
        before its last token is written (prompt + max_tokens <= max_len)."""
        return self.max_len - 1

    # ------------------------------------------------------------------ plans
    def plan_prefill(self, slots: torch.Tensor, write: torch.Tensor, kv_len: int,
                     span: tuple[int, int] | None = None) -> None:
        """`span` = (first, last + 1) when the slots are consecutive (the engine knows it)."""
        self._slots, self._rows, self._write, self._kv_len = slots, 0, write, kv_len
        self._span = span

    def plan_decode(self, rows: int, write: torch.Tensor, kv_len: int) -> None:
        self._slots, self._rows, self._write, self._kv_len = None, rows, write, kv_len

    # ------------------------------------------------------------------ what the model calls
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        kv = self._kv_len
        if self._slots is not None:
            slots = self._slots
            # keys[slots[:, None], :, write] is [b, q, heads, dim]: the new states, heads second.
            keys[slots[:, None], :, self._write] = key_states.transpose(1, 2).to(keys.dtype)
            values[slots[:, None], :, self._write] = value_states.transpose(1, 2).to(
                values.dtype)
            if self._span is not None:  # the slots are consecutive: a view, no copy
                first, last = self._span
                return keys[first:last, :, :kv], values[first:last, :, :kv]
            return keys[:, :, :kv].index_select(0, slots), values[:, :, :kv].index_select(0, slots)
        rows = self._rows
        index = self._rows_index[:rows]
        keys[index, :, self._write] = key_states[:, :, 0].to(keys.dtype)
        values[index, :, self._write] = value_states[:, :, 0].to(values.dtype)
        return keys[:rows, :, :kv], values[:rows, :, :kv]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._kv_len, 0

    def __len__(self) -> int:
        return len(self.keys)

    # ------------------------------------------------------------------ masks
    def _finish_mask(self, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.bool_mask:
            return allowed
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, low)

    def prefill_mask(self, query_positions: torch.Tensor, real: torch.Tensor, kv_len: int,
                     dtype: torch.dtype) -> torch.Tensor:
        """[b, 1, q, kv_len]: a real query at position p sees keys 0..p of its own row; a padding
        query sees key 0 only."""
        keys = torch.arange(kv_len, device=query_positions.device)
        allowed = keys[None, None, :] <= query_positions[:, :, None]
        allowed = torch.where(real[:, :, None], allowed, keys[None, None, :] == 0)
        return self._finish_mask(allowed[:, None], dtype)

    def decode_mask(self, seen: torch.Tensor, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
        """[rows, 1, 1, kv_len]: row r sees its first seen[r] keys (1 for a free slot)."""
        keys = torch.arange(kv_len, device=seen.device)
        allowed = keys[None, :] < seen[:, None]
        return self._finish_mask(allowed[:, None, None, :], dtype)

    # ------------------------------------------------------------------ slot copies
    def copy_slot(self, source: int, target: int, length: int) -> None:
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[target, :, :length] = keys[source, :, :length]
            values[target, :, :length] = values[source, :, :length]

    def read_span(self, slot: int, start: int, end: int
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Views of positions start..end of one slot, per layer ([heads, n, dim] each)."""
        return [(k[slot, :, start:end], v[slot, :, start:end])
                for k, v in zip(self.keys, self.values, strict=True)]

    def write_span(self, slot: int, start: int,
                   spans: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for keys, values, (k, v) in zip(self.keys, self.values, spans, strict=True):
            n = k.shape[1]
            keys[slot, :, start:start + n] = k
            values[slot, :, start:start + n] = v
