"""CUDA graphs of the decode step, one per (batch bucket, key-length bucket); CUDA only.

A decode step at batch b reading the first kv positions of each slot is the same kernels
every time (the slot cache is fixed), so it is captured once per bucket pair and replayed: the
launch cost of a few hundred small kernels becomes one. Batch buckets are 1, 2, 4 ...
max_batch; key-length buckets 256, 512 ... max_len, so short rows do not pay attention (and
GQA's key/value expansion, which a masked SDPA needs) over the whole slot. Inputs are copied into the bucket's static buffers
(token ids, positions, how many keys each row sees); rows past the real batch are free slots
that write a scratch position and attend key 0 (see kvcache.py), so a bucket may be wider than
the batch. All buckets share one memory pool.

Capture can fail for a model that syncs with the host inside its forward; then `capture()`
logs why and the engine stays eager. This module is exercised by `python -m bench.gpu_local`,
not by CI (it needs a GPU).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from meshnode.worker.kvcache import SlotCache

log = logging.getLogger(__name__)


def buckets(top: int, first: int = 1) -> list[int]:
    """first, 2 first, 4 first ... below `top`, then `top`."""
    out = []
    size = first
    while size < top:
        out.append(size)
        size *= 2
    out.append(top)
    return out


@dataclass(slots=True)
class _Graph:
    graph: Any
    ids: torch.Tensor  # [b, 1]
    positions: torch.Tensor  # [b, 1]
    write: torch.Tensor  # [b]
    seen: torch.Tensor  # [b]
    logits: torch.Tensor  # [b, vocab]


class DecodeGraphs:
    def __init__(self, model: Any, cache: SlotCache, cache_kw: str, dtype: torch.dtype) -> None:
        self.model = model
        self.cache = cache
        self.cache_kw = cache_kw
        self.dtype = dtype
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self._pool: Any = None

    def _body(self, g: _Graph | dict[str, torch.Tensor], kv: int) -> torch.Tensor:
        cache = self.cache
        ids = g.ids if isinstance(g, _Graph) else g["ids"]
        positions = g.positions if isinstance(g, _Graph) else g["positions"]
        write = g.write if isinstance(g, _Graph) else g["write"]
        seen = g.seen if isinstance(g, _Graph) else g["seen"]
        rows = ids.shape[0]
        cache.plan_decode(rows, write, kv)
        mask = cache.decode_mask(seen, kv, self.dtype)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1, **{self.cache_kw: cache})
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    def capture(self) -> bool:
        device = self.cache.device
        try:
            self._pool = torch.cuda.graph_pool_handle()
            kv_buckets = buckets(self.cache.max_len, min(256, self.cache.max_len))
            pairs = [(b, kv) for b in buckets(self.cache.max_batch) for kv in kv_buckets]
            for b, kv in reversed(pairs):  # largest first: the shared pool then fits all
                buffers = {
                    "ids": torch.zeros((b, 1), dtype=torch.long, device=device),
                    "positions": torch.zeros((b, 1), dtype=torch.long, device=device),
                    "write": torch.full((b,), self.cache.scratch, dtype=torch.long,
                                        device=device),
                    "seen": torch.ones((b,), dtype=torch.long, device=device),
                }
                stream = torch.cuda.Stream(device)
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream), torch.inference_mode():
                    for _ in range(2):
                        self._body(buffers, kv)
                torch.cuda.current_stream(device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool), torch.inference_mode():
                    logits = self._body(buffers, kv)
                self.graphs[(b, kv)] = _Graph(graph, buffers["ids"], buffers["positions"],
                                        buffers["write"], buffers["seen"], logits)
            torch.cuda.synchronize(device)
            return True
        except Exception as exc:  # noqa: BLE001 - a model that cannot be captured runs eager
            log.warning("CUDA graph capture failed (%s: %s); decoding eagerly",
                        type(exc).__name__, exc)
            self.graphs.clear()
            return False

    def bucket(self, rows: int, keys: int) -> tuple[int, int] | None:
        """The smallest captured (batch, key length) holding `rows` rows that see `keys`."""
        for b, kv in sorted(self.graphs):
            if b >= rows and kv >= keys:
                return b, kv
        return None

    def run(self, bucket: tuple[int, int], ids: torch.Tensor, positions: torch.Tensor,
            write: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """Replay a bucket with the first len(ids) rows given (the rest are free slots)."""
        g = self.graphs[bucket]
        b = bucket[0]
        rows = ids.shape[0]
        g.ids[:rows].copy_(ids)
        g.positions[:rows].copy_(positions)
        g.write[:rows].copy_(write)
        g.seen[:rows].copy_(seen)
        if rows < b:
            g.ids[rows:].zero_()
            g.positions[rows:].zero_()
            g.write[rows:].fill_(self.cache.scratch)
            g.seen[rows:].fill_(1)
        g.graph.replay()
        return g.logits[:rows]
