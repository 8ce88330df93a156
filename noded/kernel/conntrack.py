"""Stale UDP conntrack flows in the netfilter modes, cleared after a sync as kube-proxy does.

UDP has no end of connection: a flow DNATed to an endpoint that has gone keeps being sent there for as
long as the client keeps talking, and a flow that met a service while it had no endpoints stays
untranslated after endpoints appear. After each sync, the UDP flows to the frontends it touched are
checked: DNATed to a backend that no longer serves the frontend, or not DNATed although the frontend
now has backends, and the flow is deleted, so the client's next datagram is translated afresh.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import structlog
from pyroute2 import Conntrack
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

from noded.metrics import SYNC_BUCKETS, LatencyHistogram

log = structlog.get_logger("noded.kernel.conntrack")

Addr = tuple[str, int]
Serving = dict[Addr, frozenset[Addr]]  # UDP frontend -> the backends that serve it now (empty: gone)


@dataclass(frozen=True)
class Flow:
    orig_dst: Addr  # where the client sent it
    reply_src: Addr  # where the replies come from: the backend if it was DNATed
    entry: Any = None  # the kernel's entry, to delete it by


def stale(flows: Iterable[Flow], serving: Serving) -> list[Flow]:
    """The flows to delete. Pure."""
    out = []
    for flow in flows:
        backends = serving.get(flow.orig_dst)
        if backends is None:
            continue  # not a frontend this sync touched
        dnatted = flow.reply_src != flow.orig_dst
        if (dnatted and flow.reply_src not in backends) or (not dnatted and backends):
            out.append(flow)
    return out


class ConntrackCleaner:
    """Deletes stale flows through conntrack netlink (pyroute2), in the given netns or the current one."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        # kube-proxy's conntrack reconciler metrics: entries deleted by IP family, and each pass's duration
        self.deleted: dict[str, int] = {"IPv4": 0, "IPv6": 0}
        self.durations = LatencyHistogram(SYNC_BUCKETS)

    def clear(self, serving: Serving) -> int:
        """Deletes the stale flows among these frontends'; a failure is logged, the sync it follows stands."""
        if not serving:
            return 0
        started = time.perf_counter()
        try:
            return self._clear(serving)
        except Exception as e:  # e.g. no nf_conntrack_netlink: the rules are in, only old flows linger
            log.warning("could not clear stale UDP flows", error=repr(e))
            return 0
        finally:
            self.durations.observe((), time.perf_counter() - started)

    def _clear(self, serving: Serving) -> int:
        count = 0
        for family in (socket.AF_INET, socket.AF_INET6):
            wanted = {a: b for a, b in serving.items() if (":" in a[0]) == (family == socket.AF_INET6)}
            if not wanted:
                continue
            ct = Conntrack(nfgen_family=family, netns=self.netns)
            try:
                flows = [
                    Flow((e.tuple_orig.daddr, e.tuple_orig.dport), (e.tuple_reply.saddr, e.tuple_reply.sport), e)
                    for e in ct.dump_entries(tuple_orig=NFCTAttrTuple(family=family, proto=socket.IPPROTO_UDP))
                ]
                for flow in stale(flows, wanted):
                    try:
                        ct.delete(flow.entry)
                        count += 1
                        self.deleted["IPv6" if family == socket.AF_INET6 else "IPv4"] += 1
                    except OSError:  # gone meanwhile
                        pass
            finally:
                ct.close()
        if count:
            log.info("stale UDP flows deleted", count=count)
        return count
