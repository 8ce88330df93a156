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
