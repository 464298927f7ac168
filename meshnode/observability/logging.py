"""Structured logs: one formatter for `json` or `text`, secret redaction, the request log line.

This module owns how meshnode writes logs (to stderr) and the one line per request
(`log_request`). Redaction runs on every formatted line, whoever logged it: anything that looks
like an API key, a bearer token or a `secret=...` pair is masked before it leaves the process.
It must not decide what is logged elsewhere; components log through `logging.getLogger(__name__)`.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any, TextIO

import orjson

REQUEST_LOGGER = "meshnode.request"

# Secret-looking things. Kept deliberately broad: a false positive costs a masked log word; a
# false negative leaks a credential.
_SECRET_PATTERNS = (
    # OpenAI/Anthropic/Together style keys: sk-..., sk-ant-..., and similar prefixed tokens.
    re.compile(r"\b(sk|pk|rk)-[A-Za-z0-9_\-]{8,}"),
    # Authorization headers.
    re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]{8,}"),
    # key=value / "key": "value" pairs whose key names a secret. The value is never the scheme
    # word of `Authorization: Bearer ...` (the pattern above masks the token after it): masking
    # "Bearer" hid nothing and turned our own 401 hint into "Authorization: *** <API key>".
    re.compile(
        r"(?i)([\"']?\b[\w\-]*(?:api[_\-]?key|token|secret|password|passwd|authorization)"
        r"[\"']?\s*[:=]\s*[\"']?)(?!(?:bearer|basic)\b)([^\s\"',}]{4,})"
    ),
)
MASK = "***"


def redact(text: str) -> str:
    """`text` with every secret-looking substring masked."""
    text = _SECRET_PATTERNS[0].sub(lambda m: m.group(1) + "-" + MASK, text)
    text = _SECRET_PATTERNS[1].sub(lambda m: m.group(1) + " " + MASK, text)
    return _SECRET_PATTERNS[2].sub(lambda m: m.group(1) + MASK, text)


# Attributes every LogRecord has; anything else was passed with `extra=` and is a field.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RESERVED}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        line = orjson.dumps(out, default=str).decode()
        return redact(line)


class TextFormatter(logging.Formatter):
    """Human-readable: `time level logger: msg key=value ...`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        # Empty fields are noise for a reader; the JSON format keeps every field, always.
        fields = {k: v for k, v in _fields(record).items() if v is not None}
        if fields:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        return redact(line)


def _text_value(value: Any) -> str:
    if isinstance(value, str):
        return value if value and " " not in value else orjson.dumps(value).decode()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return orjson.dumps(value, default=str).decode()
    return str(value)


def configure_logging(
    fmt: str = "text", level: str = "info", stream: TextIO | None = None
) -> None:
    """Install one stderr handler on the root logger with the chosen format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's own access log would duplicate our request line.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


_request_log = logging.getLogger(REQUEST_LOGGER)


def log_request(
    *,
    request_id: str,
    method: str,
    path: str,
    status: int,
    started: float,
    model: str | None = None,
    provider: str | None = None,
    node: str | None = None,
    attempts: int = 0,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    cost: float = 0.0,
    stream: bool = False,
    error: str | None = None,
    key: str | None = None,
) -> None:
    """The one line per request. `started` is a `time.perf_counter()` value. `key` is the API
    key's name (never the key or its hash)."""
    if not _request_log.isEnabledFor(logging.INFO):
        return
    latency_ms = (time.perf_counter() - started) * 1000.0
    _request_log.info(
        "%s %s %d",
        method,
        path,
        status,
        extra={
            "request_id": request_id,
            "key": key,
            "status": status,
            "model": model,
            "provider": provider,
            "node": node,
            "attempts": attempts,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "cost": round(cost, 8),
            "latency_ms": round(latency_ms, 3),
            "stream": stream,
            "error": error,
        },
    )
