"""The `/admin/mesh` view (SPEC §4): self and every member, as stable JSON.

Shape (documented in docs/mesh.md, read by `meshctl peers|topology --json`):
`{"node": <self id>, "members": [{"id", "self", "addresses": {"grpc", "http"}, "status",
"incarnation", "state_version", "models": [{"name", "provider_kind", "kinds",
"cost_per_1k_input", "cost_per_1k_output"}], "capacity": {...}, "latency": {model: {...}},
"rtt_ms", "last_heard_s"}]}`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meshnode.mesh.membership import MemberInfo


def member_json(
    member: MemberInfo, self_id: str, now: float, rtt_ms: Mapping[str, float]
) -> dict[str, Any]:
    state = member.state
    rtt = rtt_ms.get(member.node_id)
    return {
        "id": member.node_id,
        "self": member.node_id == self_id,
        "addresses": {
            "grpc": member.address,
            "http": state.http_address if state is not None else "",
        },
        "status": member.status.label,
        "node_status": state.status if state is not None else None,
        "incarnation": member.incarnation,
        "state_version": member.state_version,
        "models": [
            {
                "name": m.name,
                "provider_kind": m.provider_kind,
                "kinds": sorted(k.value for k in m.kinds),
                "cost_per_1k_input": m.cost_per_1k_input,
                "cost_per_1k_output": m.cost_per_1k_output,
            }
            for m in (state.models if state is not None else ())
        ],
        "capacity": (
            {
                "slots_total": state.capacity.slots_total,
                "slots_free": state.capacity.slots_free,
                "queue_depth": state.capacity.queue_depth,
                "tokens_per_s": state.capacity.tokens_per_s,
                "prefill_tokens_per_s": state.capacity.prefill_tokens_per_s,
                "decode_tokens_per_s": state.capacity.decode_tokens_per_s,
                # How many prompt-prefix names it gossips (cache_aware routing, policies.md).
                "prefix_names": len(state.capacity.prefix_names),
            }
            if state is not None
            else None
        ),
        "latency": {
            la.model: {"ewma_ms": la.ewma_ms, "p95_ms": la.p95_ms, "ttft_ms": la.ttft_ms}
            for la in (state.latency if state is not None else ())
        },
        "rtt_ms": round(rtt, 3) if rtt is not None else None,
        "last_heard_s": 0.0 if member.node_id == self_id else round(now - member.last_heard, 3),
    }


def mesh_json(
    members: list[MemberInfo], self_id: str, now: float, rtt_ms: Mapping[str, float]
) -> dict[str, Any]:
    ordered = sorted(members, key=lambda m: (m.node_id != self_id, m.node_id))
    return {
        "node": self_id,
        "members": [member_json(m, self_id, now, rtt_ms) for m in ordered],
    }
