"""ztunnel's TCP telemetry: connections opened and closed and bytes each way, by Istio's standard labels.

Each captured connection (outbound from a pod of this node: reporter `source`; inbound to one: reporter
`destination`) is counted when it opens and when it closes, with its bytes. The counters are plain
dictionaries bumped on the loop thread; the metrics collector reads them at scrape time
(noded/daemon_metrics.py). Workload facts come from the enrollment's Pod view: the workload name (its
owner, a ReplicaSet's hash taken off, as Istio names a Deployment's pods), the canonical service and
revision from Istio's labels, the SPIFFE principal; what is not known is "unknown", as in Istio.
"""

from __future__ import annotations

from dataclasses import dataclass

LABELS = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)
UNKNOWN = "unknown"
CLUSTER = "Kubernetes"  # Istio's default cluster ID
MAX_SERIES = 10_000  # label sets kept; past it new ones are folded into one "unknown" series (bounded)


@dataclass(frozen=True)
class Workload:
    """One side of a connection, as Istio's labels name it."""

    name: str = UNKNOWN
    namespace: str = UNKNOWN
    principal: str = UNKNOWN
    canonical_service: str = UNKNOWN
    canonical_revision: str = UNKNOWN
    app: str = UNKNOWN
    version: str = UNKNOWN


def canonical(labels: dict[str, str], workload: str) -> tuple[str, str, str, str]:
    """(canonical service, canonical revision, app, version) from a pod's labels, Istio's rules."""
    service = (
        labels.get("service.istio.io/canonical-name")
        or labels.get("app.kubernetes.io/name")
        or labels.get("app")
        or workload
    )
    revision = (
        labels.get("service.istio.io/canonical-revision")
        or labels.get("app.kubernetes.io/version")
        or labels.get("version")
        or "latest"
    )
    return service, revision, labels.get("app", UNKNOWN), labels.get("version", UNKNOWN)


class TcpTelemetry:
    def __init__(self) -> None:
        self.opened: dict[tuple[str, ...], int] = {}
        self.closed: dict[tuple[str, ...], int] = {}
        self.request_bytes: dict[tuple[str, ...], int] = {}  # source -> destination: Istio's "received"
        self.response_bytes: dict[tuple[str, ...], int] = {}  # destination -> source: Istio's "sent"
        self.denied: dict[tuple[str, str, str, str, str], int] = {}  # (src ns, src, dst ns, dst, security)

    @staticmethod
    def key(
        reporter: str,
        source: Workload,
        destination: Workload,
        service: tuple[str, str] | None,
        mtls: bool,
        protocol: str = "tcp",
        flags: str = "-",
    ) -> tuple[str, ...]:
        """Istio's standard labels (LABELS, in order); the waypoint's request metrics add theirs after."""
        svc_name, svc_ns = service or (UNKNOWN, UNKNOWN)
        host = f"{svc_name}.{svc_ns}.svc.cluster.local" if service else UNKNOWN
        return (
            reporter,
            source.name,
            source.canonical_service,
            source.canonical_revision,
            source.namespace,
            source.principal,
            source.app,
            source.version,
            CLUSTER,
            host,
            svc_ns,
            svc_name,
            destination.name,
            destination.canonical_service,
            destination.canonical_revision,
            destination.namespace,
            destination.principal,
            destination.app,
            destination.version,
            CLUSTER,
            protocol,
            flags,
            "mutual_tls" if mtls else "unknown",
        )

    def deny(self, source: Workload, destination: Workload, mtls: bool) -> None:
        """A connection AuthorizationPolicy refused (for the traffic graph's denied edges)."""
        key = (source.namespace, source.name, destination.namespace, destination.name, "mutual_tls" if mtls else "none")
        if key in self.denied or len(self.denied) < MAX_SERIES:
            self.denied[key] = self.denied.get(key, 0) + 1

    def open(self, key: tuple[str, ...]) -> tuple[str, ...]:
        if key not in self.opened and len(self.opened) >= MAX_SERIES:
            key = (key[0],) + (UNKNOWN,) * (len(LABELS) - 1)
        self.opened[key] = self.opened.get(key, 0) + 1
        return key

    def close(self, key: tuple[str, ...], request: int, response: int) -> None:
        """The connection is over: `request` bytes went from the source to the destination, `response` back
        (Istio counts them, whichever side reports, as received and sent)."""
        self.closed[key] = self.closed.get(key, 0) + 1
        self.request_bytes[key] = self.request_bytes.get(key, 0) + request
        self.response_bytes[key] = self.response_bytes.get(key, 0) + response
