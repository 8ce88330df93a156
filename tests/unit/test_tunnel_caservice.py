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
