"""Caller assertions: what an entry node states about a forwarded request's caller, signed, and
the serving node's check of it (docs/security.md, "Forwarded requests").

`CallerAuthority` is built once per node from its mesh security:
- `claim(request, callee, key_models)` -> the `CallerClaim` to send: the key name, the key's model
  scope, the budget held for this attempt (`request.held`), entry and callee ids, the request id,
  the issue time and a MAC;
- `verify(claim, request)` -> the `Caller` to serve as, or None (no claim, or a mesh where a claim
  proves nothing); raises `CallerRefused` when a claim is forged, stale, or meant for another node.

MAC: HMAC-SHA256 with a key derived from the mesh key (`MeshAuth.derive`), over a canonical
msgpack of every field. On an mTLS-only mesh there is no shared key: the channel (a certificate
from the mesh CA) vouches for the claim, which is then checked for its callee and request id
only. On an unauthenticated mesh anybody could write any claim: it is ignored, the request is
anonymous. It must not touch keys, limits or budgets: that is `governance.forwarded`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgpack

from meshnode.errors import PermissionDenied
from meshnode.rpc.auth import DEFAULT_SKEW_S, MeshAuth
from meshnode.types import Caller, InferenceRequest

LABEL = b"meshnode caller assertion v1"


class CallerRefused(PermissionDenied):
    """A caller assertion that does not verify (never retried elsewhere: it is not the
    serving node's state that is wrong, the request is)."""

    code = "caller_assertion_invalid"


@dataclass(frozen=True, slots=True)
class CallerClaim:
    """A caller assertion as it travels (`InferRequest.caller`), not yet verified."""

    key_name: str | None
    models: tuple[str, ...] | None
    reservation_id: int
    reserved_usd: float | None
    entry_node: str
    callee_node: str
    request_id: str
    issued_ms: int
    mac: bytes = b""

    def signed_bytes(self) -> bytes:
        return bytes(msgpack.packb(
            [self.key_name, None if self.models is None else list(self.models),
             self.reservation_id, self.reserved_usd, self.entry_node, self.callee_node,
             self.request_id, self.issued_ms],
            use_bin_type=True,
        ))


class CallerAuthority:
    def __init__(
        self,
        node_id: str,
        auth: MeshAuth | None,
        authenticated: bool,
        *,
        clock: Callable[[], float] = time.time,
        skew_s: float = DEFAULT_SKEW_S,
    ) -> None:
        self.node_id = node_id
        self._key = auth.derive(LABEL) if auth is not None else None
        # Whether a claim means anything here (a secret or mTLS).
        self.authenticated = authenticated
        self._clock = clock
        self._skew_ms = int(skew_s * 1000)

    def _mac(self, claim: CallerClaim) -> bytes:
        assert self._key is not None
        return hmac.new(self._key, claim.signed_bytes(), hashlib.sha256).digest()

    def claim(
        self, request: InferenceRequest, callee: str, key_models: tuple[str, ...] | None
    ) -> CallerClaim:
        """The assertion for one attempt at `callee`. A request this node was forwarded passes
        on the caller it verified (its key and scope), with this node's own hold."""
        caller = request.caller
        key = caller.key_name if caller is not None else request.key_name
        models = caller.models if caller is not None else key_models
        held = request.held
        claim = CallerClaim(
            key_name=key, models=models,
            reservation_id=held.reservation_id if held is not None else 0,
            reserved_usd=held.amount if held is not None else None,
            entry_node=self.node_id, callee_node=callee, request_id=request.request_id,
            issued_ms=int(self._clock() * 1000),
        )
        if self._key is None:
            return claim
        return dataclasses.replace(claim, mac=self._mac(claim))

    def verify(self, claim: CallerClaim | None, request: InferenceRequest) -> Caller | None:
        if claim is None or not self.authenticated:
            return None
        if self._key is not None and not hmac.compare_digest(claim.mac, self._mac(claim)):
            raise CallerRefused("the caller assertion's MAC does not verify")
        if claim.callee_node != self.node_id:
            raise CallerRefused(
                f"the caller assertion is for node {claim.callee_node!r}, not this one")
        if claim.request_id != request.request_id:
            raise CallerRefused("the caller assertion is for another request")
        if abs(int(self._clock() * 1000) - claim.issued_ms) > self._skew_ms:
            raise CallerRefused("the caller assertion is stale")
        return Caller(
            key_name=claim.key_name, models=claim.models, entry_node=claim.entry_node,
            reservation_id=claim.reservation_id, reserved_usd=claim.reserved_usd,
        )

