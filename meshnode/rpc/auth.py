"""Mesh authentication with a shared secret (`mesh.secret`): HMAC on every RPC, both ways.

A request carries gRPC metadata `mesh-node` (the caller's id), `mesh-ts` (its wall clock, ms),
`mesh-nonce` (16 random bytes, hex) and `mesh-mac`:

    mac = HMAC-SHA256(key, "req|" len(node) ":" node "|" ts "|" nonce "|" method "|" + body)

where `body` is the exact serialized request on the wire and `key = HMAC-SHA256(secret,
"meshnode mesh auth v1")` (the secret itself is used for nothing else here, and is never logged).
The callee refuses (`UNAUTHENTICATED`) a missing or wrong MAC, a timestamp more than `skew_s`
away from its own clock, and any MAC it has already accepted (`ReplayCache`). Unary answers
(`Gossip`, `Health`: what membership is built from) carry a trailing `mesh-mac` over
("resp|" method "|" request nonce "|" body), so a node without the secret can neither join nor
feed us records through an answer, nor replay an old answer. `Infer` answer chunks are not
MAC'd (they are not membership; use mTLS when answers need integrity or secrecy on the wire).

Owns: `MeshAuth` (sign/verify) and `ReplayCache`. The server side checks in
`meshnode.rpc.guard.MeshGuard`, the client side signs in `meshnode.rpc.client.PeerStub`.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Sequence

KEY_LABEL = b"meshnode mesh auth v1"
NODE_KEY = "mesh-node"
TS_KEY = "mesh-ts"
NONCE_KEY = "mesh-nonce"
MAC_KEY = "mesh-mac"
DEFAULT_SKEW_S = 30.0
DEFAULT_REPLAY_ENTRIES = 262_144
MAX_NODE_ID = 256

Metadata = Sequence[tuple[str, str | bytes]]


class AuthError(Exception):
    """A request or answer that fails authentication (mesh-internal: the server answers
    UNAUTHENTICATED, the client treats the peer as not answering). `reason` is a short label
    for counters and logs, never a secret."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ReplayCache:
    """MACs already accepted, kept until they fall out of the skew window.

    Bounded: when full, the oldest entry is evicted and its timestamp becomes a floor below
    which everything is refused as stale, so an eviction never reopens a replay.
    """

    def __init__(self, max_entries: int = DEFAULT_REPLAY_ENTRIES) -> None:
        self._max = max_entries
        self._seen: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self.floor_ms = 0

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_add(self, mac: bytes, ts_ms: int, now_ms: int, window_ms: int) -> str | None:
        """None when fresh (and remembered now), else the refusal reason."""
        while self._seen:  # expire: entries are in arrival order, roughly time order
            oldest_mac, oldest_ts = next(iter(self._seen.items()))
            if oldest_ts >= now_ms - window_ms:
                break
            del self._seen[oldest_mac]
        if ts_ms <= self.floor_ms:
            return "stale"
        if mac in self._seen:
            return "replayed"
        self._seen[mac] = ts_ms
        if len(self._seen) > self._max:
            _, evicted_ts = self._seen.popitem(last=False)
            self.floor_ms = max(self.floor_ms, evicted_ts)
        return None


def _meta(metadata: Metadata | None, key: str) -> str:
    for k, v in metadata or ():
        if k == key:
            return v.decode("ascii", "replace") if isinstance(v, bytes) else v
    return ""


class MeshAuth:
    """Signs and checks mesh RPCs with a key derived from the shared secret."""

    def __init__(
        self,
        secret: str,
        *,
        skew_s: float = DEFAULT_SKEW_S,
        clock: Callable[[], float] = time.time,
        replay: ReplayCache | None = None,
    ) -> None:
        if not secret:
            raise ValueError("mesh auth needs a non-empty secret")
        self._key = hmac.new(secret.encode(), KEY_LABEL, hashlib.sha256).digest()
        self.skew_ms = int(skew_s * 1000)
        self._clock = clock
        self.replay = replay or ReplayCache()

    def mesh_tag(self) -> str:
        """A short public tag of this mesh (mDNS TXT `mesh`): equal secrets give equal tags; it
        says nothing usable about the secret."""
        return hmac.new(self._key, b"mdns tag", hashlib.sha256).hexdigest()[:16]

    def __repr__(self) -> str:  # never the key
        return f"MeshAuth(skew_s={self.skew_ms / 1000:g})"

    # ------------------------------------------------------------------ requests
    def _request_mac(self, node: str, ts: str, nonce: str, method: str, body: bytes) -> bytes:
        head = f"req|{len(node)}:{node}|{ts}|{nonce}|{method}|".encode()
        return hmac.new(self._key, head + body, hashlib.sha256).digest()

    def sign_request(self, node: str, method: str, body: bytes) -> tuple[list[tuple[str, str]], str]:
        """Metadata for one call, and its nonce (to check the answer against)."""
        ts = str(int(self._clock() * 1000))
        nonce = secrets.token_hex(16)
        mac = self._request_mac(node, ts, nonce, method, body)
        return [(NODE_KEY, node), (TS_KEY, ts), (NONCE_KEY, nonce), (MAC_KEY, mac.hex())], nonce

    def verify_request(self, metadata: Metadata | None, method: str, body: bytes) -> tuple[str, str]:
        """(caller id, nonce) of a valid request; raises `AuthError` otherwise."""
        node, ts, nonce = _meta(metadata, NODE_KEY), _meta(metadata, TS_KEY), _meta(metadata, NONCE_KEY)
        mac_hex = _meta(metadata, MAC_KEY)
        if not (node and ts and nonce and mac_hex) or len(node) > MAX_NODE_ID or len(nonce) > 64:
            raise AuthError("missing")
        try:
            ts_ms = int(ts)
            mac = bytes.fromhex(mac_hex)
        except ValueError:
            raise AuthError("malformed") from None
        if not hmac.compare_digest(mac, self._request_mac(node, ts, nonce, method, body)):
            raise AuthError("bad_mac")
        now_ms = int(self._clock() * 1000)
        if abs(now_ms - ts_ms) > self.skew_ms:
            raise AuthError("stale")
        reason = self.replay.check_and_add(mac, ts_ms, now_ms, self.skew_ms)
        if reason is not None:
            raise AuthError(reason)
        return node, nonce

    # ------------------------------------------------------------------ answers
    def _response_mac(self, method: str, nonce: str, body: bytes) -> bytes:
        return hmac.new(self._key, f"resp|{method}|{nonce}|".encode() + body, hashlib.sha256).digest()

    def sign_response(self, method: str, nonce: str, body: bytes) -> list[tuple[str, str]]:
        return [(MAC_KEY, self._response_mac(method, nonce, body).hex())]

    def verify_response(self, method: str, nonce: str, body: bytes, trailing: Metadata | None) -> None:
        try:
            mac = bytes.fromhex(_meta(trailing, MAC_KEY))
        except ValueError:
            raise AuthError("malformed_answer") from None
        if not mac or not hmac.compare_digest(mac, self._response_mac(method, nonce, body)):
            raise AuthError("bad_answer_mac")
