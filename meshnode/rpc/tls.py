"""mTLS for the mesh (`mesh.tls`): server and client certificates issued by one CA.

Both sides present a certificate and both check the other's against `ca_file`: a peer whose
certificate another CA issued fails the TLS handshake and is never heard. Peers verify the
server certificate's name against the address they dial, so each node's certificate carries a
subjectAltName for its advertised host (IP or DNS name).
"""

from __future__ import annotations

import grpc

from meshnode.config import TLSConfig
from meshnode.errors import ConfigError


def _read(tls: TLSConfig) -> tuple[bytes, bytes, bytes]:
    missing = [name for name in ("cert_file", "key_file", "ca_file") if getattr(tls, name) is None]
    if missing:
        raise ConfigError([f"mesh.tls.{name}: required for mTLS" for name in missing])
    out: list[bytes] = []
    errors: list[str] = []
    for name in ("cert_file", "key_file", "ca_file"):
        path = getattr(tls, name)
        try:
            out.append(path.read_bytes())
        except OSError as exc:
            errors.append(f"mesh.tls.{name}: cannot read {path}: {exc.strerror}")
    if errors:
        raise ConfigError(errors)
    return out[0], out[1], out[2]


def server_credentials(tls: TLSConfig) -> grpc.ServerCredentials:
    cert, key, ca = _read(tls)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def channel_credentials(tls: TLSConfig) -> grpc.ChannelCredentials:
    cert, key, ca = _read(tls)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                        certificate_chain=cert)
