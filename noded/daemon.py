"""`noded run`: wires sources -> model -> sync runner -> service backend, and serves health and metrics.

The dataplane is not written until every source has synced once; stopping
leaves every kernel object in place so a restart disrupts nothing.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import structlog

from noded import __version__, graph
from noded.config import NodedConfiguration, split_hostport
from noded.files import write_atomic
from noded.kernel.addresses import local_addresses, nodeport_addresses
from noded.loopthread import LoopThread
from noded.memory import StartupCollection, release_memory
from noded.metrics import CONTENT_TYPE, DaemonMetrics
from noded.model.hub import Hub
from noded.model.pods import Enrollment
from noded.model.tracker import KeyChanges, ServiceModel
from noded.observe import liveness, rfc3339, sd_notify, serve
from noded.runner import BoundedFrequencyRunner
from noded.services.healthcheck import HealthCheckServers
from noded.services.proxier import Proxier
from noded.sources.base import Ahead, Source

log = structlog.get_logger("noded.daemon")
PODS_MIN_SYNC = 0.1  # the capture follows enrollment changes (labels) this soon at most
PODS_RETRY = 5.0  # a pod whose capture failed is tried again this often
PODS_RESYNC = 60.0  # and every pod checked this often


def make_source(config: NodedConfiguration, sink: Hub):
    if config.source.directory:
        from noded.sources.directory import DirectorySource

        return DirectorySource(config.source.directory, sink)
    from noded.sources.kube import KubeSource
    from noded.sources.kubeclient import load

    kinds = ("Service", "EndpointSlice", "Node")
    if config.capture.enabled:
        kinds += ("Pod", "Namespace", "AuthorizationPolicy", "Gateway", "HTTPRoute")
    api = load(config.source.kubeconfig, config.source.inCluster, config.source.apiServer)
    return KubeSource(api, sink, kinds=kinds, node_name=config.nodeName, own_pods_only=pods_from_ca(config))


def start_source(config: NodedConfiguration, sink: Hub) -> Source:
    """The source the config names, started, its name what the sink waits for."""
    source = make_source(config, sink)
    sink.expected = {source.name}
    source.start()
    return source


def pods_from_ca(config: NodedConfiguration) -> bool:
    """Whether other nodes' pods come from the CA node's workload stream (a node asking a remote CA), the
    source then watching this node's Pods only; a node holding the CA key watches every Pod."""
    return config.capture.enabled and bool(config.tunnel.caAddress) and not config.tunnel.caKey


def make_proxier(config: NodedConfiguration, model: ServiceModel) -> Proxier:
    from noded.cleanup import cleanup

    mode = config.services.mode
    for what in cleanup(config, keep=mode):
        log.info("removed state of another services mode", removed=what)
    if mode == "none":
        return None
    if mode == "nftables":
        from noded.services.nftables import NftProxier

        return NftProxier(model, config.clusterCIDRs)
    if mode == "iptables":
        from noded.services.iptables import IptablesProxier

        return IptablesProxier(model, config.clusterCIDRs)
    if mode == "ebpf":
        from noded.bpf.sock_lb import load_and_attach
        from noded.services.ebpf import EbpfProxier

        maps = load_and_attach(config.bpffsPath, config.services.cgroupPath)
        terminator = None
        if config.services.socketTermination:
            from noded.bpf.sock_term import SocketTerminator

            terminator = SocketTerminator(
                config.bpffsPath, config.services.cgroupPath, tcp=config.services.terminateTCPConnections
            )
        from noded.bpf.nat_gc import NatCollector

        return EbpfProxier(
            model,
            maps,
            config.bpffsPath,
            config.clusterCIDRs,
            config.services.cgroupPath,
            terminator=terminator,
            collector=NatCollector(config.bpffsPath),
        )
    raise SystemExit(f"services.mode: {mode!r} is not one of ebpf, nftables, iptables, none")


class Daemon:
    def __init__(self, config: NodedConfiguration, collection: StartupCollection | None = None) -> None:
        self.config = config
        self.collection = collection  # the collector paused for the start (`noded run`), resumed at the first sync
        self.model = ServiceModel(node_name=config.nodeName)
        self.health_checks = HealthCheckServers(healthy=lambda: self.model.node_eligible)
        self.enrollment = Enrollment(config.nodeName, remote_from_stream=pods_from_ca(config))
        self.sink = Hub(self.model, self.enrollment)  # what every source feeds
        self.pods = None  # PodManager, when capture is enabled
        self.proxy = None  # CaptureProxy, when capture is enabled
        self.api = None
        self.metrics = DaemonMetrics()
        self.stopping = threading.Event()
        self.proxier: Proxier | None = None
        self.runner: BoundedFrequencyRunner | None = None
        self.changes: KeyChanges | None = None
        self.pods_runner: BoundedFrequencyRunner | None = None  # the capture follows enrollment (labels)
        self.source = None
        self.started = time.time()
        self.status_path = os.path.join(os.path.dirname(config.api.socket), "status.json")
        self.loop = LoopThread()
        self.dns = None  # DnsService
        self.identities = None  # IdentityService, with capture
        self.tunnel = None  # Tunnel, with capture
        self.ready_notified = False
        self.restored_frontends = 0  # what the dataplane serves from the last run until the first sync
        self.first_synced = False
        self.first_sync_tried = False  # a services sync has run (ok or not)
        self.node_addresses: set[str] = set()  # every address of this node: DNS clients it answers

    def _refresh_node_addresses(self) -> None:
        cfg = self.config
        local = local_addresses()
        self.node_addresses = set(local)
        addrs = nodeport_addresses(local, cfg.services.nodePortAddresses, cfg.clusterCIDRs)
        if self.model.set_node_ips(addrs):
            log.info("node port addresses", addresses=addrs)
        if self.proxier is not None:
            self.proxier.set_external_interfaces(dict(local[a] for a in addrs if local[a][0] != "lo"))

    def _pods_changed(self) -> None:
        assert self.pods_runner is not None
        self.pods_runner.run()
        if self.identities is not None:
            self.identities.changed()

    def _queue_sync(self) -> None:
        self.metrics.proxy.queued()
        self.runner.run()

    def _sync(self, full: bool) -> None:
        if full:
            self._refresh_node_addresses()
        self._serve_cluster_dns()
        start = time.perf_counter()
        try:
            n = self.proxier.sync(full) if self.proxier else len(self.changes.take())
        except Exception:
            self.metrics.proxy.failures.inc()
            raise
        finally:
            self.first_sync_tried = True  # the DNS fast path's first full sync waits for this one
        took = time.perf_counter() - start
        self.metrics.proxy.observe_sync(took, full, self.changes.taken_since if self.changes else None)
        if self.proxier:
            self.health_checks.update(self.model.health_checks())
        if self.pods is not None:
            self.pods.set_cluster_dns(self._in_pod_dns())
        if n or full:
            log.info("services synced", full=full, services=n, seconds=round(took, 4))
        if not self.first_synced:
            self.first_synced = True
            if self.collection is not None:
                self.collection.resume()
            else:
                release_memory()
        self._write_status()
        if not self.ready_notified:  # systemd (Type=notify): dependants start once the dataplane is programmed
            self.ready_notified = True
            sd_notify(f"READY=1\nSTATUS=synced: {self.model.counts()[0]} services")
        else:
            sd_notify(f"STATUS=synced: {self.model.counts()[0]} services")

    def _ready_on_restored_state(self) -> None:
        """READY=1 as soon as this node's dataplane serves what it last knew: the hooks attached and the
        state pinned (eBPF) or left in the kernel (netfilter) by the last run restored, whatever the
        sources say. The container runtime and kubelet are ordered after noded and must never wait for an
        API server that kubelet itself may have to start (a static pod); the first sync follows."""
        from noded.services.view import programmed_views

        mode = self.config.services.mode
        views = (programmed_views(mode, self.config.bpffsPath) if mode != "none" else []) or []
        self.ready_notified = True
        self.restored_frontends = len(views)
        restored = f"{len(views)} frontends restored" if views else "nothing to restore"
        log.info("dataplane serving its last known state; ready", state=restored)
        sd_notify(f"READY=1\nSTATUS=serving the last known state ({restored}); waiting for sources")

    def run(self) -> int:
        cfg = self.config
        log.info("noded starting", node=cfg.nodeName, mode=cfg.services.mode, bpffs=cfg.bpffsPath)
        self.proxier = make_proxier(cfg, self.model)
        # the services' change tracker: the proxier's own (mode none: one for the DNS and capture side of a sync)
        self.changes = self.proxier.tracker if self.proxier else self.model.frontend_changes()
        self._ready_on_restored_state()
        self.runner = BoundedFrequencyRunner(
            "services", self._sync, cfg.services.minSyncPeriod, cfg.services.syncPeriod
        )
        self.changes.wake = self._queue_sync  # the model wakes the runner as a change arrives
        # the source lists on a thread of its own while what pods use locally (health, DNS, the capture and
        # CNI sockets) is set up here: neither waits for the other (the first list waits on the API server)
        source = Ahead(start_source, cfg, self.sink, name="source")
        self._serve()
        self.loop.start()
        self._start_dns()
        if cfg.capture.enabled:
            self._start_capture()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        self._write_status(waiting=True)
        self.source = source.result()
        if self._wait_for_sources():
            self.runner.start()
            if self.pods and self._wait_for_enrollment():
                self.pods.restore()
                self.pods_runner = BoundedFrequencyRunner(
                    "pods", lambda _full: self.pods.reconcile(), PODS_MIN_SYNC, PODS_RESYNC, PODS_RETRY
                )
                self.enrollment.watchers.append(self._pods_changed)
                self.pods_runner.start()
        self.stopping.wait()
        log.info("noded stopping")
        if self.api:
            self.api.stop(1)
        self.source.stop()
        self.runner.stop()
        if self.pods_runner is not None:
            self.pods_runner.stop()
        self.health_checks.close()
        self.dns.stop()
        if self.identities:
            self.identities.stop()
        self._uninstall_if_daemonset_deleted()
        return 0

    def _wait_for_sources(self) -> bool:
        """Until every source synced (True), or noded is stopping (False)."""
        started = time.monotonic()
        waiting_logged = status_written = started  # run() wrote the first status.json just before the source
        while not self.sink.all_synced.wait(0.2):
            if self.stopping.is_set():
                return False
            if time.monotonic() - status_written >= 1:
                status_written = time.monotonic()
                self._write_status(waiting=True)
            if time.monotonic() - waiting_logged >= 10:  # a slow API server: say what is still awaited
                waiting_logged = time.monotonic()
                log.info(
                    "waiting for sources",
                    synced=sorted(self.sink.synced_sources),
                    services_and_slices=self.model.counts(),
                    seconds=round(waiting_logged - started, 1),
                )
        log.info(
            "all sources synced; programming the dataplane",
            seconds=round(time.monotonic() - started, 3),
            services_and_slices=self.model.counts(),
        )
        return True

    def _wait_for_enrollment(self) -> bool:
        """Enrollment comes from Pods and Namespaces (and the workload stream): until all are in (True) no
        pod's capture is changed (a pod not known yet would look not enrolled: its capture must not be
        dropped on a restart); False: noded is stopping."""
        kind_synced = getattr(self.source, "kind_synced", None)
        while (kind_synced and not (kind_synced("Pod") and kind_synced("Namespace"))) or not (
            self.enrollment.remote_synced
        ):  # and the other nodes' pods, when they come from the CA node
            if self.stopping.wait(0.2):
                return False
        return True

    def _uninstall_if_daemonset_deleted(self) -> None:
        """A DaemonSet's noded whose DaemonSet was deleted leaves nothing behind (noded/sources/owner.py);
        a restart or an upgrade keeps every kernel object for the next start."""
        from noded.cleanup import cleanup
        from noded.sources.owner import uninstalling

        if uninstalling(self.config.source):
            removed = cleanup(self.config)
            log.info("noded's DaemonSet was deleted: kernel state removed", removed=len(removed))

    def _start_dns(self) -> None:
        from noded.dns.server import Clients
        from noded.dns.service import DnsService, make_resolver

        resolver = make_resolver(self.config, self.model, self.sink.all_synced.is_set)
        clients = Clients(self._pod_namespace, lambda: self.node_addresses)
        cfg = self.config
        fast_bpffs = cfg.bpffsPath if cfg.dns.fastPath else None
        self.dns = DnsService(resolver, self.loop, cfg.dns.listen, clients, fast_bpffs, cfg.clusterCIDRs)
        # the services' first sync goes first: userspace answers meanwhile, and the two no longer share the
        # CPU and the memory peak of a start
        self.dns.fast_path_after = lambda: self.first_sync_tried
        self.dns.start()
        self.node_addresses = set(local_addresses())  # with the node-local DNS addresses now added

    def _pod_namespace(self, address: str) -> str | None:
        namespace = self.enrollment.namespace_of(address)
        if namespace is None and self.pods is not None:
            namespace = self.pods.namespace_of(address)
        return namespace

    def _refusals(self) -> dict:
        """Peers and pods refused: HBONE servers with the wrong identity, calls of a pod to its own capture
        listeners, HBONE connections ended for protocol errors and abuse (by GOAWAY code)."""
        from noded.tunnel.h2conn import REFUSALS

        proxy = self.proxy
        return {
            "refusedPeers": proxy.hbone.refused_peers if proxy and proxy.hbone else 0,
            "selfCalls": proxy.self_calls if proxy else 0,
            "endedConnections": dict(REFUSALS),
        }

    def _serve_cluster_dns(self) -> None:
        """The cluster DNS addresses' port 53 is noded's own DNS on this node: served, and never translated."""
        if not (self.dns and self.dns.listen_on):
            return
        addresses = self.cluster_dns() if self.config.dns.serveClusterDNS else ()
        self.model.set_served_locally(frozenset((a, 53) for a in addresses))
        self.dns.serve_cluster_dns(addresses)

    def _in_pod_dns(self) -> tuple[str, ...]:
        """The addresses whose DNS the in-pod capture takes to 15053: none where the node serves them."""
        return () if self.config.dns.serveClusterDNS else self.cluster_dns()

    def cluster_dns(self) -> tuple[str, ...]:
        """The addresses pods use as their nameserver: configured, else kube-system/kube-dns's ClusterIPs."""
        return tuple(self.config.dns.clusterDNS) or self.model.cluster_ips("kube-system", "kube-dns")

    def _start_capture(self) -> None:
        from noded.api.server import serve as serve_api
        from noded.redirect.manager import PodManager
        from noded.redirect.proxy import CaptureProxy
        from noded.tunnel.node import Tunnel
        from noded.tunnel.service import IdentityService

        cfg = self.config
        key_dir = os.path.join(os.path.dirname(cfg.api.socket), "keys")
        from noded.waypoint.service import WaypointService

        self.identities = IdentityService(
            cfg.tunnel, cfg.nodeName, self.enrollment, self.loop, key_dir, waypoints=self.sink.waypoints
        )
        self.identities.start()
        self.tunnel = Tunnel(self.model, self.enrollment, self.identities, self.sink.policies, key_dir)
        self.tunnel.policies_ready = self._policies_listed
        self.tunnel.waypoints = WaypointService(self.tunnel, self.sink.waypoints)
        proxy = CaptureProxy(self.dns.resolver.resolve, self.loop, self.tunnel)
        if self.proxier is not None:
            proxy.on_mesh_netns = self.proxier.set_mesh_netns
        self.proxy = proxy
        state_dir = os.path.dirname(cfg.api.socket)
        direct = tuple(h for h, _ in (split_hostport(a) for a in cfg.dns.listen) if ":" not in h and h != "0.0.0.0")
        # where the node answers the cluster DNS addresses itself, the pods' DNS meets the fast path there and
        # no pod redirects it in-pod (nor needs a DNS-only capture); else 15053 in the pod, ztunnel's contract
        in_pod_dns = not cfg.dns.serveClusterDNS
        self.pods = PodManager(
            state_dir,
            self.enrollment,
            proxy,
            cfg.capture.dnsForAllPods and in_pod_dns,
            self._wait_for_pod,
            direct,
            self._in_pod_dns(),
        )
        handlers = {
            "PodAdd": self.pods.add,
            "PodDel": self.pods.delete,
            "PodCheck": self.pods.check,
            "PodGc": self.pods.gc,
            "PodInfo": self.pods.info,
            "Status": lambda _req: {
                "ok": True,
                "synced": self.sink.all_synced.is_set(),
                "dns": self.dns.status() if self.dns else None,
                "socketTermination": (self.proxier.extras() if self.proxier else {}).get("socketTermination"),
                "tunnel": {**self.identities.status(), **self.tunnel.status(), **self._refusals()}
                if self.tunnel
                else None,
                "waypoint": self.tunnel.waypoints.status() if self.tunnel else None,
            },
        }
        self.api = serve_api(cfg.api.socket, handlers)
        from noded.cni.forward import serve as serve_cni_forwarding

        self.cni_forward = serve_cni_forwarding(cfg.api.socket)  # for the static noded-cni

    def _policies_listed(self) -> bool:
        """Until the source has listed AuthorizationPolicies, inbound mesh traffic is denied."""
        source = self.source
        if source is None:
            return False
        if hasattr(source, "kind_synced"):
            return source.kind_synced("AuthorizationPolicy")
        return source.synced

    def _wait_for_pod(self, namespace: str, name: str, timeout: float = 2.0) -> bool:
        """A pod's labels decide its capture: wait briefly for its object if the source has not shown it."""
        deadline = time.monotonic() + timeout
        while not self.enrollment.knows(namespace, name):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def _serve(self) -> None:
        from noded.daemon_metrics import register_pulled

        register_pulled(self)
        stale_after = 2 * self.config.services.syncPeriod + 1  # kube-proxy's: two sync periods without a sync

        def healthz() -> tuple[int, str, str]:
            # kube-proxy's answer: healthy once synced, and while the last sync is younger than `stale_after`
            last = self.metrics.proxy.last_sync_timestamp
            now = time.time()
            synced = self.runner is not None and self.runner.syncs > 0 and self.runner.last_error is None
            eligible = self.model.node_eligible
            ok = synced and now - last < stale_after and eligible
            body = {
                "lastUpdated": rfc3339(last) if last else "",
                "currentTime": rfc3339(now),
                "nodeEligible": eligible,
            }
            code = 200 if ok else 503
            self.metrics.proxy.healthz.labels(str(code)).inc()
            return code, "application/json", json.dumps(body) + "\n"

        def livez() -> tuple[int, str, str]:
            answer = liveness(
                self.changes.since if self.changes else None,
                self.metrics.proxy.last_sync_timestamp,
                self.runner.last_error if self.runner else None,
                self.started,
                stale_after,
            )
            self.metrics.proxy.livez.labels(str(answer[0])).inc()
            return answer

        serve(split_hostport(self.config.healthzBindAddress), {"/healthz": healthz, "/livez": livez}, "healthz")
        serve(
            split_hostport(self.config.metricsBindAddress),
            {
                "/metrics": lambda: (200, CONTENT_TYPE, self.metrics.render()),
                "/graph": lambda: (200, "text/html; charset=utf-8", graph.PAGE),
                "/graph.json": lambda: (200, "application/json", json.dumps(graph.merge([self._graph_snapshot()]))),
                "/graph/snapshot.json": lambda: (200, "application/json", json.dumps(self._graph_snapshot())),
                # `noded services`: the Service behind each frontend (with capture or without)
                "/frontends.json": lambda: (200, "application/json", json.dumps(self.model.frontend_names())),
            },
            "metrics",
        )

    def _graph_snapshot(self) -> dict:
        """This node's part of the traffic graph (noded/graph.py): what its tunnel saw."""
        if self.tunnel is None:
            return {"nodes": [self.config.nodeName], "generated": time.time(), "edges": []}
        return graph.snapshot(self.tunnel.telemetry, self.config.nodeName)

    def _write_status(self, waiting: bool = False) -> None:
        """status.json for `noded status`: after each sync, and every second while the sources sync."""
        services, slices = self.model.counts()
        status = {
            "node": self.config.nodeName,
            "version": __version__,
            "pid": os.getpid(),
            "started": self.started,
            "mode": self.config.services.mode,
            "sources": {}
            if self.source is None
            else {
                self.source.name: {
                    "synced": self.source.synced,
                    "lastError": self.source.last_error,
                    **({"kinds": self.source.status()} if hasattr(self.source, "status") else {}),
                }
            },
            "services": services,
            "endpointSlices": slices,
            "rejectedObjects": self.model.rejected,
            "rejectedByKind": dict(self.sink.rejected_by_kind),
            "lastRejected": self.sink.last_rejected,
            "syncs": 0 if waiting else self.runner.syncs + 1 if self.runner else 0,
            "lastSync": None if waiting else time.time(),
            "lastSyncSeconds": None if waiting else self.metrics.proxy.last_sync_seconds,
            "restoredFrontends": self.restored_frontends,
            "nodePortAddresses": list(self.model.node_ips),
            "healthCheckPorts": self.health_checks.ports(),
            "lastSyncError": self.runner.last_error if self.runner else None,
            "dns": self.dns.status() if self.dns else None,
            "socketTermination": None,
            "nodePortFlows": None,
            **(self.proxier.extras() if self.proxier is not None else {}),
        }
        os.makedirs(os.path.dirname(self.status_path), exist_ok=True)
        write_atomic(self.status_path, json.dumps(status))
