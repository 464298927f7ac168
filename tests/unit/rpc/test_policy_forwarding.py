"""A forwarded request carries the origin's policy constraints (docs/policies.md §3): the proto
`PolicyConstraint` on `InferRequest` round-trips to `InferenceRequest.policy`, keeping the
difference between "no allow list" and "an empty one", and reaches the serving node's router."""

from __future__ import annotations

import math
import time
import uuid

import pytest

from meshnode.rpc import convert
from meshnode.rpc.generated import mesh_pb2 as pb
from meshnode.types import InferenceRequest, PolicyConstraint, RequestKind


def request(policy: PolicyConstraint | None) -> InferenceRequest:
    return InferenceRequest(kind=RequestKind.CHAT, model="m", body={"model": "m"},
                            request_id=uuid.uuid4().hex, deadline=time.monotonic() + 5,
                            policy=policy)


@pytest.mark.parametrize("policy", [
    PolicyConstraint("pii-stays-home", allow=("local", "mesh"), max_cost_per_1k=0.002),
    PolicyConstraint("unrestricted", allow=None, max_cost_per_1k=None),
    PolicyConstraint("nothing-allowed", allow=(), max_cost_per_1k=0.0),
    None,
])
def test_policy_round_trips(policy: PolicyConstraint | None) -> None:
    wire = convert.infer_request_to_pb(request(policy), ("a",), "a", 5.0)
    parsed = pb.InferRequest.FromString(wire.SerializeToString())
    assert parsed.HasField("policy") is (policy is not None)
    back = convert.infer_request_from_pb(parsed, "b", None)
    assert back.policy == policy


def test_hostile_policy_values_are_the_strictest() -> None:
    msg = pb.InferRequest(kind="chat", model="m", body=convert.pack({"model": "m"}),
                          policy=pb.PolicyConstraint(name="x" * 1000, restricts_providers=True,
                                                     allow=["p"] * 1000, max_cost_per_1k=math.nan))
    got = convert.infer_request_from_pb(msg, "b", None).policy
    assert got is not None
    assert got.max_cost_per_1k == 0.0 and len(got.allow or ()) == convert.MAX_ALLOW
    assert len(got.name) == 128


@pytest.mark.timeout(60)
async def test_policy_reaches_the_serving_node() -> None:
    from tests.unit.rpc.test_forwarding import Pair

    pair = Pair()
    await pair.start()
    try:
        policy = PolicyConstraint("pii-stays-home", allow=("fakeai", "mesh"),
                                  max_cost_per_1k=5.0)
        routed = await pair.router_a.complete(request(policy))
        assert routed.served.node == "node-b"
        assert pair.fake.calls[-1].policy == policy
    finally:
        await pair.stop()
