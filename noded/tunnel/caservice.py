"""The CA as a service, so that only one node holds the CA key (`tunnel.caListen` there, `tunnel.caAddress`
on the others), as istiod's CA serves ztunnels.

A node connects with mutual TLS presenting its node certificate (`spiffe://<td>/node/<name>`, made at
provisioning: `node_credentials`), sends one JSON line `{"identity": ..., "publicKey": PEM}` per request
and gets `{"cert": PEM}` or `{"error": ...}` back. The node name comes from the verified certificate, not
from the request, so the Issuer's node restriction holds cryptographically: a node can only obtain the
identities of pods scheduled on it. `{"node": true, "publicKey": PEM}` renews the asking node's own
certificate (node certificates last NODE_CERT_TTL and are renewed at half life, as workload ones).
`{"workloads": true}` turns the connection into the workload stream (noded/tunnel/workloads.py).

Both ends check the other: the CA service refuses a node certificate whose serial or node is listed in
`revoked` (a file, one hex serial or node name a line, re-read when it changes); the node accepts only a
CA service presenting a node identity (never a workload's) and only a certificate that the root signed,
naming what it asked for, over the key it sent (ca.verify_issued).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import socket
from typing import TYPE_CHECKING

import structlog
from cryptography import x509

from noded.files import write_private
from noded.tunnel.ca import (
    CertificateAuthority,
    Issuer,
    NotAuthorized,
    key_pem,
    new_key,
    node_id,
    parse_node,
    trust_domain_of,
    verify_issued,
)
from noded.tunnel.ca import public_pem as public_key_pem
from noded.tunnel.certs import WorkloadCert
from noded.tunnel.tls import context, peer_uris

if TYPE_CHECKING:
    from noded.tunnel.workloads import WorkloadFeed

log = structlog.get_logger("noded.tunnel.ca")
NODE_CERT_TTL = datetime.timedelta(days=30)
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


def node_of(cert: dict | None, trust_domain: str) -> str:
    """The node a verified peer certificate (ssl's getpeercert()) names; ValueError for anything else than
    one node identity of the trust domain (a workload's certificate never passes for a node's)."""
    uris = peer_uris(cert)
    if len(uris) != 1:
        raise ValueError(f"the certificate has {len(uris)} URI names, not one")
    return parse_node(uris[0], trust_domain)


def _peer_node(writer: asyncio.StreamWriter, trust_domain: str, revoked: Revocations) -> str:
    node = node_of(writer.get_extra_info("peercert"), trust_domain)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    serial = x509.load_der_x509_certificate(der).serial_number
    if revoked.revoked(node, serial):
        raise ValueError(f"node {node} (certificate serial {serial:x}) is revoked")
    return node


class Revocations:
    """Revoked node certificates: a file of hex serials and node names, one a line (# comments), re-read
    when it changes. No file: nothing revoked."""

    def __init__(self, path: str = "") -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._entries: set[str] = set()

    def revoked(self, node: str, serial: int) -> bool:
        if self.path:
            try:
                st = os.stat(self.path)
                if (st.st_mtime_ns, st.st_size) != self._stamp:
                    with open(self.path) as f:
                        lines = (line.split("#")[0].strip().lower() for line in f)
                        self._entries = {line for line in lines if line}
                    self._stamp = (st.st_mtime_ns, st.st_size)
            except OSError:
                self._entries, self._stamp = set(), None
        return node.lower() in self._entries or f"{serial:x}" in self._entries


async def serve(
    host: str,
    port: int,
    issuer: Issuer,
    own: WorkloadCert,
    root_pem: bytes,
    key_dir: str,
    revoked: Revocations | None = None,
    feed: WorkloadFeed | None = None,
):
    """Serve certificate requests on host:port (and, with `feed`, the workload stream); the asyncio server."""
    trust_domain = issuer.ca.trust_domain
    revoked = revoked or Revocations()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            node = _peer_node(writer, trust_domain, revoked)
        except ValueError as e:
            log.warning("CA client refused", error=str(e))
            writer.close()
            return
        try:
            while line := await reader.readline():
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict):
                        raise ValueError("a request is a JSON object")
                    if req.get("workloads") is True and feed is not None:  # the connection is the stream's now
                        await feed.serve(writer, node)
                        return
                    if req.get("node") is True:  # the node's own certificate, renewed
                        cert = issuer.ca.issue_node(node, str(req["publicKey"]).encode(), NODE_CERT_TTL)
                        what = node_id(trust_domain, node)
                    else:
                        cert = issuer.request(node, str(req["identity"]), str(req["publicKey"]).encode())
                        what = req["identity"]
                    reply = {"cert": cert.decode()}
                    log.info("certificate issued", node=node, identity=what)
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
    server = await asyncio.start_server(handle, host, port, ssl=ctx, limit=MAX_LINE)
    server.tls_context = ctx  # type: ignore[attr-defined]  # IdentityService renews what it presents
    return server


class RemoteIssuer:
    """The node side: asks the CA service, presenting this node's certificate. Blocking (a worker thread).
    With `paths` (cert, key), the node certificate is renewed there once past half its life."""

    def __init__(
        self,
        address: tuple[str, int],
        credentials: WorkloadCert,
        root_pem: bytes,
        key_dir: str,
        paths: tuple[str, str] | None = None,
    ) -> None:
        self.address = address
        self.root_pem = root_pem
        self.key_dir = key_dir
        self.paths = paths
        self.trust_domain = trust_domain_of(credentials.identity)
        self._use(credentials)

    def _use(self, credentials: WorkloadCert) -> None:
        self.credentials = credentials
        self.context = context(False, credentials, self.root_pem, self.key_dir)
        self.node = credentials.identity

    def _ask(self, message: dict, timeout: float) -> bytes:
        raw = socket.create_connection(self.address, timeout=timeout)
        with self.context.wrap_socket(raw, server_hostname=self.address[0]) as tls:
            try:  # the CA service is a node (istiod's is istiod): a workload certificate never passes for it
                node_of(tls.getpeercert(), self.trust_domain)
            except ValueError as e:
                raise NotAuthorized(f"the CA service at {self.address[0]}:{self.address[1]} is no node: {e}") from None
            tls.sendall(json.dumps(message).encode() + b"\n")
            reply = json.loads(tls.makefile("rb").readline(MAX_LINE) or b"{}")
        if not isinstance(reply, dict):
            raise NotAuthorized("the CA service answered something else than a JSON object")
        if "cert" not in reply:
            raise NotAuthorized(str(reply.get("error", "no answer from the CA")))
        return str(reply["cert"]).encode()

    def request(self, identity: str, public_key: bytes, timeout: float = 10.0) -> bytes:
        self.renew_node_if_due(timeout)
        cert = self._ask({"identity": identity, "publicKey": public_key.decode()}, timeout)
        try:
            verify_issued(cert, identity, public_key, self.root_pem)
        except ValueError as e:
            raise NotAuthorized(f"the CA service answered a bad certificate for {identity}: {e}") from None
        return cert

    def renew_node_if_due(self, timeout: float = 10.0, now: datetime.datetime | None = None) -> bool:
        """A node certificate past half its life is renewed (and written to `paths`); True when it was."""
        now = now or datetime.datetime.now(datetime.UTC)
        if self.paths is None or now < self.credentials.renew_at():
            return False
        key = new_key()
        cert = self._ask({"node": True, "publicKey": public_key_pem(key).decode()}, timeout)
        try:
            verify_issued(cert, self.node, public_key_pem(key), self.root_pem, now)
        except ValueError as e:
            raise NotAuthorized(f"the CA service answered a bad node certificate: {e}") from None
        cert_path, key_path = self.paths
        write_private(key_path, key_pem(key))
        write_private(cert_path, cert)
        self._use(load_credentials_pem(cert, key_pem(key)))
        log.info("node certificate renewed", node=self.node, until=str(self.credentials.not_after))
        return True
