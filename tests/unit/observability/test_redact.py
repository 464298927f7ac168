"""Redaction masks credentials, not the words around them: our own 401 hint must stay readable."""

from __future__ import annotations

import pytest

from meshnode.observability.logging import redact


def test_the_auth_hint_is_left_readable() -> None:
    hint = "You didn't provide an API key. Send it as 'Authorization: Bearer <API key>'."
    assert redact(hint) == hint


@pytest.mark.parametrize("text, secret", [
    ("Authorization: Bearer abcdefghijkl", "abcdefghijkl"),
    ('"authorization": "Bearer xyzxyzxyzxyz"', "xyzxyzxyzxyz"),
    ("authorization: Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
    ("Authorization: abcdefghijk", "abcdefghijk"),
    ("api_key=bearer1234567", "bearer1234567"),
    ("x-api-key: sk-ant-0123456789abcdef", "0123456789abcdef"),
])
def test_credentials_are_still_masked(text: str, secret: str) -> None:
    out = redact(text)
    assert secret not in out and "***" in out


def test_text_lines_leave_out_empty_fields_json_keeps_them() -> None:
    import json
    import logging

    from meshnode.observability.logging import JsonFormatter, TextFormatter

    record = logging.LogRecord("meshnode.request", logging.INFO, __file__, 1, "POST /v1/x 200",
                               None, None)
    record.__dict__.update({"model": "m", "key": None, "error": None})
    text = TextFormatter().format(record)
    assert "model=m" in text and "key=" not in text and "error=" not in text
    parsed = json.loads(JsonFormatter().format(record))
    assert parsed["key"] is None and parsed["error"] is None and parsed["model"] == "m"
