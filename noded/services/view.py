"""What a backend reports as programmed, read back from the kernel (`noded services`)."""

from __future__ import annotations

from dataclasses import dataclass

from noded.model.tracker import Backend, Frontend


@dataclass
class ProgrammedView:
    frontend: Frontend
    svc_id: int
    affinity_timeout: int
    ready: list[Backend]
    terminating: list[Backend]


def programmed_views(mode: str, bpffs: str, prefix: tuple[str, ...] = ()) -> list[ProgrammedView] | None:
    """What the kernel holds for one instance, or None when nothing is programmed.

    eBPF: the maps pinned under bpffs. nftables and iptables: the rules in the netns the commands run in
    (prefix, e.g. nsenter, picks it).
    """
    if mode == "nftables":
        from noded.kernel.nft import nft_json
        from noded.services import nftables, nftrules

        nft_cmd = (*prefix, "nft")
        if not nftables.table_exists(nft_cmd):
            return None
        return nftrules.describe(nft_json("list", "table", *nftables.TABLE.split(), cmd=nft_cmd))
    if mode == "iptables":
        from noded.kernel.iptables import VERSIONS, Tools, detect_backend
        from noded.services import iptrules

        tools = Tools(detect_backend(prefix), prefix)
        nat = "".join(tools.save(v, "nat") for v in VERSIONS)
        if "NODED-SERVICES" not in nat:
            return None
        return iptrules.describe(nat, "".join(tools.save(v, "filter") for v in VERSIONS))
    import os

    from noded.bpf.sock_lb import LbMaps
    from noded.services.ebpf import describe

    if not os.path.exists(f"{bpffs}/noded_svc"):
        return None
    maps = LbMaps.open_pinned(bpffs)
    try:
        return describe(maps)
    finally:
        maps.close()
