"""The DNS side of the daemon: one resolver, the node-local listeners, the in-pod listeners' handler,
and the eBPF fast path kept in step with the model.

Built from `dns` in the config: upstreams from it or the host's resolv.conf (and the node's search
domains for the search-path shortcut), the cache caps, the zone TTL. Serves on the shared loop thread.
The fast path's records follow every model change as it happens: the model wakes their runner
(noded/runner.py; a change tracker of its own, so only the services that changed are rewritten); it sits on
the ingress of the interfaces holding an address inside the cluster CIDRs (the pods' bridge), checked every
`INTERFACE_CHECK` seconds by a second runner since the bridge appears with the node's first pod.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable

import structlog

from noded.config import NodedConfiguration, split_hostport
from noded.dns.cache import AnswerCache
from noded.dns.resolver import Resolver, read_resolv_conf
from noded.dns.server import Clients, serve
from noded.dns.upstream import Upstreams
from noded.kernel import dnslisten as listen
from noded.loopthread import LoopThread
from noded.memory import release_memory
from noded.model.tracker import ServiceModel
from noded.runner import AsyncRunner, NotYet

log = structlog.get_logger("noded.dns")
FAST_SYNC = 0.1  # until the sources have synced, and after a failure: the records retried this often
RECORDS_RESYNC = 3600.0  # the whole zone rewritten (repairing what was changed behind noded's back)
INTERFACE_CHECK = 2.0


def make_resolver(config: NodedConfiguration, model: ServiceModel, ready=lambda: True) -> Resolver:
    cfg = config.dns
    host_servers, search = read_resolv_conf(cfg.resolvConf)
    upstreams = [split_hostport(u, 53) for u in cfg.upstreams] or [(h, 53) for h in host_servers]
    own = {split_hostport(a) for a in cfg.listen}
    pool = Upstreams(upstreams, own, max_concurrent=cfg.maxConcurrent)
    cache = AnswerCache(cfg.cacheCapacity, cfg.cacheMaxTTL, cfg.servfailTTL)
    return Resolver(model, pool, config.clusterDomain, cfg.ttl, cache, search, ready)


def pod_interfaces(addresses: dict[str, tuple[str, int]], cluster_cidrs: list[str]) -> dict[str, int]:
    """{name: ifindex} of the interfaces holding an address inside the cluster CIDRs (the pod gateways)."""
    nets = [ipaddress.ip_network(c, strict=False) for c in cluster_cidrs]
    out = {}
    for text, (name, index) in addresses.items():
        ip = ipaddress.ip_address(text.split("%")[0])
        if name != "lo" and any(ip.version == net.version and ip in net for net in nets):
            out[name] = index
    return out


class DnsService:
    def __init__(
        self,
        resolver: Resolver,
        loop: LoopThread,
        listen_on: list[str],
        clients: Clients,
        fast_path_bpffs: str | None = None,
        cluster_cidrs: list[str] | None = None,
    ) -> None:
        self.resolver = resolver
        self.loop = loop
        self.listen_on = [split_hostport(a) for a in listen_on]
        self.clients = clients
        self.closers: list = []
        self.errors: dict[str, str] = {}
        self.fast_path_bpffs = fast_path_bpffs
        self.cluster_cidrs = cluster_cidrs or []
        self.fast = None  # DnsFastPath
        # the fast path's two loops, on the shared runner: records (each change; the whole zone at first, on a
        # failure and every RECORDS_RESYNC) and links (every INTERFACE_CHECK)
        self._records = AsyncRunner("dns-records", self._sync_records, 0.0, RECORDS_RESYNC, FAST_SYNC)
        self._links = AsyncRunner("dns-links", self._attach, 0.0, INTERFACE_CHECK, INTERFACE_CHECK)
        self._records_synced = False
        self.fast_path_after: Callable[[], bool] = lambda: True  # the first full sync waits for this too
        self.cluster_dns: dict[tuple[str, int], list] = {}  # the cluster DNS addresses served too -> closers
        self._pruned = False  # the fast path's listen map still holds what the last run left

    def start(self) -> None:
        """Prepare and open the node-local listeners; one that fails is logged and the others serve. The
        upstreams' loop checks start too (they serve the in-pod listeners as well)."""
        self._loops = self.loop.spawn(self.resolver.upstreams.watch_loops())
        if not self.listen_on:
            return
        try:
            added = listen.prepare(self.listen_on)
            if added:
                log.info("node-local DNS addresses added", interface=listen.INTERFACE, addresses=added)
        except Exception as e:  # the listener may still bind (IP_FREEBIND); the reason is kept for status
            self.errors["prepare"] = str(e)
            log.error("node-local DNS address setup failed", error=str(e))
        for host, port in self.listen_on:
            try:
                udp, tcp = listen.sockets(host, port)
                self.closers += self.loop.run(serve(udp, tcp, self.resolver.resolve, self.clients.classify))
                log.info("DNS listening", address=f"{host}:{port}")
            except OSError as e:
                self.errors[f"{host}:{port}"] = str(e)
                log.error("DNS listener failed", address=f"{host}:{port}", error=str(e))
        if self.fast_path_bpffs:
            self._start_fast_path()

    def serve_cluster_dns(self, addresses: tuple[str, ...]) -> None:
        """Answer the pods' nameserver addresses (the kubelet's clusterDNS) on this node too, port 53, as
        NodeLocal DNSCache answers the kube-dns ClusterIP: the address on noded-dns, NOTRACK, listeners and
        the fast path, so every pod's query is answered here in every services mode, captured or not, with no
        DNS pod behind the address. Addresses no longer named are closed and taken away."""
        if not self.listen_on:  # the node-local DNS side is off
            return
        wanted = {(a, 53) for a in addresses} - set(self.listen_on)
        if wanted == set(self.cluster_dns) and self._pruned:
            return
        self._pruned = True
        try:
            listen.prepare(self.listen_on + sorted(wanted))
        except Exception as e:
            self.errors["prepare"] = str(e)
            log.error("cluster DNS address setup failed", error=str(e))
        for host, port in set(self.cluster_dns) - wanted:
            for closer in self.cluster_dns.pop((host, port)):
                self.loop.loop.call_soon_threadsafe(closer.close)
        try:
            retired = listen.retire_all_but([h for h, _ in self.listen_on] + [h for h, _ in wanted])
            if retired:
                log.info("cluster DNS addresses no longer served", addresses=retired)
        except Exception as e:
            self.errors["retire"] = str(e)
        for host, port in sorted(wanted - set(self.cluster_dns)):
            try:
                udp, tcp = listen.sockets(host, port)
                self.cluster_dns[(host, port)] = self.loop.run(
                    serve(udp, tcp, self.resolver.resolve, self.clients.classify)
                )
                self.errors.pop(f"{host}:{port}", None)
                log.info("DNS listening at a cluster DNS address", address=f"{host}:{port}")
            except OSError as e:
                self.errors[f"{host}:{port}"] = str(e)
                log.error("DNS listener failed", address=f"{host}:{port}", error=str(e))
        if self.fast is not None:
            self.fast.set_listen(self.listen_on + sorted(self.cluster_dns))

    def _start_fast_path(self) -> None:
        from noded.bpf.dns_fast import DnsFastPath

        try:
            self.fast = DnsFastPath(self.fast_path_bpffs)
            self.fast.set_listen(self.listen_on, prune=False)  # the first sync prunes (serve_cluster_dns)
        except Exception as e:  # no BPF here: userspace answers everything
            self.errors["fastPath"] = str(e)
            log.error("DNS fast path not loaded; the resolver answers every query", error=str(e))
            return
        self.resolver.learned = self.fast.learned  # answers learned upstream: into the in-kernel cache too
        self.keep_records()
        self._links.start(self.loop.loop)

    def keep_records(self) -> None:
        """Start keeping noded_dns in step: the model wakes the records' runner as each change arrives."""
        self._changes = self.resolver.zone.model.dns_changes(wake=self._records.run)
        self._records.start(self.loop.loop)

    async def _attach(self, _full: bool) -> None:
        """The program on the pods' interfaces (the bridge appears with the node's first pod)."""
        from noded.kernel.addresses import local_addresses

        addresses = await asyncio.get_running_loop().run_in_executor(None, local_addresses)  # pyroute2's own loop
        attached = self.fast.attach(pod_interfaces(addresses, self.cluster_cidrs))
        if attached:
            log.info("DNS fast path attachments", changed=attached)

    async def _sync_records(self, full: bool) -> None:
        """noded_dns as the zone answers: the whole zone when full (pruning what the last run left), else the
        services that changed. Not before the sources have synced: an empty model would empty the map, and a
        restarted daemon's fast path would stop answering what the last one left it."""
        zone = self.resolver.zone
        if full:
            if not self.resolver.ready():
                raise NotYet("the sources have not synced")
            if not self._records_synced and not self.fast_path_after():
                raise NotYet("waiting for the services' first sync")
            self._changes.take()
            writes = self.fast.sync(zone.address_records(), zone.ttl)
            if not self._records_synced:
                self._records_synced = True
                release_memory()  # the whole zone's records, built once for the map
        else:
            keys = self._changes.take()
            writes = self.fast.update(zone.address_records(keys), zone.ttl) if keys else 0
        if writes:
            log.debug("DNS fast path records", writes=writes, full=full)

    def stop(self) -> None:
        for runner in (self._records, self._links):
            runner.stop()
        for closer in self.closers + [c for closers in self.cluster_dns.values() for c in closers]:
            self.loop.loop.call_soon_threadsafe(closer.close)

    def status(self) -> dict:
        fast = self.fast.stats() if self.fast else None
        served = [f"{h}:{p}" for h, p in sorted(self.cluster_dns)]
        errors = {**self.errors}
        for what, runner in (("fastPathSync", self._records), ("fastPathAttach", self._links)):
            if runner.last_error is not None:
                errors[what] = runner.last_error
        return {**self.resolver.status(), "fastPath": fast, "clusterDNS": served, "errors": errors}
