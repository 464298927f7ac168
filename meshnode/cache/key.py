"""When a request may use the cache, and the canonical key of its answer.

Pure functions over an `InferenceRequest`: no I/O, no clock, no state.

- `directive()` reads what the client asked (`"cache": true|false` in the body,
  `Cache-Control: no-cache|no-store`, `x-aiproxy-cache: on|off|refresh`) into a `CacheDirective`.
- `is_deterministic()` says whether the answer is a function of the request: embeddings,
  `temperature: 0`, or a `seed`. Only those (or a client's explicit opt-in) are ever cached.
- `exact_key()` is a SHA-256 over the kind, the model and every body field that can change the
  answer, serialised canonically (sorted keys, integral floats as ints). Fields that only change
  the delivery (`stream`, `stream_options`), the bookkeeping (`user`, `metadata`, `store`) or the
  cache itself (`cache`) are left out; everything else, known or not, is in: an unknown
  parameter is assumed to matter, so it can only cost a miss, never a wrong answer.
- `semantic_parts()` splits a request into an exact *context* key (everything but the final
  prompt text) and that final text, which the semantic cache embeds.

Both keys start with the request's *tenant* (`tenant()`: the API key's name; every anonymous
request is one tenant), so no lookup ever finds an answer computed for another key
(docs/security.md).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from meshnode.errors import InvalidRequest
from meshnode.types import InferenceRequest, RequestKind

# Body fields that never change the answer's content.
NON_SEMANTIC_FIELDS = frozenset(
    {"stream", "stream_options", "cache", "user", "metadata", "store", "service_tier"}
)
CACHE_HEADER = "x-aiproxy-cache"


class CacheDirective(enum.Enum):
    """What the client asked of the cache for one request."""

    AUTO = "auto"  # use it when the answer is deterministic
    FORCE = "force"  # the client opted in: use it even when sampling
    REFRESH = "refresh"  # do not read (Cache-Control: no-cache), but store the fresh answer
    OFF = "off"  # neither read nor write (no-store, `"cache": false`)

    @property
    def reads(self) -> bool:
        return self in (CacheDirective.AUTO, CacheDirective.FORCE)

    @property
    def writes(self) -> bool:
        return self is not CacheDirective.OFF


_HEADER_VALUES = {
    "on": CacheDirective.FORCE,
    "force": CacheDirective.FORCE,
    "true": CacheDirective.FORCE,
    "off": CacheDirective.OFF,
    "false": CacheDirective.OFF,
    "no-store": CacheDirective.OFF,
    "refresh": CacheDirective.REFRESH,
    "no-cache": CacheDirective.REFRESH,
    "auto": CacheDirective.AUTO,
}


def directive(request: InferenceRequest, cache_control: str | None = None) -> CacheDirective:
    """The client's cache directive. The most restrictive of body, header and Cache-Control
    wins, so a proxy adding `no-cache` is never overridden by a body's `"cache": true`."""
    found: list[CacheDirective] = []
    flag = request.body.get("cache")
    if flag is not None:
        if not isinstance(flag, bool):
            raise InvalidRequest("'cache' must be a boolean", param="cache")
        found.append(CacheDirective.FORCE if flag else CacheDirective.OFF)
    header = request.headers.get(CACHE_HEADER)
    if header is not None:
        value = _HEADER_VALUES.get(header.strip().lower())
        if value is None:
            raise InvalidRequest(
                f"header {CACHE_HEADER} must be one of {', '.join(sorted(_HEADER_VALUES))}",
                param=CACHE_HEADER,
            )
        found.append(value)
    if cache_control:
        tokens = {t.strip().lower() for t in cache_control.split(",")}
        if "no-store" in tokens:
            found.append(CacheDirective.OFF)
        elif "no-cache" in tokens or "max-age=0" in tokens:
            found.append(CacheDirective.REFRESH)
    if not found:
        return CacheDirective.AUTO
    for strongest in (CacheDirective.OFF, CacheDirective.REFRESH, CacheDirective.FORCE):
        if strongest in found:
            return strongest
    return CacheDirective.AUTO


def is_deterministic(request: InferenceRequest) -> bool:
    """True when the same request gives the same answer: embeddings, temperature 0, a seed."""
    if request.kind is RequestKind.EMBEDDING:
        return True
    body = request.body
    temperature = body.get("temperature")
    if temperature is not None and temperature == 0:
        return True
    seed = body.get("seed")
    return isinstance(seed, int) and not isinstance(seed, bool)


def _canonical_value(value: Any) -> Any:
    # 0 and 0.0 are the same temperature; JSON spells them apart.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _answer_fields(body: Mapping[str, Any], drop: frozenset[str]) -> dict[str, Any]:
    return {
        k: _canonical_value(v)
        for k, v in body.items()
        if k not in NON_SEMANTIC_FIELDS and k not in drop
    }


def _digest(parts: list[Any]) -> str:
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()


def tenant(request: InferenceRequest) -> str:
    """Whose cache a request reads and writes: its key's name ("" for anonymous requests; a
    key name is never empty)."""
    return request.key_name or ""


def exact_key(request: InferenceRequest) -> str:
    """The canonical hash of (tenant, kind, model, every answer-changing parameter)."""
    return _digest([tenant(request), request.kind.value, request.model,
                    _answer_fields(request.body, frozenset())])


@dataclass(frozen=True, slots=True)
class SemanticParts:
    """A request split for the semantic cache: answers are only shared between requests with
    the same `context` (model, parameters, earlier turns) whose `text` embeds close enough."""

    context: str
    text: str


def _text_of(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                return None  # images, audio: similarity of the text alone would lie
            text = part.get("text")
            if not isinstance(text, str):
                return None
            texts.append(text)
        return "\n".join(texts)
    return None


def semantic_parts(request: InferenceRequest) -> SemanticParts | None:
    """Split a chat or completion request for the semantic cache; None when it cannot be
    compared by meaning (embeddings, a non-text prompt, a last turn that is not the user's)."""
    body = request.body
    if request.kind is RequestKind.CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        last = messages[-1]
        if not isinstance(last, dict) or last.get("role") != "user":
            return None
        text = _text_of(last.get("content"))
        if not text or not text.strip():
            return None
        fields = _answer_fields(body, frozenset({"messages"}))
        context = _digest([tenant(request), request.kind.value, request.model, fields,
                           messages[:-1]])
        return SemanticParts(context=context, text=text)
    if request.kind is RequestKind.COMPLETION:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            return None
        fields = _answer_fields(body, frozenset({"prompt"}))
        return SemanticParts(
            context=_digest([tenant(request), request.kind.value, request.model, fields]),
            text=prompt
        )
    return None
