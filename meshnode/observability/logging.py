"""Structured logs: one formatter for `json` or `text`, and the request log line.

This module owns how meshnode writes logs (to stderr) and the one line per request
(`log_request`). Redaction (`meshnode.observability.redact`, the one redactor) runs on every
formatted line, whoever logged it: anything that looks like an API key, a bearer token, a
`secret=...` pair or URL userinfo is masked before it leaves the process. In the text format
every message and field has its control characters escaped, so client-chosen text (a request
path with `%0a`) cannot forge a line; a traceback's lines are indented under the line that
logged it. JSON strings are escaped by JSON itself.
It must not decide what is logged elsewhere; components log through `logging.getLogger(__name__)`.

In `json` mode every line on stderr is JSON, also those that never pass through Python's
logging: gRPC's C core (and a worker process's stderr) write to file descriptor 2, which
`capture_native_stderr` turns into a pipe read by a thread that logs each line as a record of
the `native` logger (absl's `E1201 12:00:00.1 123 file.cc:83] msg` prefix gives the level);
Python warnings and an uncaught exception become records too.

Two foreign lines are recognised and shortened: a gRPC (HTTP/2) client on the HTTP port (a peer
that seeds the HTTP address) makes aiohttp log a traceback per connection; it becomes one warning
that names the mistake, at most once a minute per client address (`ProtocolMismatchFilter`).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, TextIO

import orjson

from meshnode.observability.redact import escape_controls, redact

REQUEST_LOGGER = "meshnode.request"

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
        record.message = escape_controls(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        # Empty fields are noise for a reader; the JSON format keeps every field, always.
        fields = {k: v for k, v in _fields(record).items() if v is not None}
        if fields:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        if record.exc_info:
            trace = self.formatException(record.exc_info)
            line += "".join("\n    " + escape_controls(t) for t in trace.splitlines())
        if record.stack_info:
            line += "".join("\n    " + escape_controls(t)
                            for t in self.formatStack(record.stack_info).splitlines())
        return redact(line)


def _text_value(value: Any) -> str:
    if isinstance(value, str):
        if value and " " not in value:
            return escape_controls(value)
        # quoted as JSON, which escapes \n and the like; escape_controls catches the rest
        return escape_controls(orjson.dumps(value).decode())
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return orjson.dumps(value, default=str).decode()
    return str(value)


# aiohttp's parser on the HTTP/2 connection preface ("PRI * HTTP/2.0"): a gRPC client.
_H2_PREFACE = ("PRI/Upgrade", "PRI * HTTP/2")
MISMATCH_EVERY_S = 60.0


def is_grpc_on_http(exc: BaseException | None) -> bool:
    """Whether aiohttp's parser refused an HTTP/2 (gRPC) client's preface."""
    return (exc is not None and type(exc).__name__ == "BadHttpMessage"
            and any(mark in str(exc) for mark in _H2_PREFACE))


class ProtocolMismatchFilter(logging.Filter):
    """Turns aiohttp's traceback for a gRPC client on the HTTP port into one warning naming the
    mistake, once a minute per client address; other records pass untouched."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not is_grpc_on_http(exc):
            return True
        peer = str(record.args[0]) if isinstance(record.args, tuple) and record.args else "?"
        now = self._clock()
        if now - self._last.get(peer, -MISMATCH_EVERY_S) < MISMATCH_EVERY_S:
            return False
        if len(self._last) > 1024:
            self._last.clear()
        self._last[peer] = now
        record.msg = (
            "a gRPC (HTTP/2) client at %s called the HTTP API port; peers and mesh seeds must use "
            "the gRPC port (mesh.listen_addr), not server.listen_addr (it was answered 400; "
            "repeats from it are not logged for a minute)"
        )
        record.args = (peer,)
        record.exc_info = None
        record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def configure_logging(
    fmt: str = "text", level: str = "info", stream: TextIO | None = None
) -> None:
    """Install one stderr handler on the root logger with the chosen format."""
    handler = logging.StreamHandler(stream or _log_stream())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's own access log would duplicate our request line.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ProtocolMismatchFilter) for f in server_log.filters):
        server_log.addFilter(ProtocolMismatchFilter())


def log_config_errors(fmt: str, errors: Sequence[str], what: str = "invalid configuration") -> None:
    """A refused config: plain lines (`meshnode: invalid configuration:` then one per error)
    in text mode, one JSON record with the list in json mode."""
    if fmt != "json":
        print(f"meshnode: {what}:", file=sys.stderr)
        for error in errors:
            print(error, file=sys.stderr)
        return
    configure_logging("json")
    logging.getLogger("meshnode").error(
        "%s: %s", what, "; ".join(errors), extra={"errors": list(errors)}
    )


# ------------------------------------------------------------------ native stderr (json mode)
_ABSL = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ([^\]]+)\] (.*)$")
_ABSL_LEVEL = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}
# The local worker process's own text lines: `2026-12-01 21:25:09,106 worker[1671] INFO msg`.
_PYLOG = re.compile(r"^\d{4}-\d\d-\d\d [\d:,.]+ (\S+) (DEBUG|INFO|WARNING|ERROR|CRITICAL) (.*)$")
_original_stderr: TextIO | None = None


def _log_stream() -> TextIO:
    """Where the handler writes: the real stderr, also while fd 2 is captured."""
    return _original_stderr if _original_stderr is not None else sys.stderr


def capture_native_stderr() -> None:
    """Route what is written to fd 2 outside Python's logging (gRPC's C core, child processes)
    through the logging handler. Call before `configure_logging("json")`; idempotent."""
    global _original_stderr
    if _original_stderr is not None:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    _original_stderr = os.fdopen(saved, "w", buffering=1, encoding="utf-8", errors="replace")
    # Python-level writes bypass the pipe: a handler that cannot write reports it on
    # sys.stderr, which through the pipe would feed the pump the same failure for ever.
    # Warnings go through logging instead, so they are JSON too.
    sys.stderr = _original_stderr
    logging.captureWarnings(True)
    # An uncaught exception (a bug) is one JSON record with its traceback, not plain lines.
    sys.excepthook = lambda kind, exc, tb: logging.getLogger("meshnode").critical(
        "uncaught exception: %s", exc, exc_info=(kind, exc, tb))
    native = logging.getLogger("native")
    thread = threading.Thread(target=_pump, args=(read_fd, native), name="stderr-pump",
                              daemon=True)
    thread.start()

    def restore() -> None:
        # Point fd 2 back at the real stderr: the pipe's last writer closes, the pump drains.
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)
        thread.join(timeout=2.0)

    atexit.register(restore)


def _pump(read_fd: int, logger: logging.Logger) -> None:
    with os.fdopen(read_fd, "rb") as pipe:
        for raw in pipe:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if not line.strip():
                continue
            match = _ABSL.match(line)
            if match:
                logger.log(_ABSL_LEVEL[match.group(1)], "%s", match.group(3),
                           extra={"source": match.group(2)})
                continue
            match = _PYLOG.match(line)
            if match:
                level = logging.getLevelNamesMapping()[match.group(2)]
                logger.log(level, "%s", match.group(3),
                           extra={"source": match.group(1)})
                continue
            logger.warning("%s", line)


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
