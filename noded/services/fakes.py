"""Recording stand-ins for what the netfilter proxiers run (nft, iptables-restore/-save, conntrack), so their
partial, full and failure paths are unit-tested without root or a kernel, as kube-proxy tests its proxiers
against a fake iptables. The eBPF proxier's maps have theirs in noded/bpf/fakes.py.

Each takes scripts as the real tool would, keeps them in `scripts`, and tracks just enough of the table to
answer the listings a full sync reads back (chain and set names for nft; the saved table for iptables).
`fail_next = n` makes the next n transactions raise as a refusing kernel would, taking nothing in.
"""

from __future__ import annotations

import re

from noded.kernel.conntrack import Serving
from noded.kernel.iptables import IptablesError
from noded.kernel.nft import NftError

_NFT_OBJECT = re.compile(r"^(add|delete) (chain|set|map) inet noded (\S+)")


class RecordingNft:
    """`nft -f` and `nft -j list chains|sets inet` for table inet noded."""

    def __init__(self) -> None:
        self.scripts: list[str] = []
        self.chains: set[str] = set()
        self.sets: set[str] = set()
        self.fail_next = 0

    def run(self, script: str) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise NftError("Error: Could not process rule: No buffer space available (fake)")
        self.scripts.append(script)
        for line in script.splitlines():
            m = _NFT_OBJECT.match(line)
            if m is None:
                continue
            verb, what, name = m.groups()
            names = self.chains if what == "chain" else self.sets if what == "set" else None
            if names is not None:
                (names.add if verb == "add" else names.discard)(name)

    def json(self, *args: str) -> dict:
        what = args[-2]  # [-t] list chains|sets inet
        kind, names = ("chain", self.chains) if what == "chains" else ("set", self.sets)
        return {"nftables": [{kind: {"family": "inet", "table": "noded", "name": n}} for n in sorted(names)]}


class RecordingIptables:
    """`iptables-restore --noflush` and `iptables-save` of one backend: restores are recorded by family;
    saves answer `saved[(version, table)]` (empty tables unless a test sets them)."""

    def __init__(self, backend: str = "legacy") -> None:
        self.backend = backend
        self.scripts: list[tuple[int, str]] = []
        self.saved: dict[tuple[int, str], str] = {}
        self.fail_next = 0

    def save(self, version: int, table: str) -> str:
        return self.saved.get((version, table), f"*{table}\nCOMMIT\n")

    def restore(self, version: int, script: str) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise IptablesError(f"ip{'6' if version == 6 else ''}tables-restore: line 2 failed (fake)")
        self.scripts.append((version, script))


class RecordingConntrack:
    """The stale-UDP-flow cleaner: remembers what it was asked to clear."""

    def __init__(self) -> None:
        self.cleared: list[Serving] = []

    def clear(self, serving: Serving) -> int:
        if serving:
            self.cleared.append(dict(serving))
        return 0
