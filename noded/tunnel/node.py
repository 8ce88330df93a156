"""The tunnel's decisions for the capture listeners: where an outbound connection goes and whether over
HBONE, which certificate a pod presents, and whether an inbound connection is allowed.

Outbound: a cluster IP is resolved to one of its endpoints (ready ones, else serving-terminating, chosen at
random as the service backends do); a destination that is an enrolled pod gets HBONE to its 15008 with
the source pod's certificate, anything else plain TCP. Inbound, over HBONE or plaintext, is decided by the
AuthorizationPolicies (noded/tunnel/policy.py) for the destination pod; denials are counted and logged.
"""

from __future__ import annotations

import dataclasses
import os
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from noded.model.pods import Enrollment, PodKey
from noded.model.tracker import ServiceModel
from noded.tunnel.ca import spiffe_id
from noded.tunnel.certs import WorkloadCert
from noded.tunnel.policy import Authorizer, Connection
from noded.tunnel.service import IdentityService
from noded.tunnel.telemetry import TcpTelemetry, Workload, canonical
from noded.tunnel.tls import context

log = structlog.get_logger("noded.tunnel")


@dataclass(frozen=True)
class Route:
    ip: str
    port: int
    peer_identity: str | None  # the destination workload's SPIFFE ID when it is meshed: HBONE
    refused: bool = False  # a service port without endpoints


class Tunnel:
    def __init__(
        self,
        model: ServiceModel,
        enrollment: Enrollment,
        identities: IdentityService,
        authorizer: Authorizer,
        key_dir: str,
    ) -> None:
        self.model = model
        self.enrollment = enrollment
        self.identities = identities
        self.authorizer = authorizer
        self.key_dir = key_dir
        self.trust_domain = identities.config.trustDomain
        self._contexts: dict[tuple[bool, int], tuple[WorkloadCert, ssl.SSLContext]] = {}
        self.counts = {"hbone_out": 0, "plain_out": 0, "hbone_in": 0, "plain_in": 0, "denied": 0}
        self.telemetry = TcpTelemetry()
        self.policies_ready: Callable[[], bool] = lambda: True  # the daemon ties it to its source
        self.waypoints = None  # noded/waypoint/service.py WaypointService, set by the daemon

    def identity_of(self, pod: PodKey) -> str | None:
        info = self.enrollment.pod(pod)
        return spiffe_id(self.trust_domain, pod[0], info.account) if info else None

    def workload_of(self, pod: PodKey | None) -> Workload:
        """One side of a connection for telemetry: a pod's workload, labels and principal (unknown if not)."""
        info = self.enrollment.pod(pod) if pod else None
        if info is None or pod is None:
            return Workload()
        service, revision, app, version = canonical(info.labels, info.workload or pod[1])
        principal = spiffe_id(self.trust_domain, pod[0], info.account)
        return Workload(info.workload or pod[1], pod[0], principal, service, revision, app, version)

    def workload_at(self, ip: str) -> Workload:
        return self.workload_of(self.enrollment.workload_at(ip))

    def service_at(self, ip: str, port: int) -> tuple[str, str] | None:
        """(name, namespace) of the Service whose cluster IP:port this is, or None."""
        state = self.model.cluster_frontend(ip, port)
        return (state.service.name.name, state.service.name.namespace) if state is not None else None

    def route(self, ip: str, port: int) -> Route:
        state = self.model.cluster_frontend(ip, port)
        if state is not None:
            backends = state.ready or state.terminating
            if not backends:
                return Route(ip, port, None, refused=True)
            ip, port = random.choice(backends)
        workload = self.enrollment.workload_at(ip)
        meshed = workload is not None and self.enrollment.enrolled(*workload)
        return Route(ip, port, self.identity_of(workload) if meshed else None)

    def context(self, server: bool, identity: str | None) -> ssl.SSLContext | None:
        """The TLS context presenting `identity`'s current certificate; None while there is none."""
        certs = self.identities.certs
        cert = certs.get(identity) if certs and identity else None
        if cert is None:
            return None
        key = (server, hash(identity))
        held = self._contexts.get(key)
        if held is None or held[0] is not cert:  # issued or renewed since
            with open(self.identities.config.rootCert, "rb") as f:
                root = f.read()
            held = self._contexts[key] = (cert, context(server, cert, root, self.key_dir))
        return held[1]

    def server_context(self, pod: PodKey) -> ssl.SSLContext:
        """The context a pod's 15008 listener is made with: at each handshake (its SNI callback) it switches
        to a context presenting the pod's current certificate, so issue and renewal need no new listener.
        A pod without a certificate yet fails the handshake."""
        base = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        base.minimum_version = ssl.TLSVersion.TLSv1_3
        base.verify_mode = ssl.CERT_REQUIRED  # kept from here by the connection, whatever context it switches to
        if os.path.exists(self.identities.config.rootCert):
            with open(self.identities.config.rootCert, "rb") as f:
                base.load_verify_locations(cadata=f.read().decode())

        def choose(sslobj: ssl.SSLObject, _server_name: str | None, _ctx: ssl.SSLContext) -> int | None:
            current = self.context(True, self.identity_of(pod))
            if current is None:
                return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
            sslobj.context = current
            return None

        base.sni_callback = choose
        return base

    def authorize(self, pod: PodKey, identity: str | None, source_ip: str, dest_ip: str, port: int) -> bool:
        if not self.policies_ready():  # never listed (403, API server away): unknown policy means deny
            self.counts["denied"] += 1
            self._denied(pod, identity, source_ip)
            log.info("connection denied: policies not known yet", destination=f"{pod[0]}/{pod[1]}", port=port)
            return False
        info = self.enrollment.pod(pod)
        principal = identity.removeprefix("spiffe://") if identity else None
        conn = Connection(pod[0], info.labels if info else {}, port, source_ip, dest_ip, principal, info is not None)
        decision = self.authorizer.check(conn)
        if not decision.allowed:
            self.counts["denied"] += 1
            self._denied(pod, identity, source_ip)
            log.info(
                "connection denied",
                destination=f"{pod[0]}/{pod[1]}",
                port=port,
                source=identity or source_ip,
                policy=decision.policy,
                reason=decision.reason,
            )
        return decision.allowed

    def _denied(self, pod: PodKey, identity: str | None, source_ip: str) -> None:
        source = self.workload_at(source_ip)
        if identity:
            source = dataclasses.replace(source, principal=identity)
        self.telemetry.deny(source, self.workload_of(pod), identity is not None)

    def status(self) -> dict:
        return {**self.counts, "policies": sorted(self.authorizer.policies), "rejected": self.authorizer.rejected}
