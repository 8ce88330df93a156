"""`noded cleanup`: removes every kernel object one noded instance made, in every mode.

eBPF: its pinned links (which detaches the programs) and pinned maps. nftables:
its `table inet noded` in this network namespace. iptables: its NODED-* chains and
the jumps to them, in both backends and both families. DNS: the `noded-dns` interface and table
(only on a full cleanup: a restart keeps the node-local address answering). Starting in one mode calls
this with keep=that mode, so switching modes leaves nothing of the previous one.
"""

from __future__ import annotations

from noded.bpf.sock_lb import remove as remove_bpf
from noded.config import NodedConfiguration
from noded.dns import listen as dns_listen
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
    return removed
