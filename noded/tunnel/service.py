"""The identity side of the daemon: certificates for the identities of this node's enrolled pods.

With `tunnel.caKey` set, this node issues them itself through `Issuer`, which applies the node
restriction against the pods each node runs, and with `tunnel.caListen` serves the other nodes
(noded/tunnel/caservice.py). With `tunnel.caAddress` instead, it asks that service with its node
certificate. Synced by the shared runner (noded/runner.py) on the shared loop every `SYNC_PERIOD` seconds
and when this node's pods change, a failure retried (key generation and signing in a worker thread). The CA
service also serves the other nodes' pods (tunnel/workloads.py): a node asking it takes them from there, its
source then watching only its own Pods.
"""

from __future__ import annotations

import asyncio
import datetime
import os

import structlog

from noded.config import TunnelConfig, split_hostport
from noded.loopthread import LoopThread
from noded.model.pods import Enrollment
from noded.runner import AsyncRunner
from noded.tunnel.ca import CertificateAuthority, Issuer, key_pem, new_key, public_pem, spiffe_id
from noded.tunnel.caservice import (
    NODE_CERT_TTL,
    RemoteIssuer,
    Revocations,
    load_credentials,
    load_credentials_pem,
    serve,
)
from noded.tunnel.certs import CertManager, WorkloadCert
from noded.tunnel.tls import present
from noded.tunnel.workloads import WorkloadFeed, WorkloadStream

log = structlog.get_logger("noded.tunnel")
SYNC_PERIOD = 5.0
MIN_SYNC_GAP = 0.5


class IdentityService:
    def __init__(
        self,
        config: TunnelConfig,
        node: str,
        enrollment: Enrollment,
        loop: LoopThread,
        key_dir: str = "/run/noded/keys",
        waypoints=None,
    ) -> None:
        self.config = config
        self.waypoints = waypoints  # noded/waypoint/registry.py Registry: the waypoints a node may carry
        self.key_dir = key_dir
        self.issuer_kind: str | None = None
        self.ca_server = None
        self.node = node
        self.enrollment = enrollment
        self.loop = loop
        self.certs: CertManager | None = None
        self.error: str | None = None
        # on the shared runner: every SYNC_PERIOD, and sooner when this node's pods change (`changed`)
        self.runner = AsyncRunner("certificates", self._sync, MIN_SYNC_GAP, SYNC_PERIOD, SYNC_PERIOD)
        self._stream_task: asyncio.Task | None = None
        self.feed: WorkloadFeed | None = None  # the CA node: other nodes' pods served to them
        self.stream: WorkloadStream | None = None  # a node asking the CA node: other nodes' pods from it

    def wanted(self, node: str | None = None) -> set[str]:
        """The identities of the enrolled pods of this node (or of `node`), and of the waypoints of the
        namespaces those pods are in: the waypoint runs on the node of the endpoint a client reaches, so a
        node carries the waypoint of a namespace where it runs an enrolled pod (and no other)."""
        accounts = self.enrollment.enrolled_accounts(None if node in (None, self.node) else node)
        wanted = {spiffe_id(self.config.trustDomain, ns, sa) for ns, sa in accounts}
        namespaces = {ns for ns, _sa in accounts}
        for waypoint in self.waypoints.waypoints() if self.waypoints is not None else ():
            if waypoint.namespace in namespaces:
                wanted.add(waypoint.identity(self.config.trustDomain))
        return wanted

    def start(self) -> None:
        cfg = self.config
        try:
            with open(cfg.rootCert, "rb") as f:
                root = f.read()
            if cfg.caKey:
                self._start_local(root)
            elif cfg.caAddress:
                remote = RemoteIssuer(
                    split_hostport(cfg.caAddress),
                    load_credentials(cfg.nodeCert, cfg.nodeKey),
                    root,
                    self.key_dir,
                    paths=(cfg.nodeCert, cfg.nodeKey),  # renewed there at half life
                )
                self.certs = CertManager(remote.request)
                self.issuer_kind = f"remote {cfg.caAddress}"
                if self.enrollment.remote_from_stream:  # other nodes' pods from the CA node, not the API
                    self.stream = WorkloadStream(
                        split_hostport(cfg.caAddress), lambda: remote.context, remote.trust_domain, self.enrollment
                    )
                    self._stream_task = self.loop.spawn(self.stream.run())
            else:
                self.error = "neither tunnel.caKey nor tunnel.caAddress: no certificate issuer"
                log.warning("workload certificates disabled", reason=self.error)
                return
        except (OSError, ValueError) as e:
            self.error = f"certificate issuer not usable: {e}"
            log.error("workload certificates disabled", reason=self.error)
            return
        self.runner.start(self.loop.loop)

    def _start_local(self, root: bytes) -> None:
        cfg = self.config
        with open(cfg.caKey, "rb") as f:
            ca = CertificateAuthority(root, f.read())
        ttl = datetime.timedelta(seconds=cfg.certTTL)
        issuer = Issuer(ca, lambda node: self.wanted(node), ttl)
        self.certs = CertManager(lambda identity, public_key: issuer.request(self.node, identity, public_key))
        self.issuer_kind = "local"
        if cfg.caListen:
            self._ca = ca
            creds = self._ca_credentials()
            host, port = split_hostport(cfg.caListen)
            revoked = Revocations(cfg.caRevoked)
            self.feed = WorkloadFeed(self.enrollment, self.loop.loop)
            self.ca_server = self.loop.run(serve(host, port, issuer, creds, root, self.key_dir, revoked, self.feed))
            self._ca_creds = creds
            self.issuer_kind = f"local, serving {cfg.caListen}"
            log.info("CA serving certificate requests", address=cfg.caListen)

    def _ca_credentials(self) -> WorkloadCert:
        """The CA service's own node certificate (made here: this node holds the CA key)."""
        key = new_key()
        return load_credentials_pem(self._ca.issue_node(self.node, public_pem(key), NODE_CERT_TTL), key_pem(key))

    def _renew_ca_server(self) -> None:
        """The CA service presents a node certificate too: renewed at half life on the live server."""
        if self.ca_server is None or datetime.datetime.now(datetime.UTC) < self._ca_creds.renew_at():
            return
        self._ca_creds = self._ca_credentials()
        present(self.ca_server.tls_context, self._ca_creds, self.key_dir)
        log.info("CA service certificate renewed", until=str(self._ca_creds.not_after))

    def changed(self) -> None:
        """This node's pods or their enrollment changed: the certificates sooner than the next period."""
        self.runner.run()

    async def _sync(self, _full: bool) -> None:
        certs = self.certs
        assert certs is not None
        done = await asyncio.get_running_loop().run_in_executor(None, lambda: certs.sync(self.wanted()))
        if done:
            log.info("workload certificates", changes=done)
        self._renew_ca_server()

    def stop(self) -> None:
        self.runner.stop()
        if self._stream_task is not None:
            self.loop.loop.call_soon_threadsafe(self._stream_task.cancel)
        if self.ca_server is not None:
            self.loop.loop.call_soon_threadsafe(self.ca_server.close)

    def status(self) -> dict:
        return {
            "trustDomain": self.config.trustDomain,
            "issuer": self.issuer_kind,
            "certificates": self.certs.status() if self.certs else [],
            "errors": {
                **(self.certs.errors if self.certs else {}),
                **({"issuer": self.error} if self.error else {}),
                **({"sync": self.runner.last_error} if self.runner.last_error else {}),
            },
            "rootCert": self.config.rootCert if os.path.exists(self.config.rootCert) else None,
            **({"workloadFeed": self.feed.status()} if self.feed else {}),
            **({"workloadStream": self.stream.status()} if self.stream else {}),
        }
