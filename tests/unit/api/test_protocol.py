"""Validation of OpenAI request bodies: every bad field gives a 400 naming its `param`."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from meshnode.api.protocol import REDIRECT_FIELDS, loads_body, parse_chat, parse_request
from meshnode.errors import InvalidRequest
from meshnode.types import InferenceRequest, RequestKind

MSG = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": MSG, **fields}


def parse(kind: RequestKind, body: Any) -> Any:
    return parse_request(kind, orjson.dumps(body), request_id="r1", timeout_s=10.0)


def bad(kind: RequestKind, body: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse(kind, body)
    assert info.value.status == 400
    return info.value


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m"}, "messages"),
        (chat(messages=[]), "messages"),
        (chat(messages="hi"), "messages"),
        (chat(messages=[42]), "messages[0]"),
        (chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
        (chat(messages=[{"role": ["user"], "content": "x"}]), "messages[0].role"),
        (chat(messages=[{"content": "x"}]), "messages[0].role"),
        (chat(messages=[{"role": "user"}]), "messages[0].content"),
        (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
        (chat(messages=[MSG[0], {"role": "user", "content": [3]}]), "messages[1].content[0]"),
        ({"messages": MSG}, "model"),
        (chat(model=""), "model"),
        (chat(model=7), "model"),
        (chat(max_tokens=-1), "max_tokens"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(max_tokens=10_000_000), "max_tokens"),
        (chat(max_tokens="10"), "max_tokens"),
        (chat(max_tokens=1.5), "max_tokens"),
        (chat(max_tokens=True), "max_tokens"),
        (chat(max_completion_tokens=-5), "max_completion_tokens"),
        (chat(max_completion_tokens=2_000_000), "max_completion_tokens"),
        (chat(n=1000), "n"),
        (chat(n=0), "n"),
        (chat(temperature=2.5), "temperature"),
        (chat(temperature=-0.1), "temperature"),
        (chat(temperature="hot"), "temperature"),
        (chat(top_p=1.5), "top_p"),
        (chat(presence_penalty=3), "presence_penalty"),
        (chat(stream="yes"), "stream"),
        (chat(stream=True, stream_options="x"), "stream_options"),
        (chat(stream=True, stream_options={"include_usage": "y"}), "stream_options.include_usage"),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
        (chat(stop=[1]), "stop[0]"),
        (chat(stop=5), "stop"),
        (chat(seed="s"), "seed"),
        (chat(tools={"a": 1}), "tools"),
        (chat(tools=["x"]), "tools[0]"),
        (chat(user=5), "user"),
        (chat(response_format="json"), "response_format"),
    ],
)
def test_chat_rejects_with_param(body: dict[str, Any], param: str) -> None:
    assert bad(RequestKind.CHAT, body).param == param


def test_body_must_be_a_json_object() -> None:
    for raw in (b"", b"not json", b"[1,2]", b'"s"'):
        with pytest.raises(InvalidRequest):
            loads_body(raw)


def test_valid_chat_becomes_an_inference_request() -> None:
    body = chat(
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=50,
        temperature=0,
        top_p=1,
        n=2,
        tools=[{"type": "function", "function": {"name": "f"}}],
        tool_choice="auto",
        response_format={"type": "json_object"},
        seed=3,
        stop="x",
        user="u",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello there"}]},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
            {"role": "tool", "content": "42", "tool_call_id": "1"},
        ],
    )
    req = parse(RequestKind.CHAT, body)
    assert req.kind is RequestKind.CHAT
    assert req.model == "m"
    assert req.stream and req.include_usage
    assert req.max_output_tokens == 50
    assert req.request_id == "r1"
    assert req.prompt_tokens_estimate > 1
    assert req.body["tools"] == body["tools"]  # passes through untouched


def test_include_usage_only_counts_when_streaming() -> None:
    req = parse(RequestKind.CHAT, chat(stream_options={"include_usage": True}))
    assert not req.stream and not req.include_usage


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    req = parse(RequestKind.CHAT, chat(max_tokens=10, max_completion_tokens=20))
    assert req.max_output_tokens == 20


def test_redirect_fields_are_stripped() -> None:
    body = chat(
        api_base="http://evil.example",
        base_url="http://evil.example",
        api_key="sk-stolen",
        api_version="1",
        organization="org",
        extra_headers={"Authorization": "Bearer x"},
        metadata={"keep": "me"},
    )
    req = parse(RequestKind.CHAT, body)
    assert REDIRECT_FIELDS.isdisjoint(req.body)
    assert req.body["metadata"] == {"keep": "me"}
    assert req.body["messages"] == MSG


def test_clean_body_is_not_copied() -> None:
    body = chat()
    req = parse_request(RequestKind.CHAT, orjson.dumps(body), request_id="r", timeout_s=1)
    assert req.body == body


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m"}, "prompt"),
        ({"model": "m", "prompt": 5}, "prompt"),
        ({"model": "m", "prompt": []}, "prompt"),
        ({"model": "m", "prompt": [1, "a"]}, "prompt"),
        ({"model": "m", "prompt": "x", "max_tokens": -3}, "max_tokens"),
        ({"model": "m", "prompt": "x", "n": 1000}, "n"),
        ({"model": "m", "prompt": "x", "logprobs": 9}, "logprobs"),
    ],
)
def test_completion_rejects(body: dict[str, Any], param: str) -> None:
    assert bad(RequestKind.COMPLETION, body).param == param


def test_completion_accepts_prompt_forms() -> None:
    for prompt in ("hi", ["a", "b"], [1, 2, 3], [[1, 2], [3]]):
        req = parse(RequestKind.COMPLETION, {"model": "m", "prompt": prompt})
        assert req.kind is RequestKind.COMPLETION


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m"}, "input"),
        ({"model": "m", "input": ""}, "input"),
        ({"model": "m", "input": []}, "input"),
        ({"model": "m", "input": ["a", ""]}, "input[1]"),
        ({"model": "m", "input": {"a": 1}}, "input"),
        ({"model": "m", "input": ["a"] * 3000}, "input"),
        ({"model": "m", "input": "a", "encoding_format": "hex"}, "encoding_format"),
        ({"model": "m", "input": "a", "dimensions": 0}, "dimensions"),
    ],
)
def test_embedding_rejects(body: dict[str, Any], param: str) -> None:
    assert bad(RequestKind.EMBEDDING, body).param == param


def test_embedding_accepts_str_and_list() -> None:
    for value in ("hello", ["a", "b"], [1, 2], [[1], [2, 3]]):
        req = parse(RequestKind.EMBEDDING, {"model": "m", "input": value})
        assert req.kind is RequestKind.EMBEDDING
        assert not req.stream


def test_completion_takes_max_tokens_zero_and_chat_does_not() -> None:
    req = parse(RequestKind.COMPLETION, {"model": "m", "prompt": "x", "max_tokens": 0})
    assert req.max_output_tokens == 0
    assert bad(RequestKind.CHAT, chat(max_tokens=0)).param == "max_tokens"
    assert bad(RequestKind.CHAT, chat(max_completion_tokens=0)).param == "max_completion_tokens"


def test_each_parsed_value_lands_in_its_own_field() -> None:
    # `_request` builds the InferenceRequest by position: a field order changed in
    # meshnode.types must not put a value in a neighbour's field.
    body = {"model": "m", "messages": [{"role": "user", "content": "abcdefgh"}],
            "max_tokens": 7, "stream": True}
    req = parse_chat(body, request_id="rid", deadline=12.5, headers={"x-aiproxy-a": "b"},
                     key_name="k")
    assert req == InferenceRequest(
        kind=RequestKind.CHAT, model="m", body=body, request_id="rid", deadline=12.5,
        stream=True, include_usage=False, key_name="k", headers={"x-aiproxy-a": "b"},
        visited=(), prompt_tokens_estimate=3, max_output_tokens=7,
    )
