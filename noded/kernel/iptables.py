"""iptables through its commands: one backend's `iptables-save` / `iptables-restore` (and ip6tables'), run with
a prefix (tests enter a netns of their own), and kube-proxy's rule for which backend (nft or legacy) a
node uses. noded/services/fakes.py has a recording stand-in for unit tests without root."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

VERSIONS = (4, 6)


class IptablesError(RuntimeError):
    pass


@dataclass(frozen=True)
class Tools:
    """The iptables commands of one backend, run with a prefix: where the proxier reaches the kernel."""

    backend: str  # nft | legacy
    prefix: tuple[str, ...] = ()

    def argv(self, version: int, what: str) -> list[str]:
        return [*self.prefix, f"ip{'6' if version == 6 else ''}tables-{self.backend}-{what}"]

    def save(self, version: int, table: str) -> str:
        proc = subprocess.run([*self.argv(version, "save"), "-t", table], capture_output=True, text=True)
        return proc.stdout if proc.returncode == 0 else ""

    def restore(self, version: int, script: str) -> None:
        proc = subprocess.run(
            [*self.argv(version, "restore"), "--noflush", "-w", "5"], input=script, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise IptablesError(f"ip{'6' if version == 6 else ''}tables-restore: {proc.stderr.strip()[:4000]}")


def _rule_count(tools: Tools) -> int:
    return sum(
        line.startswith("-A ")
        for v in VERSIONS
        for t in ("nat", "filter", "mangle")
        for line in tools.save(v, t).split("\n")
    )


def detect_backend(prefix: tuple[str, ...] = ()) -> str:
    """kube-proxy's rule: the backend that already has more rules wins; a tie goes to the system's iptables."""
    legacy, nft = _rule_count(Tools("legacy", prefix)), _rule_count(Tools("nft", prefix))
    if legacy != nft:
        return "legacy" if legacy > nft else "nft"
    version = subprocess.run([*prefix, "iptables", "--version"], capture_output=True, text=True).stdout
    return "legacy" if "legacy" in version else "nft"
