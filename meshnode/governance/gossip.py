"""What governance puts into gossip: key records and spend counters, signed with the mesh secret.

`encode_digest(records, counters, secret)` packs both (msgpack) and appends an HMAC-SHA256 over
the payload with a key derived from `mesh.secret`; `decode_digest(blob, secret)` checks the MAC
in constant time before it parses anything, so a node without the mesh secret can neither create
a key nor inflate (or, CRDTs being grow-only, anything else) the spend of a mesh it does not
belong to, whatever transport carried the bytes. Malformed entries inside a well-signed payload
are dropped one by one.

Pages (`encode_pages`): a node's own records are split over `RECORD_PAGES` pages by a stable
hash of the key name, so one key's change alters one page; its own spend slots travel in a page
of their own (they change with every call it serves, the records rarely). Every page is a
digest as above, at most `PAGE_BYTES`, under the mesh's per-blob cap; what does not fit is
returned as overflow (the caller logs and counts it), never dropped silently.

The mesh engineer's gossip carries the bytes opaquely (entries of a node's state); the service
(`Governance.gossip_blobs` / `merge_gossip_blobs`) is the only caller of this module.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgpack

from meshnode.errors import MeshError
from meshnode.governance.counters import CounterEntry
from meshnode.governance.keys import KeyRecord

DIGEST_VERSION = 1
_MAC_CONTEXT = b"meshnode governance gossip v1\x00"
RECORD_PAGES = 14  # + 1 spend page, within the mesh's 16 blobs per state
PAGE_BYTES = 60 * 1024  # under the mesh's 64 KiB per blob
RECORDS_PREFIX = "governance.keys."
SPEND_PAGE = "governance.spend"
LEGACY_BLOB = "governance.keys"  # one digest of everything, from nodes before pages


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


def page_of(name: str) -> int:
    """The stable page of a key name (the same on every node and every run)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "big") \
        % RECORD_PAGES


@dataclass(frozen=True, slots=True)
class Pages:
    blobs: dict[str, bytes]
    overflow_records: list[KeyRecord]
    overflow_counters: list[CounterEntry]


def _fit(count: int, size: Callable[[int], int], limit: int) -> int:
    """The largest n <= count whose page (`size(n)` bytes) fits in `limit` (binary search;
    usually everything fits and one encoding is enough)."""
    if size(count) <= limit:
        return count
    lo, hi = 0, count - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if size(mid) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def encode_pages(
    records: Sequence[KeyRecord], counters: Sequence[CounterEntry], secret: str | None,
    page_bytes: int = PAGE_BYTES,
) -> Pages:
    buckets: dict[int, list[KeyRecord]] = {}
    for record in sorted(records, key=lambda r: r.name):
        buckets.setdefault(page_of(record.name), []).append(record)
    blobs: dict[str, bytes] = {}
    overflow: list[KeyRecord] = []
    for index, bucket in sorted(buckets.items()):
        n = _fit(len(bucket),
                 lambda k, b=bucket: len(encode_digest(b[:k], [], secret)),  # type: ignore[misc]
                 page_bytes)
        blobs[f"{RECORDS_PREFIX}{index:02d}"] = encode_digest(bucket[:n], [], secret)
        overflow.extend(bucket[n:])
    spend = list(counters)
    spent_over: list[CounterEntry] = []
    if spend:
        n = _fit(len(spend), lambda k: len(encode_digest([], spend[:k], secret)), page_bytes)
        blobs[SPEND_PAGE] = encode_digest([], spend[:n], secret)
        spent_over = spend[n:]
    return Pages(blobs, overflow, spent_over)
