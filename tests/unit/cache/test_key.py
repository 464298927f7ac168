"""Eligibility, directives and canonical keys (pure)."""

from __future__ import annotations

import pytest

from meshnode.cache.key import (
    CacheDirective,
    directive,
    exact_key,
    is_deterministic,
    semantic_parts,
)
from meshnode.errors import InvalidRequest
from meshnode.types import InferenceRequest, RequestKind


def req(body: dict, *, kind: RequestKind = RequestKind.CHAT, model: str = "m",
        headers: dict[str, str] | None = None) -> InferenceRequest:
    return InferenceRequest(kind=kind, model=model, body=body, request_id="r", deadline=0.0,
                            headers=headers or {})


MSG = [{"role": "user", "content": "hi"}]


def test_directive_defaults_to_auto() -> None:
    assert directive(req({"messages": MSG})) is CacheDirective.AUTO


@pytest.mark.parametrize(
    ("body", "headers", "cache_control", "expected"),
    [
        ({"cache": True}, {}, None, CacheDirective.FORCE),
        ({"cache": False}, {}, None, CacheDirective.OFF),
        ({}, {}, "no-cache", CacheDirective.REFRESH),
        ({}, {}, "max-age=0", CacheDirective.REFRESH),
        ({}, {}, "no-store", CacheDirective.OFF),
        ({}, {}, "private, no-store", CacheDirective.OFF),
        ({}, {"x-aiproxy-cache": "on"}, None, CacheDirective.FORCE),
        ({}, {"x-aiproxy-cache": "off"}, None, CacheDirective.OFF),
        # The most restrictive wins: a proxy's no-cache beats the body's opt-in.
        ({"cache": True}, {}, "no-cache", CacheDirective.REFRESH),
        ({"cache": True}, {"x-aiproxy-cache": "off"}, None, CacheDirective.OFF),
    ],
)
def test_directive_sources(body: dict, headers: dict, cache_control: str | None,
                           expected: CacheDirective) -> None:
    assert directive(req({"messages": MSG, **body}, headers=headers), cache_control) is expected


def test_directive_rejects_malformed_values() -> None:
    with pytest.raises(InvalidRequest) as err:
        directive(req({"messages": MSG, "cache": "yes"}))
    assert err.value.param == "cache"
    with pytest.raises(InvalidRequest):
        directive(req({"messages": MSG}, headers={"x-aiproxy-cache": "maybe"}))


def test_deterministic_only_for_temperature_zero_seed_or_embeddings() -> None:
    assert is_deterministic(req({"messages": MSG, "temperature": 0}))
    assert is_deterministic(req({"messages": MSG, "temperature": 0.0}))
    assert is_deterministic(req({"messages": MSG, "seed": 7, "temperature": 0.7}))
    assert is_deterministic(req({"input": "x"}, kind=RequestKind.EMBEDDING))
    assert not is_deterministic(req({"messages": MSG}))  # OpenAI's default temperature is 1
    assert not is_deterministic(req({"messages": MSG, "temperature": 0.7}))
    assert not is_deterministic(req({"messages": MSG, "seed": True}))


def test_key_is_canonical_over_order_and_number_spelling() -> None:
    a = req({"model": "m", "messages": MSG, "temperature": 0, "max_tokens": 5})
    b = req({"max_tokens": 5, "temperature": 0.0, "messages": MSG, "model": "m"})
    assert exact_key(a) == exact_key(b)


def test_delivery_and_bookkeeping_fields_do_not_change_the_key() -> None:
    base = {"messages": MSG, "temperature": 0}
    key = exact_key(req(base))
    for extra in ({"stream": True}, {"stream_options": {"include_usage": True}},
                  {"user": "u1"}, {"cache": True}, {"metadata": {"a": "b"}}):
        assert exact_key(req({**base, **extra})) == key, extra


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 0.5},
        {"max_tokens": 9},
        {"messages": [{"role": "user", "content": "hi!"}]},
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        {"response_format": {"type": "json_object"}},
        {"stop": ["x"]},
        {"n": 2},
        {"some_new_vendor_param": 1},  # unknown parameters are assumed to matter
    ],
)
def test_every_answer_changing_field_changes_the_key(change: dict) -> None:
    base = {"messages": MSG, "temperature": 0}
    assert exact_key(req({**base, **change})) != exact_key(req(base))


def test_model_and_kind_are_in_the_key() -> None:
    body = {"messages": MSG, "temperature": 0}
    assert exact_key(req(body, model="a")) != exact_key(req(body, model="b"))
    assert exact_key(req(body, kind=RequestKind.CHAT)) != exact_key(
        req(body, kind=RequestKind.COMPLETION))


def test_semantic_parts_split_context_from_the_last_user_turn() -> None:
    history = [{"role": "system", "content": "be brief"}]
    a = semantic_parts(req({"messages": history + [{"role": "user", "content": "What is 2+2?"}],
                            "temperature": 0}))
    b = semantic_parts(req({"messages": history + [{"role": "user", "content": "2 plus 2?"}],
                            "temperature": 0}))
    c = semantic_parts(req({"messages": [{"role": "user", "content": "2 plus 2?"}],
                            "temperature": 0}))
    assert a is not None and b is not None and c is not None
    assert a.text == "What is 2+2?"
    assert a.context == b.context  # same history and parameters: comparable by meaning
    assert c.context != a.context  # another system prompt: never shared


def test_semantic_parts_refuses_what_cannot_be_compared_by_meaning() -> None:
    assert semantic_parts(req({"input": "x"}, kind=RequestKind.EMBEDDING)) is None
    assert semantic_parts(req({"messages": [{"role": "assistant", "content": "x"}]})) is None
    image = [{"type": "image_url", "image_url": {"url": "data:"}}, {"type": "text", "text": "t"}]
    assert semantic_parts(req({"messages": [{"role": "user", "content": image}]})) is None
    parts = semantic_parts(req({"prompt": "Once upon"}, kind=RequestKind.COMPLETION))
    assert parts is not None and parts.text == "Once upon"
