"""noded's resolver as its own process for bench/resolver.py: N generated ClusterIP services, served on an address
(UDP and TCP), forwarding the rest to one upstream; optionally the eBPF fast path on a bridge (cluster names and
the in-kernel cache of external answers).

Run inside the bench's node netns. Prints the RSS with the model alone (`model-rss-kib=`), then "ready" once
serving (and, with --fast-path, once the map holds every record), then serves until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time
from collections.abc import Iterator

from noded.dns.resolver import Client, Resolver
from noded.dns.server import serve
from noded.dns.upstream import Upstreams
from noded.kernel import dnslisten as listen
from noded.memory import release_memory
from noded.model.tracker import ServiceModel


def service_objects(n: int) -> Iterator[dict]:
    """The N services one at a time, as a watch or a paginated list delivers them (never all parsed at once)."""
    for i in range(n):
        ip = f"10.96.{i // 250}.{i % 250 + 1}"
        yield {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": f"svc-{i}", "namespace": "default"},
            "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": "http", "port": 80}]},
        }


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


async def main(args: argparse.Namespace) -> None:
    model = ServiceModel()
    for obj in service_objects(args.services):
        model.upsert(obj)
    release_memory()  # as the daemon does after its first sync
    print(f"model-rss-kib={rss_kib()}", flush=True)  # the model alone: what the proxiers share with DNS
    host, port = args.upstream.rsplit(":", 1)
    resolver = Resolver(model, Upstreams([(host, int(port))]), "cluster.local")
    resolver.zone.address_records()  # the index built before the first query
    release_memory()  # as the daemon does after the fast path's first full sync
    if args.no_metrics:  # bench/metrics_cost.py: the same server without its per-query metrics
        resolver.stats.record = lambda *_args: None
    udp, tcp = listen.sockets(args.listen, 53)
    await serve(udp, tcp, resolver.resolve, lambda _peer: Client(namespace="default"))
    if args.fast_path:
        from noded.bpf.dns_fast import DnsFastPath

        fast = DnsFastPath(args.fast_path)
        fast.set_listen([(args.listen, 53)])
        started = time.perf_counter()
        fast.sync(resolver.zone.address_records(), 5)
        took = time.perf_counter() - started
        fast.attach({args.bridge: socket.if_nametoindex(args.bridge)})
        resolver.learned = fast.learned  # answers learned upstream: into the in-kernel cache, as the daemon does
        print(f"fast-path records={fast.stats()['records']} sync={took:.3f}s", flush=True)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--listen", default="169.254.20.10")
    parser.add_argument("--upstream", default="127.0.0.2:5300")
    parser.add_argument("--fast-path", default="", help="bpffs directory: load and attach the fast path")
    parser.add_argument("--bridge", default="br-dns")
    parser.add_argument("--no-metrics", action="store_true", help="skip the per-query metrics (their cost)")
    asyncio.run(main(parser.parse_args()))
