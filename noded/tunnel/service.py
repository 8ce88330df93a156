"""The identity side of the daemon: certificates for the identities of this node's enrolled pods.

With `tunnel.caKey` set, this node issues them itself through `Issuer`, which applies the node restriction
against the pods the node runs. Without it there is no issuer yet (a remote CA is issue 6's next step) and
the status says so. Synced every `SYNC_PERIOD` seconds on the shared loop (key generation and signing in a
worker thread).
"""

from __future__ import annotations

import asyncio
import datetime
import os

import structlog

from noded.config import TunnelConfig
from noded.loopthread import LoopThread
from noded.redirect.enrollment import Enrollment
from noded.tunnel.ca import CertificateAuthority, Issuer, spiffe_id
from noded.tunnel.certs import CertManager

log = structlog.get_logger("noded.tunnel")
SYNC_PERIOD = 5.0


class IdentityService:
    def __init__(self, config: TunnelConfig, node: str, enrollment: Enrollment, loop: LoopThread) -> None:
        self.config = config
        self.node = node
        self.enrollment = enrollment
        self.loop = loop
        self.certs: CertManager | None = None
        self.error: str | None = None
        self._task: asyncio.Task | None = None

    def wanted(self) -> set[str]:
        return {spiffe_id(self.config.trustDomain, ns, sa) for ns, sa in self.enrollment.enrolled_accounts()}

    def start(self) -> None:
        cfg = self.config
        if not cfg.caKey:
            self.error = "no tunnel.caKey: this node has no certificate issuer (a remote CA is not built yet)"
            log.warning("workload certificates disabled", reason=self.error)
            return
        try:
            ca = CertificateAuthority.load(cfg.rootCert, cfg.caKey)
        except (OSError, ValueError) as e:
            self.error = f"CA not loadable from {cfg.rootCert} / {cfg.caKey}: {e}"
            log.error("workload certificates disabled", reason=self.error)
            return
        ttl = datetime.timedelta(seconds=cfg.certTTL)
        issuer = Issuer(ca, lambda node: self.wanted() if node == self.node else set(), ttl)
        self.certs = CertManager(lambda identity, public_key: issuer.request(self.node, identity, public_key))
        self._task = self.loop.run(self._spawn())

    async def _spawn(self) -> asyncio.Task:
        return asyncio.ensure_future(self._keep())

    async def _keep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            done = await loop.run_in_executor(None, lambda: self.certs.sync(self.wanted()))
            if done:
                log.info("workload certificates", changes=done)
            await asyncio.sleep(SYNC_PERIOD)

    def stop(self) -> None:
        if self._task is not None:
            self.loop.loop.call_soon_threadsafe(self._task.cancel)

    def status(self) -> dict:
        return {
            "trustDomain": self.config.trustDomain,
            "issuer": "local" if self.certs else None,
            "certificates": self.certs.status() if self.certs else [],
            "errors": {**(self.certs.errors if self.certs else {}), **({"issuer": self.error} if self.error else {})},
            "rootCert": self.config.rootCert if os.path.exists(self.config.rootCert) else None,
        }
