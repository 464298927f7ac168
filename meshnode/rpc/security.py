"""How this node secures the mesh, decided once from `MeshConfig` at start-up.

- `mesh.secret`: every RPC is HMAC'd (`meshnode.rpc.auth`);
- `mesh.tls`: mTLS (`meshnode.rpc.tls`); both may be on (the HMAC then rides inside TLS);
- neither: allowed only when `mesh.listen_addr` is a loopback address, or with `mesh.insecure`
  (`meshnode run --insecure`): a mesh reachable from the network with no authentication lets
  anyone join it, read every gossiped state and spend this node's providers.

A node with `auth.enabled` refuses an unauthenticated mesh even on loopback (every local process
is a member there, docs/security.md) unless `--insecure`; `authenticated` says whether key
records and spend counters may cross this mesh at all.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import grpc
import grpc.aio

from meshnode.config import MeshConfig
from meshnode.errors import ConfigError
from meshnode.rpc import tls
from meshnode.rpc.auth import MeshAuth
from meshnode.rpc.guard import MeshGuard


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(mesh: MeshConfig, auth_enabled: bool = False) -> None:
    """Refuse to serve an unauthenticated mesh beyond loopback, or under a node with auth on,
    unless told to."""
    host = mesh.listen_addr.rpartition(":")[0]
    if mesh.secret or mesh.tls.enabled or mesh.insecure:
        return
    if auth_enabled:
        raise ConfigError([
            "auth.enabled: true needs an authenticated mesh, but neither mesh.secret nor "
            "mesh.tls is set (any process that reaches the gRPC port would be a member and "
            "could forward requests as any key); set mesh.secret, or mesh.enabled: false, or "
            "pass --insecure (mesh.insecure: true)"
        ])
    if is_loopback_host(host):
        return
    raise ConfigError([
        f"mesh.listen_addr: {mesh.listen_addr} is reachable from the network but neither "
        "mesh.secret nor mesh.tls is set, so anyone could join the mesh; set one of them, or "
        "pass --insecure (mesh.insecure: true) to run without authentication"
    ])


@dataclass(frozen=True)
class MeshSecurity:
    auth: MeshAuth | None = None
    server_credentials: grpc.ServerCredentials | None = None
    channel_credentials: grpc.ChannelCredentials | None = None

    @classmethod
    def from_config(cls, mesh: MeshConfig, *, auth_enabled: bool = False) -> MeshSecurity:
        check_exposure(mesh, auth_enabled)
        auth = MeshAuth(mesh.secret) if mesh.secret else None
        if mesh.tls.enabled or mesh.tls.ca_file is not None or mesh.tls.key_file is not None:
            return cls(auth, tls.server_credentials(mesh.tls), tls.channel_credentials(mesh.tls))
        return cls(auth)

    @property
    def authenticated(self) -> bool:
        """Whether every peer proves membership (a secret or mTLS): only then do key records,
        spend counters and caller assertions mean anything (docs/security.md)."""
        return self.auth is not None or self.server_credentials is not None

    def guard(self, node_id: str = "") -> MeshGuard:
        """A new server guard: size bounds, parsing and (with a secret) HMAC checks, refusing
        calls addressed to another node than `node_id`."""
        return MeshGuard(self.auth, node_id)

    @property
    def mode(self) -> str:
        """For logs and /admin: what protects the mesh (never the secret)."""
        parts = [p for p, on in (("hmac", self.auth), ("mtls", self.server_credentials)) if on]
        return "+".join(parts) or "none"
