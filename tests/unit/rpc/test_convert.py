"""protobuf <-> domain conversions that carry numbers a peer reports."""

from __future__ import annotations

from meshnode.rpc import convert
from meshnode.rpc.generated import mesh_pb2 as pb
from meshnode.types import Usage


def test_usage_carries_cached_tokens_across_a_hop() -> None:
    usage = Usage(prompt_tokens=1200, completion_tokens=16, cached_tokens=1024)
    wire = pb.Usage.FromString(convert.usage_to_pb(usage).SerializeToString())
    assert convert.usage_from_pb(wire) == usage
    assert convert.usage_from_pb(wire).to_openai()["prompt_tokens_details"] == {
        "cached_tokens": 1024
    }


def test_a_peer_cannot_claim_more_cached_tokens_than_the_prompt_had() -> None:
    wire = pb.Usage(prompt_tokens=10, completion_tokens=1, cached_tokens=10**9)
    assert convert.usage_from_pb(wire).cached_tokens == 10
