"""minilm embeddings are real: semantic order holds and they match transformers directly."""

from __future__ import annotations

import pytest
import torch

from meshnode.worker.builtins import minilm_dir
from meshnode.worker.embedder import Embedder, max_seq_length
from meshnode.worker.models import load_encoder

pytestmark = pytest.mark.slow

TEXTS = ["a cat sits on the mat", "a kitten rests on the rug", "quarterly tax filing deadlines"]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    path = minilm_dir()
    model, tokenizer = load_encoder(path, torch.device("cpu"))
    return Embedder(model, tokenizer, torch.device("cpu"), max_seq_length(path, tokenizer))


def _reference(texts: list[str]) -> torch.Tensor:
    """sentence-transformers' recipe written out by hand with plain transformers."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for text in texts:  # one at a time: no padding at all in the reference
            batch = tokenizer(text, return_tensors="pt", truncation=True, max_length=256)
            hidden = model(**batch).last_hidden_state[0]
            out.append(torch.nn.functional.normalize(hidden.mean(dim=0), dim=0))
    return torch.stack(out)


def test_semantic_order(embedder: Embedder) -> None:
    vectors, tokens = embedder.embed(TEXTS)
    assert vectors.shape == (3, 384)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)
    cat_kitten = float(vectors[0] @ vectors[1])
    cat_tax = float(vectors[0] @ vectors[2])
    assert cat_kitten > cat_tax + 0.2
    assert tokens > len(TEXTS)


def test_matches_a_direct_transformers_reference(embedder: Embedder) -> None:
    vectors, _ = embedder.embed(TEXTS)
    assert torch.allclose(vectors, _reference(TEXTS), atol=1e-5)


def test_long_input_is_truncated_like_sentence_transformers(embedder: Embedder) -> None:
    vectors, tokens = embedder.embed(["word " * 1000])
    assert tokens == 256
    assert vectors.shape == (1, 384)


def test_token_ids_embed_exactly_as_their_text(embedder: Embedder) -> None:
    texts = [*TEXTS, "word " * 1000]
    by_text, tokens = embedder.embed(texts)
    bare = [embedder.tokenizer.encode(t, add_special_tokens=False) for t in texts]
    by_ids, id_tokens = embedder.embed(bare)
    assert torch.allclose(by_text, by_ids, atol=1e-6) and id_tokens == tokens
    # Ids that already carry [CLS] ... [SEP] do not get them twice.
    framed = [embedder.tokenizer.encode(t) for t in TEXTS]
    assert torch.allclose(embedder.embed(framed)[0], by_text[:3], atol=1e-6)
