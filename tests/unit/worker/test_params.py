"""Sampling values are checked on the node side, before a request reaches a worker."""

from __future__ import annotations

import pytest

from meshnode.errors import InvalidRequest
from meshnode.worker.params import (
    SamplingParams,
    chat_messages,
    completion_prompt,
    embedding_inputs,
    parse_sampling,
)


def test_defaults() -> None:
    assert parse_sampling({}) == SamplingParams(max_tokens=None)


def test_values_pass_through_and_round_trip() -> None:
    params = parse_sampling({"max_tokens": 7, "temperature": 0, "top_p": 0.5, "stop": "x",
                             "seed": 3, "n": 2})
    assert params == SamplingParams(7, 0.0, 0.5, ("x",), 3, 2)
    assert SamplingParams.from_wire(params.to_wire()) == params


def test_max_completion_tokens_wins() -> None:
    assert parse_sampling({"max_tokens": 9, "max_completion_tokens": 4}).max_tokens == 4


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": 3}, "stop"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_bad_values_are_400_naming_the_param(body: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_sampling(body)
    assert info.value.status == 400
    assert info.value.param == param


def test_chat_messages_take_text_parts() -> None:
    body = {"messages": [{"role": "system", "content": None},
                         {"role": "user", "content": [{"type": "text", "text": "a"},
                                                      {"type": "text", "text": "b"}]}]}
    assert chat_messages(body) == [{"role": "system", "content": ""},
                                   {"role": "user", "content": "ab"}]
    with pytest.raises(InvalidRequest):
        chat_messages({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    with pytest.raises(InvalidRequest):
        chat_messages({"messages": []})


def test_prompts_and_inputs() -> None:
    assert completion_prompt({"prompt": ["x"]}) == "x"
    with pytest.raises(InvalidRequest):
        completion_prompt({"prompt": ["x", "y"]})
    assert embedding_inputs({"input": "a"}) == ["a"]
    assert embedding_inputs({"input": ["a", "b"]}) == ["a", "b"]
    with pytest.raises(InvalidRequest):
        embedding_inputs({"input": []})
