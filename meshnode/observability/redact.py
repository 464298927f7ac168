"""The one redactor: what leaves the process (a log line, an error body) never carries a secret,
and a logged field never carries a control character.

- `redact(text, secrets=())`: masks this provider's own secrets (given), anything key-shaped
  (`sk-...`, `Bearer ...`, `Basic ...`, `api_key=...`-style pairs) and URL userinfo
  (`https://user:pass@host` -> `https://***@host`). Every log line passes through it (the
  formatters in `meshnode.observability.logging`), and every error message and `param` a client
  is shown (`for_client`).
- `for_client(text, secrets=())`: `redact`, control characters replaced by spaces, length
  capped; for upstream error text relayed to a client.
- `escape_controls(text)`: control characters (and Unicode line separators) written as
  `\\n`, `\\x1b`, `\\u2028`..., so a `%0a` in a request path cannot forge a line in the text
  log.

Kept deliberately broad: a false positive costs a masked word; a false negative leaks a
credential.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

MASK = "***"
MAX_CLIENT_CHARS = 500

_KEY_SHAPED = re.compile(r"\b(sk|pk|rk)-[A-Za-z0-9_\-]{8,}")
_AUTH_SCHEME = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]{8,}")
# key=value / "key": "value" pairs whose key names a secret. The value is never the scheme word
# of `Authorization: Bearer ...` (the pattern above masks the token after it): masking "Bearer"
# hid nothing and turned our own 401 hint into "Authorization: *** <API key>".
_SECRET_PAIR = re.compile(
    r"(?i)([\"']?\b[\w\-]*(?:api[_\-]?key|token|secret|password|passwd|authorization)"
    r"[\"']?\s*[:=]\s*[\"']?)(?!(?:bearer|basic)\b)([^\s\"',}]{4,})"
)
# scheme://userinfo@ : whatever stands before the @ of an authority is a credential.
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/?#\s@\"']+@")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# A secret shorter than this would shred the text and protect nothing.
_MIN_SECRET_CHARS = 4


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    """`text` with `secrets` and every secret-looking substring masked."""
    for secret in secrets:
        if len(secret) >= _MIN_SECRET_CHARS:
            text = text.replace(secret, MASK)
    text = _URL_USERINFO.sub(lambda m: m.group(1) + MASK + "@", text)
    text = _KEY_SHAPED.sub(lambda m: m.group(1) + "-" + MASK, text)
    text = _AUTH_SCHEME.sub(lambda m: m.group(1) + " " + MASK, text)
    return _SECRET_PAIR.sub(lambda m: m.group(1) + MASK, text)


def for_client(text: str, secrets: Sequence[str] = ()) -> str:
    """Upstream or error text safe to show a client: redacted, one line, at most
    MAX_CLIENT_CHARS."""
    text = _CONTROL.sub(" ", redact(text, secrets)).strip()
    if len(text) > MAX_CLIENT_CHARS:
        text = text[: MAX_CLIENT_CHARS - 3] + "..."
    return text


def _escape(match: re.Match[str]) -> str:
    char = match.group(0)
    escaped = _ESCAPES.get(char)
    if escaped is not None:
        return escaped
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def escape_controls(text: str) -> str:
    """`text` on one line: every control character written as an escape."""
    return _CONTROL.sub(_escape, text)
