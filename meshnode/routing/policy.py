"""Routing policies: the first rule whose match fits a request decides what may serve it.

Pure: a policy list and a request's facts in, the applying rule (or None) out. A policy's `allow`
names provider names or kinds (`local`, `mesh`, `openai`, ...); nothing outside it is ever tried,
not through failover and not through a peer.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

from meshnode.config import PolicyConfig
from meshnode.types import ModelOffer, PolicyConstraint


def match_policy(
    policies: Sequence[PolicyConfig],
    model: str,
    headers: Mapping[str, str],
    key_name: str | None,
    prompt_tokens: int,
) -> PolicyConfig | None:
    for policy in policies:
        m = policy.match
        if m.model is not None and not fnmatch.fnmatchcase(model, m.model):
            continue
        if m.key is not None and m.key != key_name:
            continue
        if m.min_prompt_tokens is not None and prompt_tokens < m.min_prompt_tokens:
            continue
        if m.header and not all(_header_has(headers, k, v) for k, v in m.header.items()):
            continue
        return policy
    return None


def _header_has(headers: Mapping[str, str], name: str, wanted: str) -> bool:
    """A header matches when one of its comma-separated values equals the wanted one, so
    `x-aiproxy-tags: pii, eu` matches `{x-aiproxy-tags: pii}`."""
    value = headers.get(name.lower())
    if value is None:
        return False
    return wanted.strip().lower() in {v.strip().lower() for v in value.split(",")}


def allows(policy: PolicyConfig | None, offer: ModelOffer) -> bool:
    if policy is None:
        return True
    return _permits(policy.allow, policy.max_cost_per_1k, offer)


def _permits(allow: Sequence[str] | None, max_cost_per_1k: float | None,
             offer: ModelOffer) -> bool:
    if allow is not None and not (offer.provider in allow or offer.provider_kind in allow):
        return False
    if max_cost_per_1k is not None:
        return max(offer.cost_per_1k_input, offer.cost_per_1k_output) <= max_cost_per_1k
    return True


def constraint_allows(constraint: PolicyConstraint | None, offer: ModelOffer) -> bool:
    """The same test as `allows`, for constraints that arrived with a forwarded request."""
    if constraint is None:
        return True
    return _permits(constraint.allow, constraint.max_cost_per_1k, offer)


def carried_constraint(
    policy: PolicyConfig | None, incoming: PolicyConstraint | None
) -> PolicyConstraint | None:
    """What a request forwarded from here must carry: this node's matched rule merged with the
    one it arrived with (allowed providers intersected, the smaller price cap), so a peer can
    only narrow what the origin allowed, never widen it."""
    if policy is None:
        return incoming
    own = PolicyConstraint(
        name=policy.name,
        allow=tuple(policy.allow) if policy.allow is not None else None,
        max_cost_per_1k=policy.max_cost_per_1k,
    )
    if incoming is None:
        return own
    if own.allow is None:
        allow = incoming.allow
    elif incoming.allow is None:
        allow = own.allow
    else:
        allow = tuple(a for a in incoming.allow if a in own.allow)
    caps = [c for c in (own.max_cost_per_1k, incoming.max_cost_per_1k) if c is not None]
    return PolicyConstraint(
        name=incoming.name, allow=allow, max_cost_per_1k=min(caps) if caps else None
    )
