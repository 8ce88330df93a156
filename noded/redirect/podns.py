"""Privileged calls into a pod's network namespace: the capture ruleset, the reply routing, setns.

Everything the capture path does to a pod's kernel state goes through here.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from noded import libnft
from noded.redirect.rules import CONN_MARK, MARK_MASK, ROUTE_TABLE, TABLE, capture_script, remove_script

CLONE_NEWNET = 0x40000000
RULE_PRIORITY = 32000
_libc = ctypes.CDLL(None, use_errno=True)


class CaptureError(RuntimeError):
    pass


def nft(netns_path: str, script: str) -> str:
    """One nft transaction inside the pod's netns (libnftables on this thread: no fork per pod)."""
    try:
        with entered(netns_path):
            return libnft.run(script)
    except libnft.LibnftError as e:
        raise CaptureError(f"nft in {netns_path}: {e}") from None


def has_capture(netns_path: str) -> bool:
    try:
        nft(netns_path, f"list table {TABLE}")
    except CaptureError:
        return False
    return True


def install(netns_path: str, enrolled: bool, direct_dns: tuple[str, ...] = ()) -> None:
    """Capture rules (atomically replacing any earlier ones) and, when enrolled, the reply routing."""
    nft(netns_path, capture_script(enrolled, direct_dns))
    _routing(netns_path, enrolled)


def uninstall(netns_path: str) -> None:
    nft(netns_path, remove_script())
    _routing(netns_path, False)


def _routing(netns_path: str, on: bool) -> None:
    # inside the netns on this thread: pyroute2's own netns= forks a helper, unsafe in a threaded daemon
    with entered(netns_path), IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        rule = {"fwmark": CONN_MARK, "fwmask": MARK_MASK, "table": ROUTE_TABLE, "priority": RULE_PRIORITY}
        route = {"dst": "0.0.0.0/0", "type": "local", "oif": lo, "table": ROUTE_TABLE, "scope": 254}
        # the in-pod listeners bind 127.0.0.1: CRI runtimes bring lo up, `ctr run --cni` and others may not
        ipr.link("set", index=lo, state="up")
        if on:
            for what, spec in (("rule", rule), ("route", route)):
                try:
                    getattr(ipr, what)("add", **spec)
                except NetlinkError as e:
                    if e.code != 17:  # EEXIST: already there
                        raise
        else:
            for what, spec in (("rule", rule), ("route", route)):
                try:
                    getattr(ipr, what)("del", **spec)
                except NetlinkError as e:
                    if e.code not in (2, 3):  # ENOENT / ESRCH: already gone
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
