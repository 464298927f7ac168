"""Incremental detokenisation and stop sequences, with the real byte-level tokenizer."""

from __future__ import annotations

from typing import Any

import pytest

from meshnode.worker.textstream import TextStream


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from meshnode.worker.builtins import build_byte_tokenizer

    return build_byte_tokenizer(400)


def _run(tokenizer: Any, text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    stream = TextStream(tokenizer, tokenizer.encode("prompt"), stop)
    out = ""
    for token in tokenizer.encode(text):
        out += stream.push(token)
        if stream.stopped:
            return out, True
    return out + stream.flush(), False


def test_deltas_add_up_to_the_text_even_across_utf8_boundaries(tokenizer: Any) -> None:
    text = "héllo wörld — ☃ 日本"
    stream = TextStream(tokenizer, [], ())
    deltas = [stream.push(t) for t in tokenizer.encode(text)]
    assert "".join(deltas) + stream.flush() == text
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize(
    ("text", "stop", "expected", "stopped"),
    [
        ("one two. three", (".",), "one two", True),
        ("one two. three", ("two", "one"), "", True),
        ("abcabd", ("abd",), "abc", True),
        ("abcab", ("abd",), "abcab", False),  # held-back prefix is released at the end
        ("no stop here", ("zz",), "no stop here", False),
    ],
)
def test_stop_sequences_never_reach_the_client(
    tokenizer: Any, text: str, stop: tuple[str, ...], expected: str, stopped: bool
) -> None:
    assert _run(tokenizer, text, stop) == (expected, stopped)
