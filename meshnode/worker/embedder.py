"""Sentence embeddings from an encoder (runs in the worker).

Exactly what sentence-transformers does for all-MiniLM-L6-v2: tokenize with truncation at the
model's `max_seq_length` (sentence_bert_config.json, else the tokenizer's limit), mean-pool the
last hidden state over the attention mask, then L2-normalise.

Inputs given as token ids (OpenAI's `input: [[101, 2023, ...]]`) are the model's own ids: they get
the special tokens the tokenizer would add to text (`[CLS] ... [SEP]` for BERT) unless they
already carry them, and are truncated the same way, so the ids of a text embed exactly as the
text does.
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
        self._specials: tuple[list[int], list[int]] | None = None

    def _frame(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer puts before and after a text's own tokens."""
        if self._specials is None:
            inner = self.tokenizer.encode("a", add_special_tokens=False)
            outer = self.tokenizer.encode("a", add_special_tokens=True)
            for i in range(len(outer) - len(inner) + 1):
                if outer[i : i + len(inner)] == inner:
                    self._specials = (outer[:i], outer[i + len(inner):])
                    break
            else:
                self._specials = ([], [])
        return self._specials

    def _with_specials(self, ids: list[int]) -> list[int]:
        prefix, suffix = self._frame()
        has_prefix = not prefix or ids[: len(prefix)] == prefix
        has_suffix = not suffix or ids[len(ids) - len(suffix):] == suffix
        if prefix and suffix and has_prefix and has_suffix and len(ids) > len(prefix):
            body = ids[len(prefix): len(ids) - len(suffix)]
        else:
            body = ids
        room = max(0, self.max_length - len(prefix) - len(suffix))
        return prefix + body[:room] + suffix

    def _batches_of_ids(self, inputs: list[list[int]]) -> list[dict[str, torch.Tensor]]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = []
        for start in range(0, len(inputs), _BATCH):
            rows = [self._with_specials(list(ids)) for ids in inputs[start : start + _BATCH]]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
                mask[i, : len(row)] = 1
            out.append({"input_ids": ids, "attention_mask": mask})
        return out

    @torch.inference_mode()
    def embed(self, inputs: list[str] | list[list[int]]) -> tuple[torch.Tensor, int]:
        """(float32 [len(inputs), dim] unit vectors on the CPU, tokens read). `inputs` are
        texts, or token-id lists (checked against the vocabulary by the caller)."""
        if inputs and not isinstance(inputs[0], str):
            batches = self._batches_of_ids(inputs)  # type: ignore[arg-type]
        else:
            batches = [
                dict(self.tokenizer(
                    inputs[start : start + _BATCH], padding=True, truncation=True,
                    max_length=self.max_length, return_tensors="pt",
                ))
                for start in range(0, len(inputs), _BATCH)
            ]
        vectors: list[torch.Tensor] = []
        tokens = 0
        for raw in batches:
            batch = {k: v.to(self.device) for k, v in raw.items()}
            out = self.model(**batch)
            mask = batch["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
            summed = (out.last_hidden_state * mask).sum(dim=1)
            pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
            vectors.append(torch.nn.functional.normalize(pooled, p=2, dim=1).float().cpu())
            tokens += int(batch["attention_mask"].sum())
        return torch.cat(vectors, dim=0), tokens

    @property
    def dimensions(self) -> int:
        return int(self.model.config.hidden_size)
