"""The CA service over real mutual TLS: a node is issued the identities of its own pods only, the node name
comes from its certificate, and neither a workload certificate nor a foreign node is served."""

from __future__ import annotations

import asyncio
import datetime

import pytest

from noded.tunnel import ca as ca_mod
from noded.tunnel.ca import CertificateAuthority, Issuer, NotAuthorized, create_root
from noded.tunnel.caservice import RemoteIssuer, load_credentials, node_credentials, serve
from tests.unit.test_tunnel_identity import ECHO, SHELL, TD, workload


def test_nodes_get_their_own_pods_identities_only(tmp_path):
    ca = CertificateAuthority(*create_root(TD))
    root = ca_mod.cert_pem(ca.root)
    issuer = Issuer(ca, {"node1": {SHELL}, "node2": {ECHO}}.get, ttl=datetime.timedelta(hours=1))
    own = load_credentials(*node_credentials(ca, "ca-node", str(tmp_path / "nodes")))
    node1 = load_credentials(*node_credentials(ca, "node1", str(tmp_path / "nodes")))
    foreign_ca = CertificateAuthority(*create_root(TD))
    foreign = load_credentials(*node_credentials(foreign_ca, "node1", str(tmp_path / "foreign")))
    keys = str(tmp_path / "keys")

    async def main():
        server = await serve("127.0.0.1", 0, issuer, own, root, keys)
        address = ("127.0.0.1", server.sockets[0].getsockname()[1])
        loop = asyncio.get_running_loop()
        key = ca_mod.public_pem(ca_mod.new_key())

        def ask(creds, identity):
            return RemoteIssuer(address, creds, root, keys).request(identity, key, timeout=5)

        cert = await loop.run_in_executor(None, ask, node1, SHELL)
        assert b"BEGIN CERTIFICATE" in cert
        with pytest.raises(NotAuthorized, match="node1 runs no pod with identity"):
            await loop.run_in_executor(None, ask, node1, ECHO)
        with pytest.raises(NotAuthorized, match="no answer"):  # a workload's certificate is no node's
            await loop.run_in_executor(None, ask, workload(ca, ECHO), ECHO)
        with pytest.raises((OSError, NotAuthorized)):  # another cluster's node: refused in the handshake
            await loop.run_in_executor(None, ask, foreign, SHELL)
        server.close()

    asyncio.run(main())


def test_a_key_file_already_there_with_a_loose_mode_is_replaced_by_a_0600_one(tmp_path):
    """Issue 17, item 13: os.open(O_CREAT, 0o600) keeps the mode of a file that exists (0644: readable by
    every user of the node)."""
    import os
    import stat

    nodes = tmp_path / "nodes"
    nodes.mkdir()
    (nodes / "node1-key.pem").write_text("old")
    os.chmod(nodes / "node1-key.pem", 0o644)
    ca = CertificateAuthority(*create_root(TD))
    _cert, key = node_credentials(ca, "node1", str(nodes))
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert (nodes / "node1-key.pem").read_text().startswith("-----BEGIN")
    root_dir = tmp_path / "root"
    root_dir.mkdir()
    (root_dir / "root-key.pem").write_text("old")
    os.chmod(root_dir / "root-key.pem", 0o644)
    _root, root_key = ca_mod.write_root(str(root_dir), TD)
    assert stat.S_IMODE(os.stat(root_key).st_mode) == 0o600


# -- CA lifecycle (issue 17, item 12) --------------------------------------------------------------
def test_the_ca_signs_only_keys_it_accepts():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    ca = CertificateAuthority(*create_root(TD))
    spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo

    def pem(key):
        return key.public_key().public_bytes(*spki)

    for weak in (rsa.generate_private_key(65537, 1024), ec.generate_private_key(ec.SECP256K1())):
        with pytest.raises(NotAuthorized, match="key not accepted"):
            ca.issue(SHELL, pem(weak), datetime.timedelta(hours=1))
    with pytest.raises(NotAuthorized, match="not a public key"):
        ca.issue(SHELL, b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", datetime.timedelta(hours=1))
    for good in (ec.generate_private_key(ec.SECP256R1()), rsa.generate_private_key(65537, 2048)):
        assert b"BEGIN CERTIFICATE" in ca.issue(SHELL, pem(good), datetime.timedelta(hours=1))


async def fake_ca(creds, root, keys, answer):
    """A TLS server speaking the CA protocol, presenting `creds` and answering `answer(request)`."""
    import json

    from noded.tunnel.tls import context

    async def handle(reader, writer):
        while line := await reader.readline():
            writer.write(json.dumps(answer(json.loads(line))).encode() + b"\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context(True, creds, root, keys))
    return server, ("127.0.0.1", server.sockets[0].getsockname()[1])


def test_a_node_checks_the_ca_service_and_what_it_hands_back(tmp_path):
    """Issue 17, item 12: the node checked neither the CA server's identity nor the certificate it got
    (key, name, signature)."""
    ca = CertificateAuthority(*create_root(TD))
    other_ca = CertificateAuthority(*create_root(TD))
    root = ca_mod.cert_pem(ca.root)
    keys = str(tmp_path / "keys")
    node1 = load_credentials(*node_credentials(ca, "node1", str(tmp_path / "nodes")))
    ca_node = load_credentials(*node_credentials(ca, "ca-node", str(tmp_path / "nodes")))
    my_key = ca_mod.new_key()
    mine = ca_mod.public_pem(my_key)

    def honest(req):
        return {"cert": ca.issue(req["identity"], req["publicKey"].encode(), datetime.timedelta(hours=1)).decode()}

    answers = {
        "another identity": lambda req: {"cert": ca.issue(ECHO, mine, datetime.timedelta(hours=1)).decode()},
        "another key": lambda req: {
            "cert": ca.issue(req["identity"], ca_mod.public_pem(ca_mod.new_key()), datetime.timedelta(hours=1)).decode()
        },
        "not the root's": lambda req: {
            "cert": other_ca.issue(req["identity"], req["publicKey"].encode(), datetime.timedelta(hours=1)).decode()
        },
        "expired": lambda req: {
            "cert": ca.issue(
                req["identity"],
                req["publicKey"].encode(),
                datetime.timedelta(minutes=1),
                now=datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=2),
            ).decode()
        },
    }

    async def main():
        loop = asyncio.get_running_loop()
        for why, answer in answers.items():
            server, address = await fake_ca(ca_node, root, keys, answer)
            remote = RemoteIssuer(address, node1, root, keys)
            with pytest.raises(NotAuthorized, match="bad certificate"):
                await loop.run_in_executor(None, remote.request, SHELL, mine)
            server.close()
            assert why
        # a CA service presenting a workload certificate (any meshed pod's) is no CA service
        server, address = await fake_ca(workload(ca, ECHO), root, keys, honest)
        with pytest.raises(NotAuthorized, match="is no node"):
            await loop.run_in_executor(None, RemoteIssuer(address, node1, root, keys).request, SHELL, mine)
        server.close()
        server, address = await fake_ca(ca_node, root, keys, honest)
        assert b"BEGIN CERTIFICATE" in await loop.run_in_executor(
            None, RemoteIssuer(address, node1, root, keys).request, SHELL, mine
        )
        server.close()

    asyncio.run(main())


def test_node_certificates_are_renewed_at_half_life_and_revoked_ones_refused(tmp_path):
    """Issue 17, item 12: node certificates lasted a year, were loaded once, never renewed nor revoked."""
    import os
    import stat

    from noded.tunnel.caservice import NODE_CERT_TTL, Revocations

    ca = CertificateAuthority(*create_root(TD))
    root = ca_mod.cert_pem(ca.root)
    keys = str(tmp_path / "keys")
    nodes = str(tmp_path / "nodes")
    issuer = Issuer(ca, {"node1": {SHELL}}.get, ttl=datetime.timedelta(hours=1))
    own = load_credentials(*node_credentials(ca, "ca-node", nodes))
    cert_path, key_path = node_credentials(ca, "node1", nodes)
    first = load_credentials(cert_path, key_path)
    assert first.not_after - first.not_before <= NODE_CERT_TTL + datetime.timedelta(minutes=2)
    revoked_file = tmp_path / "revoked"
    revoked_file.write_text("# none yet\n")

    async def main():
        server = await serve("127.0.0.1", 0, issuer, own, root, keys, Revocations(str(revoked_file)))
        address = ("127.0.0.1", server.sockets[0].getsockname()[1])
        loop = asyncio.get_running_loop()
        remote = RemoteIssuer(address, first, root, keys, paths=(cert_path, key_path))
        assert not await loop.run_in_executor(None, remote.renew_node_if_due)  # not due yet
        later = first.renew_at() + datetime.timedelta(minutes=1)
        assert await loop.run_in_executor(None, lambda: remote.renew_node_if_due(now=later))
        renewed = load_credentials(cert_path, key_path)
        assert renewed.cert_pem != first.cert_pem and renewed.not_after >= first.not_after
        assert renewed.identity == first.identity
        assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
        key = ca_mod.public_pem(ca_mod.new_key())
        assert b"BEGIN CERTIFICATE" in await loop.run_in_executor(None, remote.request, SHELL, key)
        # revoked by serial: the old certificate; by name: the node altogether
        from cryptography import x509

        old_serial = x509.load_pem_x509_certificate(first.cert_pem).serial_number
        revoked_file.write_text(f"{old_serial:x}\n")
        stale = RemoteIssuer(address, first, root, keys)
        with pytest.raises((OSError, NotAuthorized)):
            await loop.run_in_executor(None, stale.request, SHELL, key)
        assert b"BEGIN CERTIFICATE" in await loop.run_in_executor(None, remote.request, SHELL, key)
        revoked_file.write_text("node1\n")
        with pytest.raises((OSError, NotAuthorized)):
            await loop.run_in_executor(None, remote.request, SHELL, key)
        server.close()

    asyncio.run(main())
