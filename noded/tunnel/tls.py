"""mTLS contexts from workload certificates, and the verified SPIFFE identity of a peer.

Both sides require a certificate chaining to the cluster's trust root (TLS 1.3 only, no hostname check:
workload names are SPIFFE URIs, and the root's name constraints keep them in the trust domain). The
peer's identity is its certificate's one URI SAN, checked to be a workload ID of the trust domain.
"""

from __future__ import annotations

import os
import ssl
import tempfile

from noded.tunnel.ca import parse_spiffe
from noded.tunnel.certs import WorkloadCert


class PeerRejected(Exception):
    """The peer's certificate chains to the root but names no workload of this trust domain."""


def context(server: bool, cert: WorkloadCert, root_pem: bytes, directory: str) -> ssl.SSLContext:
    """A TLS 1.3 context presenting `cert` and requiring a peer certificate from `root_pem`'s root.
    The key passes through a 0600 file in `directory` (OpenSSL loads chains from files) removed at once."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=root_pem.decode())
    present(ctx, cert, directory)
    return ctx


def present(ctx: ssl.SSLContext, cert: WorkloadCert, directory: str) -> None:
    """Make `ctx` present `cert` from its next handshake on (a renewed certificate on a live server)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)  # one made earlier with a looser mode does not keep it
    fd, path = tempfile.mkstemp(dir=directory, suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cert.cert_pem + cert.key_pem)
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)


def peer_uris(cert: dict | None) -> list[str]:
    """The URI names of a peer certificate as ssl's getpeercert() gives it."""
    return [value for kind, value in (cert or {}).get("subjectAltName", ()) if kind == "URI"]


def peer_identity(sock: ssl.SSLSocket | ssl.SSLObject, trust_domain: str) -> str:
    """The verified peer's SPIFFE ID (the handshake has checked its chain and validity)."""
    uris = peer_uris(sock.getpeercert())
    if len(uris) != 1:
        raise PeerRejected(f"peer certificate has {len(uris)} URI names, expected one SPIFFE ID")
    domain, _ns, _sa = parse_spiffe(uris[0])
    if domain != trust_domain:
        raise PeerRejected(f"peer {uris[0]} is not in trust domain {trust_domain}")
    return uris[0]
