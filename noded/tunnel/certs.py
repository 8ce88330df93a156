"""This node's workload certificates: one per identity running here, obtained, rotated, dropped.

`sync(wanted)` makes the held set match the identities of this node's pods: a missing one gets a fresh key
(made here) and a certificate from the issuer; one past half its lifetime (Istio's grace ratio 0.5) is
renewed; one no longer wanted is dropped. A failed request keeps a still-valid certificate and is retried
at the next sync. Sans-IO: the issuer call and the clock are passed in.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from cryptography import x509

from noded.tunnel.ca import key_pem, new_key, public_pem

log = structlog.get_logger("noded.tunnel.certs")
GRACE_RATIO = 0.5


@dataclass(frozen=True)
class WorkloadCert:
    identity: str
    cert_pem: bytes
    key_pem: bytes
    not_before: datetime.datetime
    not_after: datetime.datetime

    def renew_at(self) -> datetime.datetime:
        return self.not_before + (self.not_after - self.not_before) * GRACE_RATIO


class CertManager:
    def __init__(
        self,
        request: Callable[[str, bytes], bytes],
        clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    ) -> None:
        self.request = request  # (identity, public key PEM) -> certificate PEM
        self.clock = clock
        self.held: dict[str, WorkloadCert] = {}
        self.errors: dict[str, str] = {}

    def sync(self, wanted: set[str]) -> list[str]:
        """Obtain, renew and drop certificates so that exactly `wanted` are held; what was done."""
        now = self.clock()
        done = []
        for identity in sorted(set(self.held) - wanted):
            del self.held[identity]
            done.append(f"dropped {identity}")
        for identity in sorted(wanted):
            held = self.held.get(identity)
            if held is not None and now < held.renew_at():
                continue
            key = new_key()
            try:
                pem = self.request(identity, public_pem(key))
            except Exception as e:  # the CA unreachable or refusing: keep what still works, retry later
                self.errors[identity] = str(e)
                log.warning("certificate request failed", identity=identity, error=str(e))
                if held is not None and now >= held.not_after:
                    del self.held[identity]
                    done.append(f"expired {identity}")
                continue
            cert = x509.load_pem_x509_certificate(pem)
            self.held[identity] = WorkloadCert(
                identity, pem, key_pem(key), cert.not_valid_before_utc, cert.not_valid_after_utc
            )
            self.errors.pop(identity, None)
            done.append(f"{'renewed' if held else 'issued'} {identity}")
        return done

    def get(self, identity: str) -> WorkloadCert | None:
        return self.held.get(identity)

    def status(self) -> list[dict]:
        return [
            {"identity": c.identity, "notAfter": c.not_after.isoformat(), "renewAt": c.renew_at().isoformat()}
            for c in sorted(self.held.values(), key=lambda c: c.identity)
        ]
