"""Sentence embeddings from an encoder (runs in the worker).

Exactly what sentence-transformers does for all-MiniLM-L6-v2: tokenize with truncation at the
model's `max_seq_length` (sentence_bert_config.json, else the tokenizer's limit), mean-pool the
last hidden state over the attention mask, then L2-normalise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

_BATCH = 32


def max_seq_length(path: Path, tokenizer: Any) -> int:
    config = path / "sentence_bert_config.json"
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("max_seq_length")
        if isinstance(value, int) and value > 0:
            return value
    except (OSError, ValueError):
        pass
    limit = getattr(tokenizer, "model_max_length", 512)
    return int(limit) if isinstance(limit, int) and 0 < limit < 10**7 else 512


class Embedder:
    def __init__(self, model: Any, tokenizer: Any, device: torch.device, max_length: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_length = max_length

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> tuple[torch.Tensor, int]:
        """(float32 [len(texts), dim] unit vectors on the CPU, tokens read)."""
        vectors: list[torch.Tensor] = []
        tokens = 0
        for start in range(0, len(texts), _BATCH):
            batch = self.tokenizer(
                texts[start : start + _BATCH], padding=True, truncation=True,
                max_length=self.max_length, return_tensors="pt",
            ).to(self.device)
            out = self.model(**batch)
            mask = batch["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
            summed = (out.last_hidden_state * mask).sum(dim=1)
            pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
            vectors.append(torch.nn.functional.normalize(pooled, p=2, dim=1).float().cpu())
            tokens += int(batch["attention_mask"].sum())
        return torch.cat(vectors, dim=0), tokens
