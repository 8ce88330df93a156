"""`noded cleanup`: removes every kernel object one noded instance made.

Its pinned links (which detaches the programs) and its pinned maps.
"""

from __future__ import annotations

from noded.bpf.sock_lb import remove as remove_bpf
from noded.config import NodedConfiguration


def cleanup(config: NodedConfiguration) -> list[str]:
    return remove_bpf(config.bpffsPath)
