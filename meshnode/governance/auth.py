"""Authentication and authorization decisions: Bearer parsing, route classes, model allow-lists.

Route classes (when `auth.enabled`):
- public: `/health/*` (load balancers and orchestrators probe without a key);
  `/dashboard` and its assets too: a static shell without data (a browser cannot send a
  Bearer token on a page load); the page reads `/admin/*` with an admin key;
- admin: `/admin/*` and `/metrics`: an admin key only (403 for another valid key);
- everything else (`/v1/*`, and unknown paths, so that a 404 does not tell a stranger what
  exists): any valid key (401 without one).

Errors never quote the presented key, its hash or the header: only what was wrong with it.
Pure decisions over a `KeyStore`; the aiohttp side is `governance.http`.
"""

from __future__ import annotations

import enum

from meshnode.errors import AuthenticationError, PermissionDenied
from meshnode.governance.keys import KeyRecord, KeyStore


class RouteClass(enum.Enum):
    PUBLIC = "public"
    KEY = "key"
    ADMIN = "admin"


def route_class(path: str) -> RouteClass:
    if path.startswith("/health/") or path == "/dashboard" or path.startswith("/dashboard/"):
        return RouteClass.PUBLIC
    if path.startswith("/admin/") or path == "/admin" or path == "/metrics":
        return RouteClass.ADMIN
    return RouteClass.KEY


def parse_bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or None


class Authenticator:
    def __init__(self, store: KeyStore) -> None:
        self._store = store

    def authenticate(self, authorization: str | None) -> KeyRecord:
        """The live key behind the header, or AuthenticationError (401)."""
        token = parse_bearer(authorization)
        if token is None:
            if authorization:
                raise AuthenticationError(
                    "The Authorization header must be 'Bearer <API key>'."
                )
            raise AuthenticationError(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <API key>' "
                "(Anthropic clients: 'x-api-key: <API key>')."
            )
        record = self._store.lookup(token)
        if record is None:
            # One message for unknown and revoked keys: which one it was is no one's business.
            raise AuthenticationError("Incorrect or revoked API key provided.")
        return record

    @staticmethod
    def authorize(record: KeyRecord, route: RouteClass) -> None:
        if route is RouteClass.ADMIN and not record.admin:
            raise PermissionDenied(
                f"API key '{record.name}' is not an admin key; admin routes need one."
            )

    @staticmethod
    def authorize_model(record: KeyRecord, model: str) -> None:
        if not record.allows_model(model):
            raise PermissionDenied(
                f"API key '{record.name}' may not use the model '{model}'.", param="model"
            )
