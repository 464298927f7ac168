"""Caller assertions: signed by the entry node, verified by the serving node (docs/security.md)."""

from __future__ import annotations

import dataclasses
import time

import pytest

from meshnode.rpc import convert
from meshnode.rpc.auth import MeshAuth
from meshnode.rpc.caller import CallerAuthority, CallerRefused
from meshnode.types import BudgetHeld, Caller, InferenceRequest, RequestKind

SECRET = "caller-test-secret"
HELD = BudgetHeld(4, 0.25)


def request(key: str | None = "ci", held: BudgetHeld | None = HELD,
            request_id: str = "r1") -> InferenceRequest:
    return InferenceRequest(kind=RequestKind.CHAT, model="m", body={}, request_id=request_id,
                            deadline=time.monotonic() + 5, key_name=key, held=held)


def authority(node: str, secret: str | None = SECRET, authenticated: bool = True,
              clock: float | None = None) -> CallerAuthority:
    auth = MeshAuth(secret) if secret else None
    return CallerAuthority(node, auth, authenticated,
                           **({"clock": lambda: clock} if clock is not None else {}))


def roundtrip(claim: object) -> object:
    return convert.caller_from_pb(convert.caller_to_pb(claim))  # type: ignore[arg-type]


def test_a_claim_verifies_on_its_callee_with_its_key_scope_and_hold() -> None:
    claim = authority("a").claim(request(), "b", ("m", "n"))
    caller = authority("b").verify(roundtrip(claim), request())  # type: ignore[arg-type]
    assert caller == Caller(key_name="ci", models=("m", "n"), entry_node="a", reservation_id=4,
                            reserved_usd=0.25)
    uncapped = authority("a").claim(request(held=None, key=None), "b", None)
    got = authority("b").verify(roundtrip(uncapped), request())  # type: ignore[arg-type]
    assert got is not None and got.reserved_usd is None and got.key_name is None


@pytest.mark.parametrize("what", ["key", "scope", "hold", "callee", "request", "mac"])
def test_forged_or_misdirected_claims_are_refused(what: str) -> None:
    claim = authority("a").claim(request(), "b", ("m",))
    forged = {
        "key": dataclasses.replace(claim, key_name="root"),
        "scope": dataclasses.replace(claim, models=None),
        "hold": dataclasses.replace(claim, reserved_usd=100.0),
        "callee": claim,  # verified by c, not b
        "request": claim,
        "mac": authority("a", secret="another-mesh").claim(request(), "b", ("m",)),
    }[what]
    verifier = authority("c" if what == "callee" else "b")
    req = request(request_id="r2") if what == "request" else request()
    with pytest.raises(CallerRefused):
        verifier.verify(roundtrip(forged), req)  # type: ignore[arg-type]


def test_a_stale_claim_is_refused_and_an_unauthenticated_mesh_ignores_claims() -> None:
    old = authority("a", clock=time.time() - 120).claim(request(), "b", None)
    with pytest.raises(CallerRefused):
        authority("b").verify(old, request())
    # No secret, no mTLS: anyone could write it, so it vouches for nothing.
    open_claim = authority("a", secret=None, authenticated=False).claim(request(), "b", None)
    assert authority("b", secret=None, authenticated=False).verify(open_claim, request()) is None
    # mTLS only: the channel vouches; the callee and request are still checked.
    mtls = authority("a", secret=None).claim(request(), "b", None)
    assert authority("b", secret=None).verify(mtls, request()) is not None
    with pytest.raises(CallerRefused):
        authority("c", secret=None).verify(mtls, request())


def test_a_re_forwarded_request_passes_on_its_verified_caller_with_its_own_hold() -> None:
    verified = Caller(key_name="ci", models=("m",), entry_node="a", reservation_id=1,
                      reserved_usd=1.0)
    hop = dataclasses.replace(request(key="forged"), caller=verified, held=BudgetHeld(9, 0.5))
    claim = authority("b").claim(hop, "c", None)
    caller = authority("c").verify(claim, hop)
    assert caller == Caller(key_name="ci", models=("m",), entry_node="b", reservation_id=9,
                            reserved_usd=0.5)
