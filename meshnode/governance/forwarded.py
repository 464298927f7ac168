"""The serving node's checks on a request a peer forwarded (docs/security.md, step 2 of
"Forwarded requests"), after `rpc.caller` verified who the entry node says it is for.

`ForwardedAdmission.admit(request, caller)` returns the request to route, carrying `caller` and
its key name (the only source of a forwarded request's key: the wire's old `key_name` is never
read), or raises:
- `ForwardRefused` (503, retryable elsewhere): this node has auth on and the request has no
  verified caller or no key, or the key is not known here yet (gossip lag): another candidate,
  or the entry node's own providers, may still serve it;
- `AuthenticationError` (401): the key is revoked in this node's view (its revocation wins);
- `PermissionDenied` (403): the model is outside the key's scope, here or at the entry node;
- `RateLimited` (429): the key's `rpm`/`tpm` on this node.
`done(request, tokens)` takes the answer's real tokens from the key's token bucket.

Budgets are not here: the router reserves a forwarded request through the spend gate like any
other (`governance.gate`: capped by the entry node's reservation, charged to `served:` slots).
Refusals are logged at warning the first time per (entry node, key, reason), then at debug.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from meshnode.errors import AuthenticationError, NoCapacity, PermissionDenied, RateLimited
from meshnode.types import Caller, InferenceRequest

if TYPE_CHECKING:
    from meshnode.governance.service import Governance

log = logging.getLogger(__name__)


class ForwardRefused(NoCapacity):
    """This node will not serve this forwarded request; another candidate may."""

    code = "forwarded_refused"


class ForwardedAdmission:
    def __init__(self, node_id: str, governance: Governance | None) -> None:
        self.node_id = node_id
        self._gov = governance
        self._warned: set[tuple[str, str, str]] = set()

    def _refuse(self, exc: Exception, caller: Caller | None, reason: str) -> Exception:
        entry = caller.entry_node if caller is not None else "?"
        key = (caller.key_name if caller is not None else None) or "-"
        first = (entry, key, reason) not in self._warned
        self._warned.add((entry, key, reason))
        log.log(logging.WARNING if first else logging.DEBUG,
                "forwarded request from %s for key %s refused (%s): %s",
                entry, key, reason, getattr(exc, "message", exc))
        return exc

    def admit(self, request: InferenceRequest, caller: Caller | None) -> InferenceRequest:
        name = caller.key_name if caller is not None else None
        if caller is not None and caller.models is not None and request.model not in caller.models:
            raise self._refuse(PermissionDenied(
                f"API key '{name}' may not use the model '{request.model}' (its scope on "
                f"{caller.entry_node})", param="model"), caller, "model_scope")
        gov = self._gov
        if gov is not None and gov.auth_enabled:
            if caller is None:
                raise self._refuse(ForwardRefused(
                    f"{self.node_id} has auth on and serves forwarded requests only with a "
                    "verified caller (an authenticated mesh: mesh.secret or mesh.tls)",
                    retry_after=1.0), caller, "no_caller")
            if name is None:
                raise self._refuse(ForwardRefused(
                    f"{self.node_id} has auth on and does not serve anonymous requests "
                    f"forwarded by {caller.entry_node} (which has auth off)", retry_after=1.0),
                    caller, "anonymous")
            state = gov.keys.state(name)
            if state == "revoked":
                raise self._refuse(AuthenticationError(
                    f"API key '{name}' is revoked (on {self.node_id})."), caller, "revoked")
            record = gov.keys.get(name)
            if record is None:
                raise self._refuse(ForwardRefused(
                    f"API key '{name}' is not known on {self.node_id} yet", retry_after=1.0),
                    caller, "unknown_key")
            if not record.allows_model(request.model):
                raise self._refuse(PermissionDenied(
                    f"API key '{name}' may not use the model '{request.model}' on "
                    f"{self.node_id}.", param="model"), caller, "model_scope")
            decision = gov.limiter.acquire(name, record.rpm, record.tpm)
            if not decision.allowed:
                per = "requests" if decision.limited_by == "requests" else "tokens"
                limit = decision.limit_requests if per == "requests" else decision.limit_tokens
                raise self._refuse(RateLimited(
                    f"Rate limit reached for API key '{name}' on {self.node_id}: {limit} {per} "
                    f"per minute. Try again in {decision.retry_after_s:.3g}s.",
                    retry_after=decision.retry_after_s), caller, "rate_limited")
        return dataclasses.replace(request, key_name=name, caller=caller)

    def done(self, request: InferenceRequest, tokens: int) -> None:
        gov = self._gov
        name = request.key_name
        if gov is None or not gov.auth_enabled or name is None or request.caller is None:
            return
        record = gov.keys.get(name)
        if record is not None:
            gov.limiter.charge_tokens(name, record.tpm, tokens)
