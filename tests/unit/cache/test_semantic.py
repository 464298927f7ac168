"""The semantic cache: index logic with a scripted embedder (fast), and the real minilm weights
(slow) on paraphrases, unrelated prompts and the labelled threshold set."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from meshnode.cache.embedders import TransformersEmbedder
from meshnode.cache.semantic import SemanticIndex, unit_vector
from meshnode.cache.service import ResponseCache
from meshnode.config import CacheConfig, SemanticCacheConfig
from meshnode.errors import UpstreamUnavailable
from meshnode.providers.fake import FakeProvider
from meshnode.types import InferenceRequest
from tests.unit.cache.conftest import chat, make_router
from tests.unit.cache.paraphrases import NON_PARAPHRASES, PARAPHRASES


class ScriptedEmbedder:
    """Vectors from a table; records what it was asked and on whose behalf."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = table
        self.asked: list[tuple[list[str], InferenceRequest | None]] = []
        self.fail = False

    async def embed(self, texts: Sequence[str], *,
                    request: InferenceRequest | None = None) -> list[list[float]]:
        self.asked.append((list(texts), request))
        if self.fail:
            raise UpstreamUnavailable("embedding model down")
        return [self.table[t] for t in texts]


def semantic_config(threshold: float = 0.9, models: list[str] | None = None) -> CacheConfig:
    return CacheConfig(semantic=SemanticCacheConfig(enabled=True, threshold=threshold,
                                                    models=models or []))


TABLE = {"a": [1.0, 0.0, 0.0], "a'": [0.95, 0.31, 0.0], "b": [0.0, 1.0, 0.0]}


async def test_close_prompt_hits_with_its_similarity_far_prompt_misses() -> None:
    fake = FakeProvider("up")
    router = make_router([fake])
    embedder = ScriptedEmbedder(TABLE)
    cache = ResponseCache(semantic_config(0.9), node_id="n1", embedder=embedder)
    await cache.complete(router, chat("a", temperature=0, headers={"x-aiproxy-tags": "pii"}))
    near = await cache.complete(router, chat("a'", temperature=0))
    far = await cache.complete(router, chat("b", temperature=0))
    assert near.served.cache == "hit"
    x = near.served.to_json()
    assert x["cache_match"] == "semantic"
    assert x["similarity"] == pytest.approx(0.95, abs=0.01)
    assert far.served.cache is None
    assert len(fake.calls) == 2
    # The embedder is asked on behalf of the client request, so it can route under its policy.
    assert embedder.asked[0][1] is not None
    assert embedder.asked[0][1].headers == {"x-aiproxy-tags": "pii"}


async def test_exact_hit_needs_no_embedding() -> None:
    embedder = ScriptedEmbedder(TABLE)
    cache = ResponseCache(semantic_config(), node_id="n1", embedder=embedder)
    router = make_router([FakeProvider("up")])
    await cache.complete(router, chat("a", temperature=0))
    await cache.complete(router, chat("a", temperature=0))
    assert len(embedder.asked) == 1


async def test_other_parameters_or_history_never_share_answers() -> None:
    fake = FakeProvider("up")
    router = make_router([fake])
    cache = ResponseCache(semantic_config(0.5), node_id="n1", embedder=ScriptedEmbedder(TABLE))
    await cache.complete(router, chat("a", temperature=0))
    other_params = await cache.complete(router, chat("a'", temperature=0, max_tokens=4))
    assert other_params.served.cache is None
    assert len(fake.calls) == 2


async def test_semantic_is_opt_in_per_model() -> None:
    fake = FakeProvider("up")
    router = make_router([fake])
    embedder = ScriptedEmbedder(TABLE)
    cache = ResponseCache(semantic_config(0.5, models=["another"]), node_id="n1",
                          embedder=embedder)
    await cache.complete(router, chat("a", temperature=0))
    miss = await cache.complete(router, chat("a'", temperature=0))
    assert miss.served.cache is None and embedder.asked == []


async def test_a_failing_embedder_costs_a_miss_not_an_error() -> None:
    fake = FakeProvider("up")
    router = make_router([fake])
    embedder = ScriptedEmbedder(TABLE)
    embedder.fail = True
    cache = ResponseCache(semantic_config(), node_id="n1", embedder=embedder)
    routed = await cache.complete(router, chat("a", temperature=0))
    assert routed.served.cache is None
    # The exact entry is still kept.
    assert (await cache.complete(router, chat("a", temperature=0))).served.cache == "hit"


def test_index_forgets_removed_keys_and_keeps_contexts_apart() -> None:
    index = SemanticIndex()
    index.add("k1", "ctx", unit_vector([1.0, 0.0]))
    index.add("k2", "ctx", unit_vector([0.0, 1.0]))
    index.add("k3", "other", unit_vector([1.0, 0.0]))
    match = index.nearest("ctx", unit_vector([0.9, 0.1]))
    assert match is not None and match.key == "k1"
    index.remove("k1")
    match = index.nearest("ctx", unit_vector([0.9, 0.1]))
    assert match is not None and match.key == "k2"
    assert index.nearest("none", unit_vector([1.0, 0.0])) is None
    assert len(index) == 2


# --------------------------------------------------------------------------- the real minilm
@pytest.fixture(scope="module")
def minilm() -> TransformersEmbedder:
    return TransformersEmbedder()


@pytest.mark.slow
async def test_real_minilm_paraphrase_hits_unrelated_misses(minilm: TransformersEmbedder) -> None:
    fake = FakeProvider("up", text="Paris.")
    router = make_router([fake])
    cache = ResponseCache(semantic_config(0.9), node_id="n1", embedder=minilm)
    await cache.complete(router, chat("What is the capital of France?", temperature=0))
    paraphrase = await cache.complete(router, chat("What's the capital city of France?",
                                                   temperature=0))
    unrelated = await cache.complete(router, chat("How do I bake sourdough bread?",
                                                  temperature=0))
    near_miss = await cache.complete(router, chat("What is the capital of Germany?",
                                                  temperature=0))
    assert paraphrase.served.cache == "hit"
    assert paraphrase.completion.body["choices"][0]["message"]["content"] == "Paris."
    assert paraphrase.served.to_json()["similarity"] >= 0.9
    assert unrelated.served.cache is None
    assert near_miss.served.cache is None
    assert len(fake.calls) == 3


@pytest.mark.slow
def test_real_minilm_default_threshold_never_confuses_the_labelled_set(
    minilm: TransformersEmbedder,
) -> None:
    """No non-paraphrase in the labelled set reaches the default threshold (no wrong answer
    served), and some paraphrase does (the cache is useful at all)."""
    threshold = SemanticCacheConfig().threshold

    def similarities(pairs: list[tuple[str, str]]) -> list[float]:
        left = minilm.embed_sync([a for a, _ in pairs])
        right = minilm.embed_sync([b for _, b in pairs])
        return [sum(x * y for x, y in zip(u, v, strict=True)) for u, v in zip(left, right,
                                                                               strict=True)]

    positives, negatives = similarities(PARAPHRASES), similarities(NON_PARAPHRASES)
    assert max(negatives) < threshold
    assert any(p >= threshold for p in positives)
    # The set is separable at all: every paraphrase is closer than every non-paraphrase.
    assert min(positives) > max(negatives)


async def test_hits_never_cross_tenants_exact_or_semantic() -> None:
    """Issue 15: key B received the answer to key A's similar prompt. The tenant (the key's
    name; anonymous is one tenant) is part of the exact key and of the semantic context."""
    import dataclasses

    fake = FakeProvider("up")
    router = make_router([fake])
    cache = ResponseCache(semantic_config(0.9), node_id="n1", embedder=ScriptedEmbedder(TABLE))

    def as_key(request: InferenceRequest, key: str | None) -> InferenceRequest:
        return dataclasses.replace(request, key_name=key)

    await cache.complete(router, as_key(chat("a", temperature=0), "alice"))
    same_b = await cache.complete(router, as_key(chat("a", temperature=0), "bob"))
    near_b = await cache.complete(router, as_key(chat("a'", temperature=0), "bob-2"))
    anon = await cache.complete(router, as_key(chat("a'", temperature=0), None))
    assert (same_b.served.cache, near_b.served.cache, anon.served.cache) == (None, None, None)
    assert len(fake.calls) == 4
    # Within a tenant both still hit.
    near_a = await cache.complete(router, as_key(chat("a'", temperature=0), "alice"))
    again_b = await cache.complete(router, as_key(chat("a", temperature=0), "bob"))
    anon_again = await cache.complete(router, as_key(chat("a", temperature=0), None))
    assert near_a.served.to_json()["cache_match"] == "semantic"
    assert again_b.served.to_json()["cache_match"] == "exact"
    assert anon_again.served.to_json()["cache_match"] == "semantic"  # anonymous: one tenant
    assert len(fake.calls) == 4
