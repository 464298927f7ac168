"""OpenAI shapes of local answers: chat and legacy logprobs, tool calls in a message."""

from __future__ import annotations

import math

from meshnode.providers.local_choices import ChatChoice, CompletionLogprobs, token_text


def test_token_text_names_partial_utf8_as_openai_does() -> None:
    assert token_text(b" Paris") == " Paris"
    assert token_text("é".encode()[:1]) == "bytes:\\xc3"


def test_chat_logprobs_shape() -> None:
    choice = ChatChoice(0, None, logprobs=True)
    _, _, items = choice.feed("Hi", [[b"Hi", -0.25, [[b"Hi", -0.25], [b"Hello", -1.5]]]])
    assert items == [{"token": "Hi", "logprob": -0.25, "bytes": [72, 105], "top_logprobs": [
        {"token": "Hi", "logprob": -0.25, "bytes": [72, 105]},
        {"token": "Hello", "logprob": -1.5, "bytes": [72, 101, 108, 108, 111]}]}]
    choice.feed("!", [[b"!", -math.inf, []]])
    logprobs = choice.logprobs()
    assert logprobs is not None and logprobs["refusal"] is None
    assert [e["logprob"] for e in logprobs["content"]] == [-0.25, -9999.0]
    assert choice.message() == {"role": "assistant", "content": "Hi!", "refusal": None}
    assert choice.finish_reason("stop") == "stop"


def test_completion_logprobs_with_an_echoed_prompt() -> None:
    lp = CompletionLogprobs()
    part = lp.add([[b"The", None, []], [b" cat", -2.0, [[b" dog", -1.0]]]])
    assert part["token_logprobs"] == [None, -2.0]
    assert part["top_logprobs"] == [None, {" dog": -1.0, " cat": -2.0}]  # sampled one added
    assert part["text_offset"] == [0, 3]
    lp.add([["é".encode()[:1], -0.5, []],
            ["é".encode()[1:], -0.1, []]])
    assert lp.whole["tokens"] == ["The", " cat", "bytes:\\xc3", "bytes:\\xa9"]
    assert lp.whole["text_offset"] == [0, 3, 7, 7]  # the split character starts at 7


def test_a_choice_with_calls() -> None:
    choice = ChatChoice(0, frozenset({"f"}), logprobs=False)
    choice.feed('<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>', None)
    choice.end()
    message = choice.message()
    assert message["content"] is None
    assert message["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert message["tool_calls"][0]["type"] == "function"
    assert choice.finish_reason("stop") == "tool_calls"
    assert choice.finish_reason("length") == "length"
    assert choice.logprobs() is None
