"""Streams to whole answers and back (pure)."""

from __future__ import annotations

from meshnode.cache.replay import assemble, chunks_of
from meshnode.types import RequestKind, Usage

USAGE = Usage(5, 3)
HEAD = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def chunk(choices: list, **extra: object) -> dict:
    return {**HEAD, "choices": choices, **extra}


def test_chat_stream_assembles_into_a_completion() -> None:
    chunks = [
        chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]),
        chunk([{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]),
        chunk([{"index": 0, "delta": {"content": "lo"}, "finish_reason": None}]),
        chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        chunk([], usage=USAGE.to_openai()),
    ]
    body = assemble(RequestKind.CHAT, chunks, USAGE)
    assert body is not None
    assert body["object"] == "chat.completion"
    assert body["id"] == "c1" and body["model"] == "m"
    assert body["choices"] == [{"index": 0,
                                "message": {"role": "assistant", "content": "Hello",
                                            "refusal": None},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_tool_call_deltas_merge_by_index() -> None:
    chunks = [
        chunk([{"index": 0, "delta": {"role": "assistant", "tool_calls": [
            {"index": 0, "id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": ""}}]}, "finish_reason": None}]),
        chunk([{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": '{"city":'}}]}, "finish_reason": None}]),
        chunk([{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": '"Paris"}'}}]}, "finish_reason": None}]),
        chunk([{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]),
    ]
    body = assemble(RequestKind.CHAT, chunks, USAGE)
    assert body is not None
    message = body["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city":"Paris"}'}}]
    # And back: the replayed stream assembles into the same answer.
    again = assemble(RequestKind.CHAT, [c.data for c in chunks_of(RequestKind.CHAT, body, USAGE)],
                     USAGE)
    assert again == body


def test_unfinished_or_unknown_streams_are_not_kept() -> None:
    unfinished = [chunk([{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}])]
    assert assemble(RequestKind.CHAT, unfinished, USAGE) is None
    audio = [chunk([{"index": 0, "delta": {"audio": {"data": "x"}}, "finish_reason": "stop"}])]
    assert assemble(RequestKind.CHAT, audio, USAGE) is None
    assert assemble(RequestKind.CHAT, [], USAGE) is None


def test_replayed_chat_stream_is_shaped_like_openais() -> None:
    body = {"id": "c9", "object": "chat.completion", "created": 7, "model": "m",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "one"},
                 "finish_reason": "stop"},
                {"index": 1, "message": {"role": "assistant", "content": "two"},
                 "finish_reason": "length"}],
            "usage": USAGE.to_openai()}
    chunks = chunks_of(RequestKind.CHAT, body, USAGE)
    assert all(c.data["object"] == "chat.completion.chunk" and c.data["id"] == "c9"
               for c in chunks)
    assert chunks[-1].data["choices"] == [] and chunks[-1].usage == USAGE
    assert [c.usage for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    rebuilt = assemble(RequestKind.CHAT, [c.data for c in chunks], USAGE)
    assert rebuilt is not None
    assert [c["message"]["content"] for c in rebuilt["choices"]] == ["one", "two"]
    assert [c["finish_reason"] for c in rebuilt["choices"]] == ["stop", "length"]


def test_text_completion_round_trip() -> None:
    body = {"id": "cmpl-1", "object": "text_completion", "created": 3, "model": "m",
            "choices": [{"index": 0, "text": "upon a time", "logprobs": None,
                         "finish_reason": "length"}],
            "usage": USAGE.to_openai()}
    chunks = chunks_of(RequestKind.COMPLETION, body, USAGE)
    assert chunks[0].data["object"] == "text_completion"
    assert assemble(RequestKind.COMPLETION, [c.data for c in chunks], USAGE) == body


def test_logprobs_survive_the_round_trip() -> None:
    entry = {"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": []}
    chunks = [
        chunk([{"index": 0, "delta": {"role": "assistant", "content": "Hi"},
                "logprobs": {"content": [entry], "refusal": None}, "finish_reason": None}]),
        chunk([{"index": 0, "delta": {"content": "!"},
                "logprobs": {"content": [{**entry, "token": "!"}], "refusal": None},
                "finish_reason": None}]),
        chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]),
    ]
    body = assemble(RequestKind.CHAT, chunks, USAGE)
    assert body is not None
    kept = body["choices"][0]["logprobs"]
    assert [e["token"] for e in kept["content"]] == ["Hi", "!"]
    replayed = [c.data["choices"][0]["logprobs"] for c in chunks_of(RequestKind.CHAT, body, USAGE)
                if c.data["choices"] and c.data["choices"][0]["logprobs"] is not None]
    assert replayed == [kept]
    text_chunks = [
        {**HEAD, "object": "text_completion", "choices": [{"index": 0, "text": "ab", "logprobs": {
            "tokens": ["a", "b"], "token_logprobs": [None, -1.0],
            "top_logprobs": [None, {"b": -1.0}], "text_offset": [0, 1]}, "finish_reason": None}]},
        {**HEAD, "object": "text_completion", "choices": [{"index": 0, "text": "", "logprobs": None,
                                                           "finish_reason": "length"}]},
    ]
    text_body = assemble(RequestKind.COMPLETION, text_chunks, USAGE)
    assert text_body is not None
    lp = text_body["choices"][0]["logprobs"]
    assert lp["tokens"] == ["a", "b"] and lp["text_offset"] == [0, 1]
    again = chunks_of(RequestKind.COMPLETION, text_body, USAGE)
    assert again[0].data["choices"][0]["logprobs"] == lp


def test_the_stop_string_that_fired_survives_the_round_trip() -> None:
    """A choice a stop string ended keeps `stop_reason` (which string fired: the Anthropic door
    answers `stop_sequence` from it) through assembly and replay, chat and text."""
    chunks = [
        chunk([{"index": 0, "delta": {"role": "assistant", "content": "Paris"},
                "finish_reason": None}]),
        chunk([{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": "\n\n"}]),
    ]
    body = assemble(RequestKind.CHAT, chunks, USAGE)
    assert body is not None
    assert body["choices"][0]["stop_reason"] == "\n\n"
    replayed = chunks_of(RequestKind.CHAT, body, USAGE)
    finish = [c.data["choices"][0] for c in replayed if c.data["choices"]][-1]
    assert finish["finish_reason"] == "stop" and finish["stop_reason"] == "\n\n"
    assert assemble(RequestKind.CHAT, [c.data for c in replayed], USAGE) == body

    text = {"id": "cmpl-2", "object": "text_completion", "created": 3, "model": "m",
            "choices": [{"index": 0, "text": "once", "logprobs": None,
                         "finish_reason": "stop", "stop_reason": "END"}],
            "usage": USAGE.to_openai()}
    again = assemble(RequestKind.COMPLETION,
                     [c.data for c in chunks_of(RequestKind.COMPLETION, text, USAGE)], USAGE)
    assert again == text
    # A choice no stop string ended carries no stop_reason at all (OpenAI's own shape).
    plain = assemble(RequestKind.CHAT, [chunk([{"index": 0, "delta": {"content": "x"},
                                                "finish_reason": "length"}])], USAGE)
    assert plain is not None and "stop_reason" not in plain["choices"][0]
