"""The CA as a service, so that only one node holds the CA key (`tunnel.caListen` there, `tunnel.caAddress`
on the others), as istiod's CA serves ztunnels.

A node connects with mutual TLS presenting its node certificate (`spiffe://<td>/node/<name>`, made at
provisioning: `node_credentials`), sends one JSON line `{"identity": ..., "publicKey": PEM}` per request
and gets `{"cert": PEM}` or `{"error": ...}` back. The node name comes from the verified certificate, not
from the request, so the Issuer's node restriction holds cryptographically: a node can only obtain the
identities of pods scheduled on it.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import socket

import structlog
from cryptography import x509

from noded.files import write_private
from noded.tunnel.ca import CertificateAuthority, Issuer, NotAuthorized, key_pem, new_key, parse_node
from noded.tunnel.ca import public_pem as public_key_pem
from noded.tunnel.certs import WorkloadCert
from noded.tunnel.tls import context, peer_uris

log = structlog.get_logger("noded.tunnel.ca")
NODE_CERT_TTL = datetime.timedelta(days=365)
MAX_LINE = 64 * 1024


def node_credentials(ca: CertificateAuthority, node: str, directory: str) -> tuple[str, str]:
    """Write a node certificate and key (0600) for `node` under directory; their paths."""
    key = new_key()
    cert_path, key_path = os.path.join(directory, f"{node}.pem"), os.path.join(directory, f"{node}-key.pem")
    os.makedirs(directory, exist_ok=True)
    write_private(key_path, key_pem(key))
    with open(cert_path, "wb") as f:
        f.write(ca.issue_node(node, public_key_pem(key), NODE_CERT_TTL))
    return cert_path, key_path


def load_credentials(cert_path: str, key_path: str) -> WorkloadCert:
    with open(cert_path, "rb") as c, open(key_path, "rb") as k:
        return load_credentials_pem(c.read(), k.read())


def load_credentials_pem(cert_pem: bytes, key: bytes) -> WorkloadCert:
    cert = x509.load_pem_x509_certificate(cert_pem)
    uri = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    identity = uri.get_values_for_type(x509.UniformResourceIdentifier)[0]
    return WorkloadCert(identity, cert_pem, key, cert.not_valid_before_utc, cert.not_valid_after_utc)


def _peer_node(writer: asyncio.StreamWriter, trust_domain: str) -> str:
    uris = peer_uris(writer.get_extra_info("peercert"))
    if len(uris) != 1:
        raise ValueError("the client certificate has no single URI name")
    return parse_node(uris[0], trust_domain)


async def serve(host: str, port: int, issuer: Issuer, own: WorkloadCert, root_pem: bytes, key_dir: str):
    """Serve certificate requests on host:port; the asyncio server."""
    trust_domain = issuer.ca.trust_domain

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            node = _peer_node(writer, trust_domain)
        except ValueError as e:
            log.warning("CA client refused", error=str(e))
            writer.close()
            return
        try:
            while line := await reader.readline():
                try:
                    req = json.loads(line)
                    cert = issuer.request(node, str(req["identity"]), str(req["publicKey"]).encode())
                    reply = {"cert": cert.decode()}
                    log.info("certificate issued", node=node, identity=req["identity"])
                except NotAuthorized as e:
                    reply = {"error": str(e)}
                    log.warning("certificate refused", node=node, error=str(e))
                except (ValueError, KeyError, TypeError) as e:
                    reply = {"error": f"bad request: {e}"}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (OSError, ValueError):
            pass
        finally:
            writer.close()

    ctx = context(True, own, root_pem, key_dir)
    return await asyncio.start_server(handle, host, port, ssl=ctx, limit=MAX_LINE)


class RemoteIssuer:
    """The node side: asks the CA service, presenting this node's certificate. Blocking (a worker thread)."""

    def __init__(self, address: tuple[str, int], credentials: WorkloadCert, root_pem: bytes, key_dir: str) -> None:
        self.address = address
        self.context = context(False, credentials, root_pem, key_dir)
        self.node = credentials.identity

    def request(self, identity: str, public_key: bytes, timeout: float = 10.0) -> bytes:
        raw = socket.create_connection(self.address, timeout=timeout)
        with self.context.wrap_socket(raw, server_hostname=self.address[0]) as tls:
            tls.sendall(json.dumps({"identity": identity, "publicKey": public_key.decode()}).encode() + b"\n")
            reply = json.loads(tls.makefile("rb").readline(MAX_LINE) or b"{}")
        if "cert" not in reply:
            raise NotAuthorized(reply.get("error", "no answer from the CA"))
        return reply["cert"].encode()
