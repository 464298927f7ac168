"""The captured decode step's body and bucket bookkeeping, on the CPU: each 'graph' here replays
by running the captured body eagerly on its static buffers (real capture needs CUDA and is run
by `python -m bench.gpu_local`). Answers must equal the plain eager engine's."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from meshnode.worker.engine import GenerationEngine
from meshnode.worker.graphs import DecodeGraphs, _Graph, buckets
from meshnode.worker.params import SamplingParams

pytestmark = pytest.mark.slow


class _EagerReplay:
    def __init__(self, graphs: DecodeGraphs, buffers: dict[str, torch.Tensor], kv: int,
                 out: torch.Tensor) -> None:
        self.graphs, self.buffers, self.kv, self.out = graphs, buffers, kv, out
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        self.out.copy_(self.graphs._body(self.buffers, self.kv))


def _fake_graphs(engine: GenerationEngine) -> DecodeGraphs:
    graphs = DecodeGraphs(engine.model, engine.cache, engine._cache_kw, engine._dtype)
    vocab = engine.model.get_output_embeddings().weight.shape[0]
    for b in buckets(engine.max_batch):
        for kv in buckets(engine.cache.max_len, 256):
            buffers = {
                "ids": torch.zeros((b, 1), dtype=torch.long),
                "positions": torch.zeros((b, 1), dtype=torch.long),
                "write": torch.full((b,), engine.cache.scratch, dtype=torch.long),
                "seen": torch.ones((b,), dtype=torch.long),
            }
            out = torch.zeros((b, vocab))
            graphs.graphs[(b, kv)] = _Graph(_EagerReplay(graphs, buffers, kv, out),
                                            buffers["ids"], buffers["positions"],
                                            buffers["write"], buffers["seen"], out)
    return graphs


def test_bucketed_decode_answers_as_eager(tiny_gpt2: Any) -> None:
    model, tokenizer, _ = tiny_gpt2
    assert buckets(6) == [1, 2, 4, 6] and buckets(512, 256) == [256, 512]

    def run(graphs: bool) -> dict[int, str]:
        engine = GenerationEngine(model, tokenizer, torch.device("cpu"), 3)
        if graphs:
            engine.graphs = _fake_graphs(engine)
        out: dict[int, str] = {}
        for i, text in enumerate(["hello", "a longer prompt here", "x y z"]):
            engine.submit(i, tokenizer.encode(text),
                          SamplingParams(max_tokens=14 - 2 * i, temperature=0.0))
        while engine.has_work():
            for event in engine.step().events:
                out[event.request_id] = out.get(event.request_id, "") + event.text
        if graphs:
            assert engine.graphs is not None
            used = {key for key, g in engine.graphs.graphs.items() if g.graph.replays}
            assert {(3, 256), (2, 256)} <= used  # the batch narrows as the last slot leaves
        return out

    assert run(graphs=True) == run(graphs=False)
