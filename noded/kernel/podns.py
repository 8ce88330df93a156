"""Privileged calls into a pod's network namespace: the capture ruleset, the reply routing, setns.

Everything the capture path does to a pod's kernel state goes through here.
"""

from __future__ import annotations

import ctypes
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from noded.kernel import nft as libnft
from noded.redirect.rules import CONN_MARK, MARK_MASK, ROUTE_TABLE, TABLE, capture_script, remove_script

CLONE_NEWNET = 0x40000000
RULE_PRIORITY = 32000
_libc = ctypes.CDLL(None, use_errno=True)


class CaptureError(RuntimeError):
    pass


def nft(netns_path: str, script: str) -> str:
    """One nft transaction inside the pod's netns (noded/kernel/nft.py: libnftables on this thread, no fork per pod)."""
    try:
        with entered(netns_path):
            return libnft.run(script)
    except libnft.NftError as e:
        raise CaptureError(f"nft in {netns_path}: {e}") from None


def has_capture(netns_path: str) -> bool:
    try:
        nft(netns_path, f"list table {TABLE}")
    except CaptureError:
        return False
    return True


def install(
    netns_path: str, enrolled: bool, direct_dns: tuple[str, ...] = (), cluster_dns: tuple[str, ...] = ()
) -> None:
    """Capture rules (atomically replacing any earlier ones) and, when enrolled, the reply routing."""
    nft(netns_path, capture_script(enrolled, direct_dns, cluster_dns))
    _routing(netns_path, enrolled)


def uninstall(netns_path: str) -> None:
    nft(netns_path, remove_script())
    _routing(netns_path, False)


def _routing(netns_path: str, on: bool) -> None:
    # inside the netns on this thread: pyroute2's own netns= forks a helper, unsafe in a threaded daemon
    with entered(netns_path), IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        # the in-pod listeners bind 127.0.0.1 and ::1: CRI runtimes bring lo up, `ctr run --cni` may not
        ipr.link("set", index=lo, state="up")
        for family, default in ((socket.AF_INET, "0.0.0.0/0"), (socket.AF_INET6, "::/0")):
            rule = {"family": family, "fwmark": CONN_MARK, "fwmask": MARK_MASK, "table": ROUTE_TABLE}
            rule["priority"] = RULE_PRIORITY
            route = {"family": family, "dst": default, "type": "local", "oif": lo, "table": ROUTE_TABLE, "scope": 254}
            for what, spec in (("rule", rule), ("route", route)):
                try:
                    getattr(ipr, what)("add" if on else "del", **spec)
                except NetlinkError as e:
                    if on and e.code == 17:  # EEXIST: already there
                        continue
                    if not on and e.code in (2, 3):  # ENOENT / ESRCH: already gone
                        continue
                    if family == socket.AF_INET6 and e.code in (97, 13, 95):  # IPv6 off in this pod
                        break
                    raise


@contextmanager
def entered(netns_path: str) -> Iterator[None]:
    """This thread in the pod's netns meanwhile (sockets made inside stay there)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(netns_path, os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise CaptureError(f"setns {netns_path}: {os.strerror(ctypes.get_errno())}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                raise CaptureError(f"setns back: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(target)
        os.close(own)
