"""Sampling values are checked on the node side, before a request reaches a worker."""

from __future__ import annotations

import pytest

from meshnode.errors import InvalidRequest
from meshnode.worker.params import (
    Constraint,
    SamplingParams,
    ToolSpec,
    chat_messages,
    check_token_ids,
    completion_prompts,
    embedding_inputs,
    parse_chat_format,
    parse_sampling,
    parse_tools,
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


FN = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def test_logprobs_and_echo_round_trip_through_the_wire() -> None:
    chat = parse_sampling({"logprobs": True, "top_logprobs": 7})
    assert chat.logprobs == 7
    assert parse_sampling({"logprobs": True}).logprobs == 0
    assert parse_sampling({"logprobs": False}).logprobs is None
    legacy = parse_sampling({"logprobs": 3, "echo": True, "max_tokens": 0}, completion=True)
    assert (legacy.logprobs, legacy.echo, legacy.max_tokens) == (3, True, 0)
    constraint = Constraint("tool_call", tools=(ToolSpec(0, "f", "d", {"type": "object"}),))
    params = parse_sampling({"logprobs": True}, constraint=constraint)
    assert SamplingParams.from_wire(params.to_wire()) == params
    assert SamplingParams.from_wire(legacy.to_wire()) == legacy


@pytest.mark.parametrize(
    ("body", "completion", "param"),
    [
        ({"logprobs": True, "top_logprobs": 21}, False, "top_logprobs"),
        ({"top_logprobs": 3}, False, "top_logprobs"),
        ({"logprobs": 1}, False, "logprobs"),
        ({"logprobs": 6}, True, "logprobs"),
        ({"logprobs": True}, True, "logprobs"),
        ({"echo": "yes"}, True, "echo"),
        ({"max_tokens": 0}, False, "max_tokens"),
        ({"max_tokens": -1}, True, "max_tokens"),
    ],
)
def test_bad_logprob_values_are_400(body: dict[str, object], completion: bool,
                                    param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_sampling(body, completion=completion)
    assert info.value.param == param


def test_tools_and_tool_choice() -> None:
    assert parse_tools({}) == ((), None)
    tools, choice = parse_tools({"tools": [FN]})
    assert choice == "auto" and tools == (ToolSpec(0, "f", None, {"type": "object"}),)
    assert parse_tools({"tools": [FN], "tool_choice": "none"})[1] is None
    assert parse_tools({"tools": [FN], "tool_choice": "required"})[1] == "required"
    named = {"type": "function", "function": {"name": "f"}}
    assert parse_tools({"tools": [FN], "tool_choice": named})[1] == "f"
    forced = parse_chat_format({}, tools, "f")
    assert forced == Constraint("tool_call", tools=tools)
    assert parse_chat_format({"response_format": {"type": "json_object"}}, tools, "auto") == \
        Constraint("json_object")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [FN], "tool_choice": {"type": "function", "function": {"name": "g"}}},
         "tool_choice"),
        ({"tools": [FN], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
        ({"tools": [FN, {"type": "function", "function": {"name": "g", "parameters": 3}}]},
         "tools[1].function.parameters"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0]"),
    ],
)
def test_bad_tools_are_400(body: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        tools, choice = parse_tools(body)
        parse_chat_format(body, tools, choice)
    assert info.value.param == param


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        ({"type": "text"}, None),
        ({"type": "json_object"}, Constraint("json_object")),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"},
                                                 "strict": True}},
         Constraint("json_schema", schema={"type": "object"}, strict=True)),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, Constraint("json_object")),
    ],
)
def test_response_formats(response_format: dict[str, object],
                          expected: Constraint | None) -> None:
    assert parse_chat_format({"response_format": response_format}, (), None) == expected


@pytest.mark.parametrize(
    ("response_format", "param"),
    [
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"schema": {}}},
         "response_format.json_schema.name"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}},
         "response_format.json_schema.schema"),
    ],
)
def test_bad_response_formats_are_400(response_format: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_chat_format({"response_format": response_format}, (), None)
    assert info.value.param == param


def test_earlier_tool_calls_go_back_into_the_transcript() -> None:
    messages = chat_messages({"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]})
    assert messages[1]["role"] == "assistant"
    assert messages[1]["content"] == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    assert messages[2] == {"role": "tool", "content": "sunny"}
