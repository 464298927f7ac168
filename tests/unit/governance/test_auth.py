from pathlib import Path

import pytest

from meshnode.errors import AuthenticationError, PermissionDenied
from meshnode.governance.auth import Authenticator, RouteClass, parse_bearer, route_class
from meshnode.governance.keys import KeyStore


def test_parse_bearer() -> None:
    assert parse_bearer("Bearer sk-abc") == "sk-abc"
    assert parse_bearer("bearer   sk-abc  ") == "sk-abc"
    assert parse_bearer("Basic Zm9v") is None
    assert parse_bearer("Bearer ") is None
    assert parse_bearer(None) is None


def test_route_classes() -> None:
    assert route_class("/health/live") is RouteClass.PUBLIC
    assert route_class("/health/ready") is RouteClass.PUBLIC
    assert route_class("/admin/stats") is RouteClass.ADMIN
    assert route_class("/metrics") is RouteClass.ADMIN
    assert route_class("/v1/chat/completions") is RouteClass.KEY
    assert route_class("/nope") is RouteClass.KEY
    assert route_class("/healthz") is RouteClass.KEY


def test_authenticate_and_authorize_without_echoing_the_key(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "k.db")
    store.open()
    _, user = store.create("user", models=["a"])
    _, admin = store.create("root", admin=True)
    auth = Authenticator(store)
    rec = auth.authenticate(f"Bearer {user}")
    assert rec.name == "user"
    with pytest.raises(PermissionDenied):
        auth.authorize(rec, RouteClass.ADMIN)
    auth.authorize(auth.authenticate(f"Bearer {admin}"), RouteClass.ADMIN)
    with pytest.raises(PermissionDenied):
        auth.authorize_model(rec, "b")
    auth.authorize_model(rec, "a")
    for header in (None, "", "Bearer", "Token x", f"Bearer {user}x"):
        with pytest.raises(AuthenticationError) as info:
            auth.authenticate(header)
        assert user not in info.value.message
    store.revoke("user")
    with pytest.raises(AuthenticationError) as info:
        auth.authenticate(f"Bearer {user}")
    assert user[:12] not in info.value.message
