"""kube-proxy's service health checks: one HTTP server per healthCheckNodePort, answering 200 while this
node has a ready local endpoint of the service and 503 otherwise, so a load balancer sends
externalTrafficPolicy Local traffic only to nodes that can serve it."""

from __future__ import annotations

import json
import threading
from http.server import ThreadingHTTPServer

import structlog

from noded.observe import serve

log = structlog.get_logger("noded.services.healthcheck")


def health_response(service: str, local_endpoints: int, healthy: bool = True) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body kube-proxy's health check server gives; `healthy` False (this node is being
    deleted or drained by the cluster autoscaler, KEP-3836) answers 503 whatever the endpoints."""
    namespace, name = service.split("/", 1)
    body = {
        "service": {"namespace": namespace, "name": name},
        "localEndpoints": local_endpoints,
        "serviceProxyHealthy": healthy,
    }
    headers = {
        "Content-Type": "application/json",
        "X-Content-Type-Options": "nosniff",
        "X-Load-Balancing-Endpoint-Weight": str(local_endpoints),
    }
    return (200 if local_endpoints > 0 and healthy else 503), headers, json.dumps(body).encode()


class HealthCheckServers:
    """Keeps one listener per wanted healthCheckNodePort; update() is cheap when nothing changed."""

    def __init__(self, host: str = "0.0.0.0", healthy=lambda: True) -> None:
        self.host = host
        self.healthy = healthy  # the node's own state (eligible for load balancers)
        self._servers: dict[int, ThreadingHTTPServer] = {}
        self._state: dict[int, tuple[str, int]] = {}
        self._lock = threading.Lock()

    def update(self, checks: dict[int, tuple[str, int]]) -> None:
        with self._lock:
            self._state = dict(checks)
        for port in set(self._servers) - set(checks):
            self._servers.pop(port).shutdown()
            log.info("health check port closed", port=port)
        for port in set(checks) - set(self._servers):
            try:
                self._servers[port] = self._listen(port)
                log.info("health check port open", port=port, service=checks[port][0])
            except OSError as e:
                log.error("health check port unavailable", port=port, service=checks[port][0], error=str(e))

    def ports(self) -> list[int]:
        return sorted(self._servers)

    def close(self) -> None:
        self.update({})

    def _listen(self, port: int) -> ThreadingHTTPServer:
        def answer() -> tuple[int, dict[str, str], bytes]:
            with self._lock:
                service, count = self._state.get(port, ("unknown/unknown", 0))
            return health_response(service, count, self.healthy())

        return serve((self.host, port), {}, f"healthcheck-{port}", fallback=answer)
