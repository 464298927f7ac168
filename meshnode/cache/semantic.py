"""The semantic index: which kept answer's prompt is closest in meaning to a new one.

The embedder is an injected interface (`Embedder`): the node gives it one that asks the router
for the configured embedding model (`minilm`, served by the local worker), tests give it the
real weights loaded directly. The index itself is pure arithmetic: unit vectors grouped by
*context* (model, parameters and earlier turns must match exactly; only the final prompt is
compared by meaning), cosine similarity by one matrix-vector product per lookup.

numpy is imported lazily: it is only needed when the semantic cache is on, which needs an
embedding model, which brings torch and numpy with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from meshnode.types import InferenceRequest


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into vectors.

    `request`, when given, is the client request the embedding is made for: an implementation
    that routes the embedding (to a local worker or a peer) must route it under that request's
    policy headers and key, so a prompt tagged `pii` is never embedded where it may not go.
    Must not block the event loop.
    """

    async def embed(
        self, texts: Sequence[str], *, request: InferenceRequest | None = None
    ) -> list[list[float]]: ...


@dataclass(frozen=True, slots=True)
class SemanticMatch:
    key: str
    similarity: float


class _Bucket:
    __slots__ = ("keys", "vectors", "_matrix")

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.vectors: list[Any] = []
        self._matrix: Any = None  # stacked lazily; dropped on every change

    def matrix(self) -> Any:
        if self._matrix is None:
            import numpy as np

            self._matrix = np.stack(self.vectors)
        return self._matrix

    def add(self, key: str, vector: Any) -> None:
        self.keys.append(key)
        self.vectors.append(vector)
        self._matrix = None

    def remove(self, key: str) -> None:
        i = self.keys.index(key)
        del self.keys[i]
        del self.vectors[i]
        self._matrix = None


def unit_vector(values: Sequence[float] | bytes) -> Any:
    """A float32 unit vector from floats or from the bytes `vector_bytes` wrote."""
    import numpy as np

    if isinstance(values, (bytes, bytearray, memoryview)):
        vec = np.frombuffer(values, dtype=np.float32).copy()
    else:
        vec = np.asarray(values, dtype=np.float32)
    norm = float(np.linalg.norm(vec))
    return vec / norm if norm > 0 else vec


def vector_bytes(vector: Any) -> bytes:
    return bytes(vector.astype("float32").tobytes())


class SemanticIndex:
    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}
        self._where: dict[str, str] = {}  # key -> context
        self._vectors: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def add(self, key: str, context: str, vector: Any) -> None:
        if key in self._where:
            self.remove(key)
        self._buckets.setdefault(context, _Bucket()).add(key, vector)
        self._where[key] = context
        self._vectors[key] = vector

    def remove(self, key: str) -> None:
        context = self._where.pop(key, None)
        if context is None:
            return
        self._vectors.pop(key, None)
        bucket = self._buckets[context]
        bucket.remove(key)
        if not bucket.keys:
            del self._buckets[context]

    def entry(self, key: str) -> tuple[str, Any] | None:
        """(context, vector) of an indexed key."""
        context = self._where.get(key)
        return None if context is None else (context, self._vectors[key])

    def nearest(self, context: str, vector: Any) -> SemanticMatch | None:
        """The kept prompt most similar to `vector` within `context` (cosine, unit vectors)."""
        bucket = self._buckets.get(context)
        if bucket is None:
            return None
        scores = bucket.matrix() @ vector
        best = int(scores.argmax())
        return SemanticMatch(bucket.keys[best], float(scores[best]))
