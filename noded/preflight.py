"""`noded preflight`: what this host has of what each feature needs, one line per piece.

Read-only on the host: files under /sys and /proc, tool versions, and the probes that must touch the
kernel (a dummy link, a TPROXY rule, a kTLS socket) run in a throwaway network namespace (`unshare -n`),
never in the host's own. Each check names the features that need it and whether noded can run without it.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass

from noded.config import ConfigError, cgroup2_mount


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    needed_by: str
    required: bool  # noded cannot serve its default configuration without it


def kernel_version(release: str | None = None) -> tuple[int, int]:
    release = release or platform.release()
    parts = release.split("-")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return 0, 0


def _in_throwaway_netns(script: str) -> tuple[bool, str]:
    """Run `script` (sh) in a new network namespace that dies with it."""
    if not shutil.which("unshare"):
        return False, "unshare (util-linux) not found"
    try:
        proc = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return proc.returncode == 0, lines[-1] if lines else ""


def _ktls() -> tuple[bool, str]:
    import sys

    code = (
        "import socket\n"
        "l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen(1)\n"
        "c = socket.create_connection(l.getsockname()); a, _ = l.accept()\n"
        "c.setsockopt(socket.SOL_TCP, 31, b'tls')\n"  # TCP_ULP
    )
    return _in_throwaway_netns(f'ip link set lo up && {sys.executable} -c "{code}"')


def run_checks(release: str | None = None) -> list[Check]:
    checks: list[Check] = []
    major, minor = kernel_version(release)
    version = f"{major}.{minor}"
    checks.append(
        Check(
            "kernel ≥ 6.6 (tcx)",
            (major, minor) >= (6, 6),
            f"Linux {release or platform.release()}",
            "eBPF mode's tc programs (node ports, LB IPs), the DNS fast path",
            True,
        )
    )
    checks.append(
        Check(
            "kernel ≥ 6.5 (bpf_sock_destroy)",
            (major, minor) >= (6, 5),
            f"Linux {version}",
            "eBPF mode's socket termination (services.socketTermination): off without it",
            False,
        )
    )
    btf = os.path.exists("/sys/kernel/btf/vmlinux")
    checks.append(Check("BTF", btf, "/sys/kernel/btf/vmlinux", "eBPF mode (CO-RE programs)", True))
    try:
        cgroup = cgroup2_mount()
        checks.append(Check("cgroup v2", True, f"mounted at {cgroup}", "eBPF mode's socket-LB hooks", True))
    except ConfigError:
        checks.append(Check("cgroup v2", False, "no cgroup2 mount", "eBPF mode's socket-LB hooks", True))
    bpffs = False
    try:
        with open("/proc/self/mounts") as f:
            bpffs = any(line.split()[2] == "bpf" for line in f if len(line.split()) > 2)
    except OSError:
        pass
    checks.append(Check("bpffs", bpffs, "a bpf file system mounted (/sys/fs/bpf)", "pinned maps and links", True))
    nft = shutil.which("nft")
    checks.append(
        Check(
            "nft",
            bool(nft),
            nft or "not found",
            "nftables mode, in-pod capture, the DNS NOTRACK table",
            True,
        )
    )
    ipt = shutil.which("iptables-restore")
    checks.append(Check("iptables-restore", bool(ipt), ipt or "not found", "iptables mode", False))
    ok, detail = _in_throwaway_netns(
        "printf 'table inet preflight {\\n chain p {\\n type filter hook prerouting priority mangle;\\n"
        " meta nfproto ipv4 tcp dport 1 tproxy ip to 127.0.0.1:1 accept\\n }\\n}\\n' | nft -f -"
    )
    checks.append(Check("TPROXY (nft)", ok, detail or "tproxy rule accepted", "in-pod capture (inbound 15006)", True))
    ok, detail = _in_throwaway_netns("ip link add preflight type dummy")
    checks.append(
        Check(
            "dummy links",
            ok,
            detail or "dummy link created",
            "the node-local DNS address on noded-dns (else on lo, tagged)",
            False,
        )
    )
    ok, detail = _ktls()
    if "No such file" in detail:  # what setsockopt(TCP_ULP, "tls") answers without the tls module
        detail = "the kernel has no tls ULP (CONFIG_TLS, or the tls module)"
    checks.append(
        Check("kTLS (tls ULP)", ok, detail or "TCP_ULP tls accepted", "none yet (tunnel bulk speed, issue 6)", False)
    )
    return checks


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        status = "ok" if c.ok else ("MISSING" if c.required else "missing (optional)")
        lines.append(f"{c.name:<{width}}  {status:<18}  {c.detail}  — needed by: {c.needed_by}")
    return "\n".join(lines)
