"""The one redactor (meshnode/observability/redact.py): credentials masked, not the words around
them; URL userinfo masked; control characters escaped in every text-log field; upstream error
bodies (message and param) redacted before a client sees them."""

from __future__ import annotations

import json
import logging
import random
import re

import pytest

from meshnode.observability import redact as redact_module
from meshnode.observability.logging import JsonFormatter, TextFormatter
from meshnode.observability.redact import escape_controls, for_client, redact
from meshnode.providers.http import error_for_status

SECRET = "provider-key-0123456789"


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
    ("provider openai at https://admin:hunter2pass@llm.internal:8443/v1", "hunter2pass"),
    ("seed http://bob@10.0.0.2:50051", "bob@"),
])
def test_credentials_are_still_masked(text: str, secret: str) -> None:
    out = redact(text)
    assert secret not in out and "***" in out


def test_userinfo_is_masked_but_the_host_is_kept() -> None:
    assert redact("at https://u:p@host.example:8443/v1 now") == "at https://***@host.example:8443/v1 now"
    assert redact("mail me: ops@example.com") == "mail me: ops@example.com"  # not a URL


def test_text_lines_leave_out_empty_fields_json_keeps_them() -> None:
    record = logging.LogRecord("meshnode.request", logging.INFO, __file__, 1, "POST /v1/x 200",
                               None, None)
    record.__dict__.update({"model": "m", "key": None, "error": None})
    text = TextFormatter().format(record)
    assert "model=m" in text and "key=" not in text and "error=" not in text
    parsed = json.loads(JsonFormatter().format(record))
    assert parsed["key"] is None and parsed["error"] is None and parsed["model"] == "m"


FORGED = "/v1/x\n2026-12-01 00:00:00,000 INFO    meshnode.node: admin logged in"


@pytest.mark.parametrize("where", ["message", "field"])
def test_a_control_character_cannot_forge_a_text_log_line(where: str) -> None:
    if where == "message":
        record = logging.LogRecord("meshnode.request", logging.INFO, __file__, 1,
                                   "POST %s 404", (FORGED,), None)
    else:
        record = logging.LogRecord("meshnode.request", logging.INFO, __file__, 1,
                                   "POST 404", None, None)
        record.__dict__["path"] = FORGED + "\x1b[2J\u2028"
    text = TextFormatter().format(record)
    assert "\n" not in text and "\x1b" not in text and "\u2028" not in text
    assert "/v1/x\\n2026-12-01" in text
    json_line = JsonFormatter().format(record)
    assert "\n" not in json_line and json.loads(json_line)  # JSON escapes by itself


def test_a_traceback_stays_under_its_line() -> None:
    try:
        raise ValueError("boom\nFAKE 2026-12-01 INFO forged")
    except ValueError:
        import sys

        record = logging.LogRecord("meshnode", logging.ERROR, __file__, 1, "failed", None,
                                   sys.exc_info())
    lines = TextFormatter().format(record).splitlines()
    assert lines[0].endswith("failed")
    assert all(line.startswith("    ") for line in lines[1:])
    assert any("FAKE" in line for line in lines[1:])


def test_escape_controls_keeps_text_readable() -> None:
    assert escape_controls("a\tb\r\nc\x00é") == "a\\tb\\r\\nc\\x00é"


def test_for_client_is_one_capped_line() -> None:
    out = for_client(f"bad {SECRET}\nnext\x00" + "x" * 1000, [SECRET])
    assert SECRET not in out and "\n" not in out and "\x00" not in out and len(out) <= 500


@pytest.mark.parametrize("status", [400, 404, 422])
def test_an_upstream_error_param_is_redacted(status: int) -> None:
    body = json.dumps({"error": {"message": f"key {SECRET} is not valid for model",
                                 "param": f"api_key={SECRET}", "type": "invalid_request_error"}})
    error = error_for_status(status, body.encode(), {}, provider="openai", secrets=[SECRET])
    assert SECRET not in error.message
    assert error.param is not None and SECRET not in error.param


def every_pattern(text: str) -> str:
    """The redactor's definition: each pattern applied in turn, wherever it matches."""
    text = redact_module._URL_USERINFO.sub(lambda m: m.group(1) + "***@", text)
    text = redact_module._KEY_SHAPED.sub(lambda m: m.group(1) + "-***", text)
    text = redact_module._AUTH_SCHEME.sub(lambda m: m.group(1) + " ***", text)
    return redact_module._SECRET_PAIR.sub(lambda m: m.group(1) + "***", text)


# Pieces that make the patterns match, almost match, or match through case folding.
PIECES = [
    "api_key", "API-KEY", "apikey", "ApIkEy", "token", "TOKENS", "tok\u212aen", "ſecret",
    "SECRET", "passwd", "Password", "authorıization", "authorization", "AUTHORİZATION",
    "bearer", "Bearer", "BASIC", "baſic", "sk-", "pk-", "rk-", "Sk-", "k-", "://", "https://",
    "@", "user:pass", "=", ":", " = ", " : ", "\u00a0", "\u2003", "\t", "\n", "'", '"', ",",
    "}", "{", "abcdefgh", "12345678", "x", "-", "_", "/", "prompt_tokens=5", "key=ci",
]


def test_the_prefilters_never_skip_a_match() -> None:
    rng = random.Random(20)
    for _ in range(20000):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 12)))
        assert redact(text) == every_pattern(text), text


def test_the_ascii_fold_is_the_one_re_ignorecase_uses() -> None:
    letter = re.compile(r"(?i)[a-z]")
    folded = [chr(c) for c in range(0x80, 0x110000)
              if not 0xD800 <= c <= 0xDFFF and letter.fullmatch(chr(c))]
    assert sorted(folded) == sorted(redact_module._ASCII_FOLD_CHARS)
    for char in folded:
        plain = redact_module._folded(char)
        assert plain.isascii() and re.fullmatch(f"(?i){plain}", char)


def test_escaping_skips_only_lines_without_controls() -> None:
    rng = random.Random(21)
    alphabet = ["a", " ", "\n", "\x1b", "\x7f", "\x9f", "\u2028", "\u2029", "\u00a0", "é", "\t"]
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        assert escape_controls(text) == redact_module._CONTROL.sub(redact_module._escape, text)
