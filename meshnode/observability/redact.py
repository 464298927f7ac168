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

Every log line passes here, so each pattern runs only where it can match: a plain substring
test first (`"://"` and `"@"` for userinfo, `"k-"` for key shapes, the secret words of the
case-insensitive patterns in the line folded to lower-case ASCII as `re.IGNORECASE` folds it),
then the pattern itself. The tests are necessary conditions of the patterns, so the result is
the patterns' own, at a few microseconds for a line with nothing to mask (the pair pattern
alone costs ~40 µs on a request line).
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
# The non-ASCII letters `re.IGNORECASE` matches to an ASCII letter (Python's `re` docs; a test
# checks it against every code point).
_ASCII_FOLD_CHARS = {"\u0130": "i", "\u0131": "i", "\u017f": "s", "\u212a": "k"}
_ASCII_FOLD = str.maketrans(_ASCII_FOLD_CHARS)
# What _SECRET_PAIR needs: one of its words, then ["']?\s*[:=].
_PAIR_WORDS = ("apikey", "api_key", "api-key", "token", "secret", "password", "passwd",
               "authorization")
_QUOTES = "\"'"


def _folded(text: str) -> str:
    """`text` lower-cased, with every letter `re.IGNORECASE` equates to an ASCII one as that
    ASCII letter: a word the case-insensitive patterns could match is in it, spelled plainly."""
    return text.lower() if text.isascii() else text.translate(_ASCII_FOLD).lower()


def _may_hold_pair(folded: str) -> bool:
    r"""Whether _SECRET_PAIR can match: a secret word followed by ["']?\s*[:=]."""
    n = len(folded)
    for word in _PAIR_WORDS:
        at = folded.find(word)
        while at >= 0:
            i = at + len(word)
            if i < n and folded[i] in _QUOTES:
                i += 1
            while i < n and folded[i].isspace():  # `\s` is str.isspace for str patterns
                i += 1
            if i < n and folded[i] in ":=":
                return True
            at = folded.find(word, at + 1)
    return False


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    """`text` with `secrets` and every secret-looking substring masked."""
    for secret in secrets:
        if len(secret) >= _MIN_SECRET_CHARS:
            text = text.replace(secret, MASK)
    if "://" in text and "@" in text:
        text = _URL_USERINFO.sub(lambda m: m.group(1) + MASK + "@", text)
    if "k-" in text:
        text = _KEY_SHAPED.sub(lambda m: m.group(1) + "-" + MASK, text)
    folded = _folded(text)
    if "bearer" in folded or "basic" in folded:
        text = _AUTH_SCHEME.sub(lambda m: m.group(1) + " " + MASK, text)
        folded = _folded(text)
    if _may_hold_pair(folded):
        text = _SECRET_PAIR.sub(lambda m: m.group(1) + MASK, text)
    return text


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
    if text.isprintable():  # every character _CONTROL names is unprintable
        return text
    return _CONTROL.sub(_escape, text)
