"""protobuf <-> domain conversion for the mesh protocol. The only module that reads or builds
`mesh_pb2` messages besides the generated code; everything else passes domain types.

Bounds (hostile or broken peers): strings and lists coming from a peer are cut to sane sizes
here, so a peer cannot make a node hold unbounded state; numbers are clamped to finite ranges (a
claimed infinite capacity, a NaN price or latency never reaches routing: a NaN price reads as the
highest, a NaN latency as unknown); incarnations and state versions above 2**62 are dropped (membership refuses a suspicion at
2**62 itself, so a refutation always fits). A message
carries at most 256 records and a digest of at most 4,096 entries; the rest is ignored.
Counters, blobs and oversized blobs cut from a peer's state are counted in `DROPPED` by reason
(the mesh service turns them into `meshnode_gossip_dropped_total`) and logged, the first of
each reason at warning: a cut record is never silent.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import time
from typing import Any

import msgpack

from meshnode.errors import (
    AuthenticationError,
    BudgetExceeded,
    DeadlineExceeded,
    InvalidRequest,
    MeshError,
    ModelNotFound,
    NoCapacity,
    PermissionDenied,
    RateLimited,
    StreamBroken,
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from meshnode.mesh.state import (
    MAX_INCARNATION,
    PROTOCOL_VERSION,
    CapacityAd,
    DigestEntry,
    GossipRecord,
    LatencyAd,
    MemberStatus,
    MemberUpdate,
    ModelAd,
    NodeState,
)
from meshnode.mesh.transport import Ack, GossipMessage, GossipReply, Probe
from meshnode.routing import prefix
from meshnode.rpc.caller import CallerClaim
from meshnode.rpc.generated import mesh_pb2 as pb
from meshnode.types import InferenceRequest, PolicyConstraint, RequestKind, Usage

MAX_ID = 256
MAX_MODELS = 512
MAX_COUNTERS = 64
MAX_BLOBS = 16
MAX_BLOB_BYTES = 64 * 1024
MAX_RECORDS = 256  # records per gossip message (Membership's max_records_per_message)
MAX_DIGEST = 4096  # digest entries per message (Membership's max_members)
MAX_COUNTER = MAX_INCARNATION  # incarnations and state versions (uint64 on the wire)
MAX_PRICE = 1_000_000.0  # USD per 1k tokens
MAX_SLOTS = 65_536
MAX_QUEUE = 1_000_000
MAX_TOKENS_PER_S = 10_000_000.0
MAX_LATENCY_MS = 3_600_000.0
MAX_COUNTER_VALUE = 1e15

_KINDS = {k.value: k for k in RequestKind}
log = logging.getLogger(__name__)
# What decoding cut from peers' states, by reason (process-wide; read by the mesh service).
DROPPED: collections.Counter[str] = collections.Counter()


def _dropped(reason: str, n: int, node: str) -> None:
    first = DROPPED[reason] == 0
    DROPPED[reason] += n
    log.log(logging.WARNING if first else logging.DEBUG,
            "mesh: dropped %d gossiped entr(ies) from %s's state (%s)", n, node, reason)


def _cut(text: str, limit: int = MAX_ID) -> str:
    return text[:limit]


def clamp(value: float, low: float, high: float, nan: float) -> float:
    """`value` within [low, high]; `nan` when it is not a number (infinities clamp)."""
    if math.isnan(value):
        return nan
    return min(high, max(low, value))


# ------------------------------------------------------------------------------ msgpack
def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


# ------------------------------------------------------------------------------ gossip
def member_to_pb(u: MemberUpdate) -> pb.MemberUpdate:
    return pb.MemberUpdate(
        node_id=u.node_id, address=u.address, incarnation=u.incarnation,
        status=int(u.status), from_node=u.from_node,  # type: ignore[arg-type]
    )


def member_from_pb(m: pb.MemberUpdate) -> MemberUpdate | None:
    if not m.node_id or m.status not in (1, 2, 3, 4) or m.incarnation > MAX_COUNTER:
        return None
    return MemberUpdate(
        _cut(m.node_id), _cut(m.address), m.incarnation, MemberStatus(m.status), _cut(m.from_node)
    )


def state_to_pb(s: NodeState) -> pb.NodeState:
    return pb.NodeState(
        node_id=s.node_id,
        version=s.version,
        grpc_address=s.grpc_address,
        http_address=s.http_address,
        status=s.status,
        models=[
            pb.ModelAd(
                name=m.name, provider_kind=m.provider_kind, kinds=sorted(k.value for k in m.kinds),
                cost_per_1k_input=m.cost_per_1k_input, cost_per_1k_output=m.cost_per_1k_output,
                max_context_tokens=m.max_context_tokens or 0,
                max_cost_per_1k_input=m.max_cost_per_1k_input or 0.0,
                max_cost_per_1k_output=m.max_cost_per_1k_output or 0.0,
            )
            for m in s.models
        ],
        capacity=pb.CapacityAd(
            slots_total=s.capacity.slots_total, slots_free=s.capacity.slots_free,
            queue_depth=s.capacity.queue_depth, tokens_per_s=s.capacity.tokens_per_s,
            prefix_scheme=s.capacity.prefix_scheme,
            prefix_names=prefix.encode_names(s.capacity.prefix_names),
            prefill_tokens_per_s=s.capacity.prefill_tokens_per_s,
            decode_tokens_per_s=s.capacity.decode_tokens_per_s,
        ),
        latency=[
            pb.LatencyAd(model=la.model, ewma_ms=la.ewma_ms, p95_ms=la.p95_ms, ttft_ms=la.ttft_ms)
            for la in s.latency
        ],
        counters=dict(s.counters),
        protocol_version=s.protocol_version,
        blobs=dict(s.blobs),
        blob_versions=dict(s.blob_versions),
        elided_blobs=list(s.elided),
    )


def _price(value: float) -> float:
    return clamp(value, 0.0, MAX_PRICE, MAX_PRICE)


def _ms(value: float) -> float:
    return clamp(value, 0.0, MAX_LATENCY_MS, 0.0)


def _worst_prices(m: pb.ModelAd) -> dict[str, float | None]:
    """The dearest prices, never below the cheapest (a peer cannot make a caller reserve less
    than the price it routes by); both 0: not given."""
    if m.max_cost_per_1k_input == 0.0 and m.max_cost_per_1k_output == 0.0:
        return {"max_cost_per_1k_input": None, "max_cost_per_1k_output": None}
    return {
        "max_cost_per_1k_input": max(_price(m.max_cost_per_1k_input), _price(m.cost_per_1k_input)),
        "max_cost_per_1k_output": max(_price(m.max_cost_per_1k_output),
                                      _price(m.cost_per_1k_output)),
    }


def state_from_pb(s: pb.NodeState) -> NodeState | None:
    if not s.node_id or s.version > MAX_COUNTER:
        return None
    models = tuple(
        ModelAd(
            name=_cut(m.name),
            provider_kind=_cut(m.provider_kind, 64),
            kinds=frozenset(_KINDS[k] for k in m.kinds[:8] if k in _KINDS),
            cost_per_1k_input=_price(m.cost_per_1k_input),
            cost_per_1k_output=_price(m.cost_per_1k_output),
            max_context_tokens=m.max_context_tokens or None,
            **_worst_prices(m),
        )
        for m in s.models[:MAX_MODELS]
        if m.name
    )
    counters = {
        _cut(k): v
        for k, v in itertools.islice(s.counters.items(), MAX_COUNTERS)
        if math.isfinite(v) and abs(v) <= MAX_COUNTER_VALUE
    }
    if len(s.counters) > MAX_COUNTERS:
        _dropped("too_many_counters", len(s.counters) - MAX_COUNTERS, s.node_id[:MAX_ID])
    blobs = {
        _cut(k): v
        for k, v in itertools.islice(s.blobs.items(), MAX_BLOBS)
        if len(v) <= MAX_BLOB_BYTES
    }
    if len(s.blobs) > MAX_BLOBS:
        _dropped("too_many_blobs", len(s.blobs) - MAX_BLOBS, s.node_id[:MAX_ID])
    oversized = sum(1 for v in itertools.islice(s.blobs.values(), MAX_BLOBS)
                    if len(v) > MAX_BLOB_BYTES)
    if oversized:
        _dropped("oversized_blob", oversized, s.node_id[:MAX_ID])
    return NodeState(
        node_id=_cut(s.node_id),
        version=s.version,
        grpc_address=_cut(s.grpc_address),
        http_address=_cut(s.http_address),
        status=_cut(s.status, 16) or "alive",
        models=models,
        capacity=_capacity(s.capacity),
        latency=tuple(
            LatencyAd(_cut(la.model), _ms(la.ewma_ms), _ms(la.p95_ms), _ms(la.ttft_ms))
            for la in s.latency[:MAX_MODELS]
        ),
        counters=counters,
        protocol_version=s.protocol_version,
        blobs=blobs,
        blob_versions={
            _cut(k): v for k, v in itertools.islice(s.blob_versions.items(), MAX_BLOBS)
            if v <= MAX_COUNTER
        },
        elided=tuple(_cut(n) for n in s.elided_blobs[:MAX_BLOBS]),
    )


def _capacity(c: pb.CapacityAd) -> CapacityAd:
    """A claimed capacity, bounded: free slots never exceed total ones; prefix names only in a
    scheme this node computes too, at most `prefix.MAX_NAMES` of them."""
    total = min(c.slots_total, MAX_SLOTS)
    known = c.prefix_scheme == prefix.SCHEME
    return CapacityAd(
        total, min(c.slots_free, total), min(c.queue_depth, MAX_QUEUE),
        clamp(c.tokens_per_s, 0.0, MAX_TOKENS_PER_S, 0.0),
        prefix_scheme=prefix.SCHEME if known else 0,
        prefix_names=prefix.decode_names(c.prefix_names) if known else (),
        prefill_tokens_per_s=clamp(c.prefill_tokens_per_s, 0.0, MAX_TOKENS_PER_S, 0.0),
        decode_tokens_per_s=clamp(c.decode_tokens_per_s, 0.0, MAX_TOKENS_PER_S, 0.0),
    )


def records_to_pb(records: tuple[GossipRecord, ...] | list[GossipRecord]) -> list[pb.GossipRecord]:
    out = []
    for r in records:
        rec = pb.GossipRecord(member=member_to_pb(r.member))
        if r.state is not None:
            rec.state.CopyFrom(state_to_pb(r.state))
        out.append(rec)
    return out


def records_from_pb(records: Any) -> tuple[GossipRecord, ...]:
    out: list[GossipRecord] = []
    for r in records[:MAX_RECORDS]:
        member = member_from_pb(r.member)
        if member is None:
            continue
        state = state_from_pb(r.state) if r.HasField("state") else None
        if state is not None and state.node_id != member.node_id:
            state = None  # a state travels only with its own member's record
        out.append(GossipRecord(member, state))
    return tuple(out)


def gossip_request_to_pb(m: GossipMessage) -> pb.GossipRequest:
    return pb.GossipRequest(
        protocol_version=PROTOCOL_VERSION,
        from_node=m.from_node,
        digest=[
            pb.DigestEntry(node_id=d.node_id, incarnation=d.incarnation,
                           status=int(d.status),  # type: ignore[arg-type]
                           state_version=d.state_version)
            for d in m.digest
        ],
        records=records_to_pb(m.records),
        join=m.join,
    )


def gossip_request_from_pb(r: pb.GossipRequest) -> GossipMessage:
    digest = tuple(
        DigestEntry(_cut(d.node_id), d.incarnation, MemberStatus(d.status), d.state_version)
        for d in r.digest[:MAX_DIGEST]
        if d.node_id and d.status in (1, 2, 3, 4)
        and d.incarnation <= MAX_COUNTER and d.state_version <= MAX_COUNTER
    )
    return GossipMessage(
        _cut(r.from_node), digest, records_from_pb(r.records), r.join, r.protocol_version
    )


def gossip_reply_to_pb(m: GossipReply) -> pb.GossipResponse:
    return pb.GossipResponse(
        protocol_version=PROTOCOL_VERSION, from_node=m.from_node,
        records=records_to_pb(m.records), wants=list(m.wants),
        want_versions=list(m.want_versions),
    )


def gossip_reply_from_pb(r: pb.GossipResponse) -> GossipReply:
    wants = tuple(_cut(w) for w in r.wants[:MAX_RECORDS])
    versions = tuple(min(v, MAX_COUNTER) for v in r.want_versions[:MAX_RECORDS])
    return GossipReply(
        _cut(r.from_node), records_from_pb(r.records), wants, r.protocol_version,
        versions if len(versions) == len(wants) else (),
    )


def probe_to_pb(p: Probe) -> pb.HealthRequest:
    req = pb.HealthRequest(
        protocol_version=PROTOCOL_VERSION, from_node=p.from_node, seq=p.seq,
        target_node=p.target_node, target_address=p.target_address, timeout_ms=p.timeout_ms,
    )
    if p.about_you is not None:
        req.about_you.CopyFrom(member_to_pb(p.about_you))
    return req


def probe_from_pb(r: pb.HealthRequest) -> Probe:
    about = member_from_pb(r.about_you) if r.HasField("about_you") else None
    return Probe(
        _cut(r.from_node), r.seq, _cut(r.target_node), _cut(r.target_address),
        min(r.timeout_ms, 60_000), about, r.protocol_version,
    )


def ack_to_pb(a: Ack) -> pb.HealthResponse:
    return pb.HealthResponse(
        protocol_version=PROTOCOL_VERSION, node_id=a.node_id, seq=a.seq, ok=a.ok,
        incarnation=a.incarnation,
    )


def ack_from_pb(r: pb.HealthResponse) -> Ack:
    return Ack(_cut(r.node_id), r.seq, r.ok, r.incarnation, r.protocol_version)


# ------------------------------------------------------------------------------ infer
MAX_ALLOW = 64


def policy_to_pb(policy: PolicyConstraint) -> pb.PolicyConstraint:
    msg = pb.PolicyConstraint(
        name=policy.name, restricts_providers=policy.allow is not None,
        allow=list(policy.allow or ()),
    )
    if policy.max_cost_per_1k is not None:
        msg.max_cost_per_1k = policy.max_cost_per_1k
    return msg


def policy_from_pb(msg: pb.PolicyConstraint) -> PolicyConstraint:
    """`allow` None when the origin's rule did not restrict providers; an empty tuple when it
    allowed none. A NaN or negative cap reads as 0 (nothing is cheap enough): the strictest."""
    cap = clamp(msg.max_cost_per_1k, 0.0, MAX_PRICE, 0.0) if msg.HasField("max_cost_per_1k") \
        else None
    allow = tuple(_cut(a, 128) for a in msg.allow[:MAX_ALLOW]) \
        if msg.restricts_providers else None
    return PolicyConstraint(name=_cut(msg.name, 128), allow=allow, max_cost_per_1k=cap)


def caller_to_pb(claim: CallerClaim) -> pb.CallerAssertion:
    msg = pb.CallerAssertion(
        key_name=claim.key_name or "", models_restricted=claim.models is not None,
        models=list(claim.models or ()), reservation_id=claim.reservation_id,
        entry_node=claim.entry_node, callee_node=claim.callee_node,
        request_id=claim.request_id, issued_ms=claim.issued_ms, mac=claim.mac,
    )
    if claim.reserved_usd is not None:
        msg.reserved_usd = claim.reserved_usd
    return msg


def caller_from_pb(msg: pb.CallerAssertion) -> CallerClaim:
    """Bounded like every peer input; a NaN or negative reservation reads as 0 (the strictest
    cap). Verification is `rpc.caller`'s."""
    reserved = clamp(msg.reserved_usd, 0.0, MAX_PRICE, 0.0) \
        if msg.HasField("reserved_usd") else None
    return CallerClaim(
        key_name=_cut(msg.key_name, 128) or None,
        models=tuple(_cut(m) for m in msg.models[:MAX_MODELS]) if msg.models_restricted
        else None,
        reservation_id=msg.reservation_id, reserved_usd=reserved,
        entry_node=_cut(msg.entry_node), callee_node=_cut(msg.callee_node),
        request_id=_cut(msg.request_id), issued_ms=msg.issued_ms, mac=bytes(msg.mac[:64]),
    )


def infer_request_to_pb(
    request: InferenceRequest, visited: tuple[str, ...], origin: str, remaining_s: float,
    caller: CallerClaim | None = None,
) -> pb.InferRequest:
    msg = pb.InferRequest(
        protocol_version=PROTOCOL_VERSION,
        request_id=request.request_id,
        kind=request.kind.value,
        model=request.model,
        body=pack(request.body),
        stream=request.stream,
        include_usage=request.include_usage,
        visited=list(visited),
        deadline_ms=max(1, int(remaining_s * 1000)),
        key_name=request.key_name or "",
        headers=request.headers,
        prompt_tokens_estimate=max(0, request.prompt_tokens_estimate),
        max_output_tokens=request.max_output_tokens or 0,
        origin_node=origin,
    )
    if request.policy is not None:
        msg.policy.CopyFrom(policy_to_pb(request.policy))
    if caller is not None:
        msg.caller.CopyFrom(caller_to_pb(caller))
    return msg


def infer_request_from_pb(
    r: pb.InferRequest, self_id: str, remaining_s: float | None
) -> InferenceRequest:
    """The serving node's request: visited is the caller chain plus this node. `key_name` is
    not read: the key comes only from a verified caller assertion (`rpc.caller`)."""
    kind = _KINDS.get(r.kind)
    if kind is None:
        raise InvalidRequest(f"unknown request kind {r.kind!r}")
    try:
        body = unpack(r.body)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise InvalidRequest("request body is not valid msgpack") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    budget_s = r.deadline_ms / 1000.0 if r.deadline_ms else 30.0
    if remaining_s is not None:
        budget_s = min(budget_s, remaining_s)
    visited = tuple(_cut(v) for v in list(r.visited)[:32])
    if self_id not in visited:
        visited = (*visited, self_id)
    return InferenceRequest(
        kind=kind,
        model=r.model,
        body=body,
        request_id=r.request_id,
        deadline=time.monotonic() + budget_s,
        stream=r.stream,
        include_usage=r.include_usage,
        headers=dict(r.headers),
        visited=visited,
        prompt_tokens_estimate=r.prompt_tokens_estimate,
        max_output_tokens=r.max_output_tokens or None,
        policy=policy_from_pb(r.policy) if r.HasField("policy") else None,
    )


def reported_cost(final: pb.Final) -> float:
    """A peer's charge for a call, bounded (a NaN or negative claim reads as 0; the caller's
    own reservation bounds what it can be billed for it anyway)."""
    return clamp(final.cost, 0.0, MAX_PRICE, 0.0)


def usage_to_pb(u: Usage) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, estimated=u.estimated,
        cached_tokens=u.cached_tokens,
    )


def usage_from_pb(u: pb.Usage) -> Usage:
    # A peer cannot claim more cached tokens than the prompt had.
    return Usage(u.prompt_tokens, u.completion_tokens, u.estimated,
                 cached_tokens=min(u.cached_tokens, u.prompt_tokens))


# ------------------------------------------------------------------------------ errors
# Errors a peer reports that say nothing against trying another candidate.
_RETRYABLE_ELSEWHERE = (UpstreamError, NoCapacity, ModelNotFound)


def error_to_pb(exc: MeshError, node: str) -> pb.Error:
    """A failure on the serving node. `retryable`: whether the caller may try elsewhere."""
    retryable = isinstance(exc, _RETRYABLE_ELSEWHERE) and (
        exc.retryable or isinstance(exc, NoCapacity | ModelNotFound)
    )
    error_type, code = exc.error_type, exc.code
    if exc.upstream_wire is not None and not retryable:
        # The caller turns a final 4xx it does not know into InvalidRequest with this code:
        # an upstream's own code (context_length_exceeded) reaches the client through a peer.
        error_type, code = exc.upstream_wire
    return pb.Error(
        type=error_type, code=code or "", message=exc.message, param=exc.param or "",
        status=exc.status, retryable=retryable, retry_after=exc.retry_after or 0.0, node=node,
    )


_BY_CODE: dict[str, type[MeshError]] = {
    # The serving node's own refusals of the caller keep their meaning for the client.
    "invalid_api_key": AuthenticationError,
    "permission_denied": PermissionDenied,
    "caller_assertion_invalid": PermissionDenied,
    "rate_limit_exceeded": RateLimited,
    "budget_exceeded": BudgetExceeded,
    "upstream_timeout": UpstreamTimeout,
    "upstream_rate_limited": UpstreamRateLimited,
    "upstream_bad_request": UpstreamBadRequest,
    "upstream_auth_error": UpstreamAuthError,
    "deadline_exceeded": DeadlineExceeded,
    "model_not_found": UpstreamUnavailable,
}


def error_from_pb(e: pb.Error, provider: str, *, after_first_chunk: bool) -> MeshError:
    """The caller's view of a peer's error. Retryable ones become `UpstreamUnavailable` (or
    their own retryable class); the rest keep their meaning for the client."""
    node = e.node or "peer"
    message = f"{node}: {e.message}" if e.message else f"{node}: {e.code or 'error'}"
    retry_after = e.retry_after or None
    if after_first_chunk:
        return StreamBroken(message, provider=provider)
    cls = _BY_CODE.get(e.code)
    if e.retryable:
        if cls is None or not cls.retryable:
            cls = UpstreamUnavailable
        return cls(message, provider=provider, retry_after=retry_after)
    if cls is not None and not cls.retryable:
        return cls(message, provider=provider, retry_after=retry_after)
    if 400 <= e.status < 500 and e.status not in (408, 429):
        err = InvalidRequest(message, param=e.param or None, provider=provider)
        err.code = e.code or None
        return err
    # A non-retryable failure of a kind we do not know: keep it non-retryable.
    return UpstreamBadRequest(message, provider=provider) if e.status == 400 else _Final(
        message, provider=provider
    )


class _Final(UpstreamError):
    """A peer's failure that it said must not be retried elsewhere."""

    retryable = False
