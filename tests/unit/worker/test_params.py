"""Sampling values are checked on the node side, before a request reaches a worker."""

from __future__ import annotations

import pytest

from meshnode.errors import InvalidRequest
from meshnode.worker.params import (
    SamplingParams,
    chat_messages,
    check_token_ids,
    completion_prompts,
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


def test_prompts_and_inputs_take_every_openai_form() -> None:
    assert completion_prompts({"prompt": "x"}) == ["x"]
    assert completion_prompts({"prompt": ["x", "y"]}) == ["x", "y"]
    assert completion_prompts({"prompt": [1, 2, 3]}) == [[1, 2, 3]]
    assert completion_prompts({"prompt": [[1, 2], [3]]}) == [[1, 2], [3]]
    assert embedding_inputs({"input": "a"}) == ["a"]
    assert embedding_inputs({"input": ["a", "b"]}) == ["a", "b"]
    assert embedding_inputs({"input": [[101, 2023], [7]]}) == [[101, 2023], [7]]
    for bad in ([], [[]], [1, "x"], [[1], "x"], [True], 5, None, [[1.5]]):
        with pytest.raises(InvalidRequest) as info:
            embedding_inputs({"input": bad})
        assert info.value.param == "input"
    with pytest.raises(InvalidRequest) as info:
        completion_prompts({"prompt": [[1], []]})
    assert info.value.param == "prompt"


def test_token_ids_are_checked_against_the_vocabulary() -> None:
    check_token_ids([[0, 9]], 10, "input")
    check_token_ids(["any text"], 10, "input")
    for bad in ([[0, 10]], [[1], [-1]]):
        with pytest.raises(InvalidRequest) as info:
            check_token_ids(bad, 10, "input")
        assert info.value.param == "input" and "vocabulary" in info.value.message


def test_max_tokens_zero_is_for_legacy_completions_only() -> None:
    assert parse_sampling({"max_tokens": 0}, completion=True).max_tokens == 0
    with pytest.raises(InvalidRequest) as info:
        parse_sampling({"max_tokens": 0})
    assert info.value.param == "max_tokens"
