"""Incremental detokenisation and stop sequences, with the real byte-level tokenizer."""

from __future__ import annotations

from typing import Any

import pytest

from meshnode.worker.textstream import TextStream


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from meshnode.worker.builtins import build_byte_tokenizer

    return build_byte_tokenizer(400)


def _run(tokenizer: Any, text: str, stop: tuple[str, ...]) -> tuple[str, str | None]:
    """The text emitted and the stop sequence that ended it (None: it ran to the end)."""
    stream = TextStream(tokenizer, tokenizer.encode("prompt"), stop)
    out = ""
    for token in tokenizer.encode(text):
        out += stream.push(token)
        if stream.stopped:
            assert stream.stop_sequence is not None
            return out, stream.stop_sequence
    assert stream.stop_sequence is None
    return out + stream.flush(), None


def test_deltas_add_up_to_the_text_even_across_utf8_boundaries(tokenizer: Any) -> None:
    text = "héllo wörld — ☃ 日本"
    stream = TextStream(tokenizer, [], ())
    deltas = [stream.push(t) for t in tokenizer.encode(text)]
    assert "".join(deltas) + stream.flush() == text
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize(
    ("text", "stop", "expected", "fired"),
    [
        ("one two. three", (".",), "one two", "."),
        ("one two. three", ("two", "one"), "", "one"),  # the one that starts first
        ("one two. three", ("zz", "two"), "one ", "two"),
        ("say ENDING now", ("ENDING", "END"), "say ", "END"),  # the first to complete
        ("say ENDING now", ("NDING", "ENDING"), "say ", "ENDING"),  # at once: the earlier start
        ("abcabd", ("abd",), "abc", "abd"),
        ("abcab", ("abd",), "abcab", None),  # held-back prefix is released at the end
        ("no stop here", ("zz",), "no stop here", None),
    ],
)
def test_stop_sequences_never_reach_the_client_and_the_fired_one_is_named(
    tokenizer: Any, text: str, stop: tuple[str, ...], expected: str, fired: str | None
) -> None:
    assert _run(tokenizer, text, stop) == (expected, fired)
