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


def programmed_views(mode: str, bpffs: str, nft_cmd: tuple[str, ...] = ("nft",)) -> list[ProgrammedView] | None:
    """What the kernel holds for one instance, or None when nothing is programmed.

    eBPF: the maps pinned under bpffs. nftables: the table in the netns nft_cmd runs in.
    """
    if mode == "nftables":
        from noded.services import nftables

        if not nftables.table_exists(nft_cmd):
            return None
        return nftables.describe(nftables.nft_json("list", "table", *nftables.TABLE.split(), cmd=nft_cmd))
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
