"""Workload identity: the CA, the node restriction, rotation, and mTLS handshakes that accept the cluster's
workloads and refuse a foreign root, a forged certificate and an expired one (real TLS over a socketpair)."""

from __future__ import annotations

import datetime
import socket
import ssl
import threading

import pytest
from cryptography import x509

from noded.tunnel import ca as ca_mod
from noded.tunnel.ca import CertificateAuthority, Issuer, NotAuthorized, create_root, parse_spiffe, spiffe_id
from noded.tunnel.certs import CertManager, WorkloadCert
from noded.tunnel.tls import context, peer_identity

TD = "cluster.local"
SHELL = spiffe_id(TD, "default", "shell")
ECHO = spiffe_id(TD, "default", "echo")
NOW = datetime.datetime(2026, 11, 22, 12, 0, tzinfo=datetime.UTC)


@pytest.fixture(scope="module")
def ca():
    cert, key = create_root(TD)
    return CertificateAuthority(cert, key)


def workload(ca, identity, ttl=datetime.timedelta(hours=1), now=None) -> WorkloadCert:
    key = ca_mod.new_key()
    pem = ca.issue(identity, ca_mod.public_pem(key), ttl, now)
    cert = x509.load_pem_x509_certificate(pem)
    return WorkloadCert(identity, pem, ca_mod.key_pem(key), cert.not_valid_before_utc, cert.not_valid_after_utc)


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[object, object]:
    """(what the server saw: the client's SPIFFE ID or the error, what the client saw: likewise)."""
    a, b = socket.socketpair()
    out: dict[str, object] = {}

    def serve():
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                out["server"] = peer_identity(s, TD)
                s.sendall(b"ok")
        except Exception as e:
            out["server"] = e

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client_ctx.wrap_socket(b) as c:
            identity = peer_identity(c, TD)
            out["client"] = identity if c.recv(2) == b"ok" else "no data"
    except Exception as e:
        out["client"] = e
    t.join(5)
    return out["server"], out["client"]


def test_spiffe_ids_are_parsed_strictly():
    assert parse_spiffe(SHELL) == (TD, "default", "shell")
    for bad in ("https://x/ns/a/sa/b", "spiffe://td/ns/a", "spiffe://td/ns//sa/b", "spiffe:///ns/a/sa/b"):
        with pytest.raises(ValueError):
            parse_spiffe(bad)


def test_workload_certificate_shape(ca):
    cert = x509.load_pem_x509_certificate(workload(ca, SHELL).cert_pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [SHELL]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(hours=1, minutes=1)
    with pytest.raises(NotAuthorized):  # another trust domain
        ca.issue("spiffe://other.domain/ns/a/sa/b", ca_mod.public_pem(ca_mod.new_key()), datetime.timedelta(hours=1))


def test_mutual_tls_between_workloads_carries_both_identities(ca, tmp_path):
    root = ca_mod.cert_pem(ca.root)
    server = context(True, workload(ca, ECHO), root, str(tmp_path))
    client = context(False, workload(ca, SHELL), root, str(tmp_path))
    assert handshake(server, client) == (SHELL, ECHO)
    assert list(tmp_path.iterdir()) == []  # the key files are gone


def test_a_foreign_root_a_forged_certificate_and_an_expired_one_are_refused(ca, tmp_path):
    root = ca_mod.cert_pem(ca.root)
    server = context(True, workload(ca, ECHO), root, str(tmp_path))
    # a certificate from another root (another cluster, or an attacker's CA with the same names)
    foreign = CertificateAuthority(*create_root(TD))
    forged_client = context(False, workload(foreign, SHELL), root, str(tmp_path))
    seen_by_server, _ = handshake(server, forged_client)
    assert isinstance(seen_by_server, ssl.SSLError) and "certificate verify failed" in str(seen_by_server)
    # the client refuses a server with a foreign certificate too
    honest_client = context(False, workload(ca, SHELL), root, str(tmp_path))
    _, seen_by_client = handshake(context(True, workload(foreign, ECHO), root, str(tmp_path)), honest_client)
    assert isinstance(seen_by_client, ssl.SSLError) and "certificate verify failed" in str(seen_by_client)
    # expired: issued two hours ago for one hour
    old = workload(ca, SHELL, now=datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=2))
    seen_by_server, _ = handshake(server, context(False, old, root, str(tmp_path)))
    assert isinstance(seen_by_server, ssl.SSLError) and "expired" in str(seen_by_server)


def test_a_node_is_issued_only_identities_that_run_on_it(ca):
    running = {"node1": {SHELL}, "node2": {ECHO}}
    issuer = Issuer(ca, lambda node: running.get(node, set()))
    key = ca_mod.public_pem(ca_mod.new_key())
    assert b"BEGIN CERTIFICATE" in issuer.request("node1", SHELL, key)
    with pytest.raises(NotAuthorized, match="node1 runs no pod with identity"):
        issuer.request("node1", ECHO, key)


def test_certificates_are_obtained_renewed_at_half_life_and_dropped(ca):
    clock = {"now": NOW}
    issuer = Issuer(ca, lambda _node: {SHELL, ECHO}, ttl=datetime.timedelta(hours=24))
    failing = {"on": False}

    def request(identity, public_key):
        if failing["on"]:
            raise ConnectionError("CA unreachable")
        return issuer.request("node1", identity, public_key, clock["now"])

    certs = CertManager(request, clock=lambda: clock["now"])
    assert certs.sync({SHELL, ECHO}) == [f"issued {ECHO}", f"issued {SHELL}"]
    first = certs.get(SHELL)
    clock["now"] = NOW + datetime.timedelta(hours=11)
    assert certs.sync({SHELL, ECHO}) == []  # before half life: kept
    clock["now"] = NOW + datetime.timedelta(hours=12, minutes=1)
    assert certs.sync({SHELL}) == [f"dropped {ECHO}", f"renewed {SHELL}"]
    renewed = certs.get(SHELL)
    assert renewed.not_after > first.not_after and renewed.key_pem != first.key_pem  # a new key each time
    # the CA unreachable: the still-valid certificate is kept; once expired, it is dropped
    failing["on"] = True
    clock["now"] = NOW + datetime.timedelta(hours=30)
    assert certs.sync({SHELL}) == [] and certs.get(SHELL) is renewed and "unreachable" in certs.errors[SHELL]
    clock["now"] = NOW + datetime.timedelta(hours=37)
    assert certs.sync({SHELL}) == [f"expired {SHELL}"] and certs.get(SHELL) is None


def test_the_roots_name_constraint_confines_it_to_its_trust_domain(ca, tmp_path):
    other = "spiffe://other.domain/ns/default/sa/shell"
    domain = ca.trust_domain
    ca.trust_domain = "other.domain"  # make the CA sign outside its domain, as a compromised signer could
    try:
        outside = workload(ca, other)
    finally:
        ca.trust_domain = domain
    root = ca_mod.cert_pem(ca.root)
    seen_by_server, _ = handshake(
        context(True, workload(ca, ECHO), root, str(tmp_path)), context(False, outside, root, str(tmp_path))
    )
    assert isinstance(seen_by_server, ssl.SSLError) and "certificate verify failed" in str(seen_by_server)
