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

from noded.redirect.rules import CONN_MARK, MARK_MASK, ROUTE_TABLE, TABLE, capture_script, remove_script
from noded.services import nftables

CLONE_NEWNET = 0x40000000
RULE_PRIORITY = 32000
_libc = ctypes.CDLL(None, use_errno=True)


class CaptureError(RuntimeError):
    pass


def _nft_in(netns_path: str) -> tuple[str, ...]:
    return ("nsenter", f"--net={netns_path}", "nft")


def nft(netns_path: str, script: str) -> None:
    try:
        nftables.nft(script, _nft_in(netns_path))
    except nftables.NftError as e:
        raise CaptureError(f"nft in {netns_path}: {e}") from None


def has_capture(netns_path: str) -> bool:
    return nftables.table_exists(_nft_in(netns_path), TABLE)


def install(netns_path: str, enrolled: bool) -> None:
    """Capture rules (atomically replacing any earlier ones) and, when enrolled, the reply routing."""
    nft(netns_path, capture_script(enrolled))
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
        if on:
            ipr.link("set", index=lo, state="up")
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
