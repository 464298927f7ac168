"""meshctl's one way out: blocking HTTP GETs to one node's API, and the exit codes they map to.

meshctl talks HTTP to a node and nothing else. Every failure to get an answer becomes one
`MeshctlError` subclass here, carrying the exit status a script can branch on:

    MeshctlError                 exit 1  the node answered, but with an error (5xx, not JSON)
    ├── NodeUnreachable          exit 3  no answer: refused, timed out, bad address
    ├── AuthRefused              exit 4  401 (no or wrong key) or 403 (not an admin key)
    └── NotFound                 exit 5  404: an unknown model, or a route this node lacks
                                         (no /admin/mesh when mesh.enabled is false)

Exit 0 is success and 2 bad usage (argparse's own). Blocking urllib on purpose: meshctl is a
short-lived CLI, one request at a time (`top` polls once a second); no event loop is needed.
"""

from __future__ import annotations

import enum
import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class ExitCode(enum.IntEnum):
    OK = 0
    NODE_ERROR = 1
    USAGE = 2
    UNREACHABLE = 3
    AUTH_REFUSED = 4
    NOT_FOUND = 5


EXIT_CODES_HELP = (
    "exit status: 0 ok, 1 the node answered an error, 2 bad usage, 3 node unreachable, "
    "4 auth refused (401/403: missing, wrong or non-admin key), 5 not found (unknown model, "
    "or the node lacks the route)"
)


class MeshctlError(Exception):
    """The node answered, but not with what was asked (5xx, a body that is not JSON)."""

    exit_code: ExitCode = ExitCode.NODE_ERROR


class NodeUnreachable(MeshctlError):
    """No HTTP answer at all: connection refused, timeout, unresolvable name, bad URL."""

    exit_code = ExitCode.UNREACHABLE


class AuthRefused(MeshctlError):
    """401 (no key, wrong or revoked key) or 403 (a valid key that is not an admin key)."""

    exit_code = ExitCode.AUTH_REFUSED


class NotFound(MeshctlError):
    """404: an unknown model (`route`), or a route the node does not serve."""

    exit_code = ExitCode.NOT_FOUND


class NodeClient:
    """GETs JSON from one node, with the admin key as a Bearer token when given."""

    def __init__(self, node: str, api_key: str | None = None, timeout_s: float = 10.0) -> None:
        self.node = node.rstrip("/")
        if "://" not in self.node:
            # `--node 127.0.0.1:8080` is what people type; http is what nodes speak.
            self.node = "http://" + self.node
        self.api_key = api_key
        self.timeout_s = timeout_s

    def get(self, path: str, query: dict[str, str] | None = None) -> Any:
        url = self.node + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        request = urllib.request.Request(url, method="GET")
        request.add_header("Accept", "application/json")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise _http_error(self.node + path, exc) from None
        except http.client.HTTPException as exc:
            raise NodeUnreachable(_not_http(self.node, exc)) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise NodeUnreachable(f"{self.node}: cannot reach the node ({reason})") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise MeshctlError(f"{url}: the answer is not JSON") from None


def _not_http(node: str, exc: http.client.HTTPException) -> str:
    """What answered was not HTTP/1.1. A gRPC server (a node's mesh port) answers an HTTP/1.1
    request with HTTP/2 frames: a SETTINGS frame first (type 0x04), which http.client reads as
    a garbled status line."""
    line = exc.args[0] if exc.args else ""
    if isinstance(line, str) and ("\x04" in line[:9] or line.startswith("\x00\x00")):
        return (f"{node}: this is a gRPC port (it answered with HTTP/2 frames, as a node's "
                "mesh.listen_addr does), not the HTTP API: meshctl talks to server.listen_addr "
                "(port 8080 by default)")
    return f"{node}: cannot reach the node (what answered is not HTTP: {type(exc).__name__})"


def _http_error(where: str, exc: urllib.error.HTTPError) -> MeshctlError:
    detail = ""
    try:
        body = json.loads(exc.read())
        detail = str(body.get("error", {}).get("message", ""))
    except (ValueError, AttributeError, OSError):
        pass
    message = f"{where}: HTTP {exc.code} {detail}".rstrip()
    if exc.code in (401, 403):
        hint = " (pass an admin key with --api-key or MESHNODE_API_KEY)"
        return AuthRefused(message + hint)
    if exc.code == 404:
        return NotFound(message)
    return MeshctlError(message)
