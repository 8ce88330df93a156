"""The DNS side of the daemon: one resolver, the node-local listeners, the in-pod listeners' handler.

Built from `dns` in the config: upstreams from it or the host's resolv.conf (and the node's search
domains for the search-path shortcut), the cache caps, the zone TTL. Serves on the shared loop thread.
"""

from __future__ import annotations

import structlog

from noded.config import NodedConfiguration, split_hostport
from noded.dns import listen
from noded.dns.cache import AnswerCache
from noded.dns.resolver import Resolver, read_resolv_conf
from noded.dns.server import Clients, serve
from noded.dns.upstream import Upstreams
from noded.loopthread import LoopThread
from noded.model.tracker import ServiceModel

log = structlog.get_logger("noded.dns")


def make_resolver(config: NodedConfiguration, model: ServiceModel, ready=lambda: True) -> Resolver:
    cfg = config.dns
    host_servers, search = read_resolv_conf(cfg.resolvConf)
    upstreams = [split_hostport(u, 53) for u in cfg.upstreams] or [(h, 53) for h in host_servers]
    own = {split_hostport(a) for a in cfg.listen}
    pool = Upstreams(upstreams, own, max_concurrent=cfg.maxConcurrent)
    cache = AnswerCache(cfg.cacheCapacity, cfg.cacheMaxTTL, cfg.servfailTTL)
    return Resolver(model, pool, config.clusterDomain, cfg.ttl, cache, search, ready)


class DnsService:
    def __init__(self, resolver: Resolver, loop: LoopThread, listen_on: list[str], clients: Clients) -> None:
        self.resolver = resolver
        self.loop = loop
        self.listen_on = [split_hostport(a) for a in listen_on]
        self.clients = clients
        self.closers: list = []
        self.errors: dict[str, str] = {}

    def start(self) -> None:
        """Prepare and open the node-local listeners; one that fails is logged and the others serve."""
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

    def stop(self) -> None:
        for closer in self.closers:
            self.loop.loop.call_soon_threadsafe(closer.close)

    def status(self) -> dict:
        return {**self.resolver.status(), "listenErrors": self.errors}
