"""What the cache keeps for one answer, and its byte form for the persistent store.

An answer is always kept in its non-stream OpenAI shape (`chat.completion`, `text_completion`,
the embeddings `list`), whichever way it was first delivered: a streamed answer is assembled
into that shape once (`replay.assemble`), and a streamed hit is replayed from it
(`replay.chunks_of`). One shape means one key serves both `stream: true` and `stream: false`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from meshnode.types import RequestKind, Usage


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    kind: RequestKind
    model: str  # the public model name
    body: dict[str, Any]  # the whole OpenAI answer, without `x_aiproxy`; never mutated
    usage: Usage
    provider: str  # who first served it
    cost: float  # what it cost the first time: what each hit saves
    created_at: float  # wall-clock seconds (persisted entries outlive the process)

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "kind": self.kind.value,
                "model": self.model,
                "body": self.body,
                "usage": [
                    self.usage.prompt_tokens,
                    self.usage.completion_tokens,
                    self.usage.estimated,
                ],
                "provider": self.provider,
                "cost": self.cost,
                "created_at": self.created_at,
            }
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> CachedAnswer:
        doc = orjson.loads(raw)
        prompt, completion, estimated = doc["usage"]
        return cls(
            kind=RequestKind(doc["kind"]),
            model=str(doc["model"]),
            body=doc["body"],
            usage=Usage(int(prompt), int(completion), bool(estimated)),
            provider=str(doc["provider"]),
            cost=float(doc["cost"]),
            created_at=float(doc["created_at"]),
        )
