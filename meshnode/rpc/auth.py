"""Mesh authentication with a shared secret (`mesh.secret`): HMAC on every RPC, both ways.

A request carries gRPC metadata `mesh-node` (the caller's id), `mesh-ts` (its wall clock, ms),
`mesh-nonce` (16 random bytes, hex), `mesh-to` (the callee's node id, when the caller knows it)
and `mesh-mac`:

    mac = HMAC-SHA256(key, "req|" len(node) ":" node "|" ts "|" nonce "|" method "|" + body)
    with mesh-to:  HMAC-SHA256(key, "req2|" len(node) ":" node "|" len(to) ":" to "|" ts "|"
                                    nonce "|" method "|" + body)

where `body` is the exact serialized request on the wire and `key = HMAC-SHA256(secret,
"meshnode mesh auth v1")` (the secret itself is used for nothing else here, and is never logged).
The callee refuses (`UNAUTHENTICATED`) a missing or wrong MAC, a `mesh-to` that is not its own
id (a captured call replayed to another node), an `Infer` without `mesh-to` (the caller always
knows whom it forwards to), a timestamp more than `skew_s` away from its own clock, anything
signed before this process started (so a restart does not reopen the window), and any MAC it
has already accepted (`ReplayCache`). `Gossip` and `Health` to a seed address go without
`mesh-to` (the caller does not know the id yet); docs/security.md says why that is harmless. Unary answers
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
TO_KEY = "mesh-to"
MAC_KEY = "mesh-mac"
INFER_METHOD = "/meshnode.v1.Mesh/Infer"
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

    def __init__(self, max_entries: int = DEFAULT_REPLAY_ENTRIES, floor_ms: int = 0) -> None:
        """`floor_ms`: refuse everything signed at or before it (the process start: what was
        accepted before a restart is not in this cache)."""
        self._max = max_entries
        self._seen: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self.floor_ms = floor_ms

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
        # A captured call from before this process started is refused, whatever its age.
        self.replay = replay or ReplayCache(floor_ms=int(clock() * 1000) - 1)

    def derive(self, label: bytes) -> bytes:
        """A key for another use of the mesh secret (caller assertions), independent of this
        one: knowing it says nothing about the RPC key."""
        return hmac.new(self._key, label, hashlib.sha256).digest()

    def mesh_tag(self) -> str:
        """A short public tag of this mesh (mDNS TXT `mesh`): equal secrets give equal tags; it
        says nothing usable about the secret."""
        return hmac.new(self._key, b"mdns tag", hashlib.sha256).hexdigest()[:16]

    def __repr__(self) -> str:  # never the key
        return f"MeshAuth(skew_s={self.skew_ms / 1000:g})"

    # ------------------------------------------------------------------ requests
    def _request_mac(self, node: str, ts: str, nonce: str, method: str, body: bytes,
                     to: str = "") -> bytes:
        if to:
            head = f"req2|{len(node)}:{node}|{len(to)}:{to}|{ts}|{nonce}|{method}|".encode()
        else:
            head = f"req|{len(node)}:{node}|{ts}|{nonce}|{method}|".encode()
        return hmac.new(self._key, head + body, hashlib.sha256).digest()

    def sign_request(
        self, node: str, method: str, body: bytes, callee: str = ""
    ) -> tuple[list[tuple[str, str]], str]:
        """Metadata for one call, and its nonce (to check the answer against). `callee`: the
        node id the call is for, when known (the MAC then binds it)."""
        ts = str(int(self._clock() * 1000))
        nonce = secrets.token_hex(16)
        mac = self._request_mac(node, ts, nonce, method, body, callee)
        metadata = [(NODE_KEY, node), (TS_KEY, ts), (NONCE_KEY, nonce), (MAC_KEY, mac.hex())]
        if callee:
            metadata.append((TO_KEY, callee))
        return metadata, nonce

    def verify_request(
        self, metadata: Metadata | None, method: str, body: bytes, self_id: str = ""
    ) -> tuple[str, str]:
        """(caller id, nonce) of a valid request; raises `AuthError` otherwise. With `self_id`
        a call addressed to another node, or an `Infer` addressed to none, is refused."""
        node, ts, nonce = _meta(metadata, NODE_KEY), _meta(metadata, TS_KEY), _meta(metadata, NONCE_KEY)
        mac_hex = _meta(metadata, MAC_KEY)
        to = _meta(metadata, TO_KEY)
        if not (node and ts and nonce and mac_hex) or len(node) > MAX_NODE_ID or len(nonce) > 64:
            raise AuthError("missing")
        if len(to) > MAX_NODE_ID:
            raise AuthError("malformed")
        try:
            ts_ms = int(ts)
            mac = bytes.fromhex(mac_hex)
        except ValueError:
            raise AuthError("malformed") from None
        if not hmac.compare_digest(mac, self._request_mac(node, ts, nonce, method, body, to)):
            raise AuthError("bad_mac")
        if self_id and to and to != self_id:
            raise AuthError("wrong_callee")
        if self_id and not to and method == INFER_METHOD:
            raise AuthError("no_callee")
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
