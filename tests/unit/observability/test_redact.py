"""The one redactor (meshnode/observability/redact.py): credentials masked, not the words around
them; URL userinfo masked; control characters escaped in every text-log field; upstream error
bodies (message and param) redacted before a client sees them."""

from __future__ import annotations

import json
import logging

import pytest

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
