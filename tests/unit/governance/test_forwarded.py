"""The serving node's checks on a forwarded request (governance/forwarded.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from meshnode.config import AuthConfig, BudgetConfig, KeyConfig
from meshnode.errors import AuthenticationError, MeshError, PermissionDenied, RateLimited
from meshnode.governance.forwarded import ForwardedAdmission, ForwardRefused
from meshnode.governance.keys import hash_secret
from meshnode.governance.service import Governance
from meshnode.types import Caller, InferenceRequest, RequestKind


def gov(tmp_path: Path, auth: bool = True) -> Governance:
    keys = [KeyConfig(name="ci", key_sha256=hash_secret("sk-ci")),
            KeyConfig(name="narrow", key_sha256=hash_secret("sk-n"), models=["other"]),
            KeyConfig(name="slow", key_sha256=hash_secret("sk-s"), rpm=1)]
    g = Governance(AuthConfig(enabled=auth, keys=keys), BudgetConfig(), tmp_path, "b")
    g.open()
    return g


def req(key: str | None = "forged") -> InferenceRequest:
    return InferenceRequest(kind=RequestKind.CHAT, model="m", body={}, request_id="r",
                            deadline=time.monotonic() + 5, key_name=key, visited=("a", "b"))


def caller(key: str | None, models: tuple[str, ...] | None = None) -> Caller:
    return Caller(key_name=key, models=models, entry_node="a")


def test_the_key_comes_only_from_the_verified_caller(tmp_path: Path) -> None:
    admit = ForwardedAdmission("b", gov(tmp_path)).admit
    got = admit(req("forged"), caller("ci"))
    assert got.key_name == "ci" and got.caller == caller("ci")
    # Auth off: served, but anonymous unless a verified caller names a key.
    off = ForwardedAdmission("b", gov(tmp_path / "off", auth=False)).admit
    assert off(req("root"), None).key_name is None
    assert off(req("root"), caller("ci")).key_name == "ci"


@pytest.mark.parametrize(("who", "error", "reason"), [
    (None, ForwardRefused, "no_caller"),
    (caller(None), ForwardRefused, "anonymous"),
    (caller("stranger"), ForwardRefused, "unknown_key"),
    (caller("narrow"), PermissionDenied, "model_scope"),
    (caller("ci", models=("other",)), PermissionDenied, "model_scope"),
])
def test_refusals_name_the_reason_for_the_operator(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, who: Caller | None,
    error: type[MeshError], reason: str,
) -> None:
    admission = ForwardedAdmission("b", gov(tmp_path))
    with caplog.at_level("WARNING"), pytest.raises(error):
        admission.admit(req(), who)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("forwarded request from ") and f"refused ({reason})" in line


def test_a_revocation_here_wins_and_the_rate_limit_here_holds(tmp_path: Path) -> None:
    g = gov(tmp_path)
    _, secret = g.keys.create("gone")
    admission = ForwardedAdmission("b", g)
    assert admission.admit(req(), caller("gone")).key_name == "gone"
    g.keys.revoke("gone")
    with pytest.raises(AuthenticationError):
        admission.admit(req(), caller("gone"))
    admission.admit(req(), caller("slow"))
    with pytest.raises(RateLimited):
        admission.admit(req(), caller("slow"))
