"""`noded cleanup`: removes every kernel object one noded instance made, in every mode.

eBPF: its pinned links (which detaches the programs) and pinned maps. nftables:
its `table inet noded` in this network namespace. iptables: its NODED-* chains and
the jumps to them, in both backends and both families. DNS: the `noded-dns` interface and table
(only on a full cleanup: a restart keeps the node-local address answering). Capture: on a full cleanup,
the rules and routes noded put in each live pod's netns (the pod records stay, so a later start captures
those pods again). Starting in one mode calls this with keep=that mode, so switching modes leaves nothing
of the previous one.
"""

from __future__ import annotations

import json
import os

from noded.bpf.sock_lb import remove as remove_bpf
from noded.config import NodedConfiguration
from noded.kernel import dnslisten as dns_listen
from noded.services import iptables, nftables

DNS_PINS = ("noded_dns", "dns-")


def cleanup(config: NodedConfiguration, keep: str | None = None) -> list[str]:
    removed: list[str] = []
    if keep != "ebpf":  # the DNS fast path's pins belong to no services mode: only a full cleanup removes them
        removed += remove_bpf(config.bpffsPath, spare=() if keep is None else DNS_PINS)
    if keep != "nftables" and nftables.delete_table():
        removed.append(f"nft table {nftables.TABLE}")
    if keep != "iptables":
        removed += iptables.remove_all()
    if keep is None:
        removed += dns_listen.remove()
        removed += remove_pod_capture(os.path.dirname(config.api.socket))
    return removed


def remove_pod_capture(state_dir: str) -> list[str]:
    """The capture table and reply routing in the netns of every pod noded has a record of."""
    from noded.kernel import podns
    from noded.redirect.rules import TABLE

    removed = []
    pods = os.path.join(state_dir, "pods")
    for name in sorted(os.listdir(pods)) if os.path.isdir(pods) else []:
        try:
            with open(os.path.join(pods, name)) as f:
                netns = json.load(f)["netns"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if os.path.exists(netns) and podns.has_capture(netns):
            podns.uninstall(netns)
            removed.append(f"nft table {TABLE} and routes in {netns}")
    return removed
