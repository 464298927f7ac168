"""What governance puts into gossip: key records and spend counters, signed with the mesh secret.

`encode_digest(records, counters, secret)` packs both (msgpack) and appends an HMAC-SHA256 over
the payload with a key derived from `mesh.secret`; `decode_digest(blob, secret)` checks the MAC
in constant time before it parses anything, so a node without the mesh secret can neither create
a key nor inflate (or, CRDTs being grow-only, anything else) the spend of a mesh it does not
belong to, whatever transport carried the bytes. Malformed entries inside a well-signed payload
are dropped one by one.

The mesh engineer's gossip carries the bytes opaquely (one field of a node's state); the
service (`Governance.export_gossip` / `merge_gossip`) is the only caller of this module.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack

from meshnode.errors import MeshError
from meshnode.governance.counters import CounterEntry
from meshnode.governance.keys import KeyRecord

DIGEST_VERSION = 1
_MAC_CONTEXT = b"meshnode governance gossip v1\x00"


class GossipRejected(MeshError):
    """A governance digest that is not signed with our mesh secret, or is not one at all."""


@dataclass(frozen=True, slots=True)
class GovernanceDigest:
    records: list[KeyRecord]
    counters: list[CounterEntry]


def _mac(payload: bytes, secret: str | None) -> bytes:
    key = hashlib.sha256(_MAC_CONTEXT + (secret or "").encode("utf-8")).digest()
    return hmac.new(key, payload, hashlib.sha256).digest()


def encode_digest(
    records: Sequence[KeyRecord], counters: Sequence[CounterEntry], secret: str | None
) -> bytes:
    payload = msgpack.packb(
        [DIGEST_VERSION, [r.to_wire() for r in records], [c.to_json() for c in counters]],
        use_bin_type=True,
    )
    return bytes(msgpack.packb([payload, _mac(payload, secret)], use_bin_type=True))


def decode_digest(blob: bytes, secret: str | None) -> GovernanceDigest:
    try:
        payload, mac = msgpack.unpackb(blob, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise GossipRejected("governance digest is not msgpack") from exc
    if not isinstance(payload, bytes) or not isinstance(mac, bytes):
        raise GossipRejected("governance digest has the wrong shape")
    if not hmac.compare_digest(mac, _mac(payload, secret)):
        raise GossipRejected("governance digest is not signed with this mesh's secret")
    try:
        version, raw_records, raw_counters = msgpack.unpackb(payload, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise GossipRejected("governance digest payload is not msgpack") from exc
    if version != DIGEST_VERSION or not isinstance(raw_records, list) or not isinstance(
        raw_counters, list
    ):
        raise GossipRejected("governance digest has an unknown version or shape")
    records = [r for r in (KeyRecord.from_wire(x) for x in raw_records) if r is not None]
    counters = [c for c in (CounterEntry.from_json(x) for x in raw_counters) if c is not None]
    return GovernanceDigest(records, counters)
