"""The lab's kernel calls: network namespaces, veths, bridges, addresses, routes (pyroute2), and cgroups."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

from pyroute2 import NetNS, netns

CGROUP_ROOT = "/sys/fs/cgroup/unified"


def exists(name: str) -> bool:
    return name in netns.listnetns()


def create(name: str) -> None:
    """A namespace with lo up and IPv6 duplicate address detection off: lab addresses are unique by
    construction, and with DAD every address would be unusable (and the bridge plugin would wait) ~1 s."""
    netns.create(name)
    with NetNS(name) as ns:
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
    sysctl(name, {"net.ipv6.conf.default.accept_dad": "0", "net.ipv6.conf.all.accept_dad": "0"})


def remove(name: str) -> None:
    if exists(name):
        netns.remove(name)


def list_ours(prefix: str = "noded-") -> list[str]:
    return [n for n in netns.listnetns() if n.startswith(prefix)]


def add_bridge(ns_name: str, ifname: str) -> None:
    with NetNS(ns_name) as ns:
        ns.link("add", ifname=ifname, kind="bridge")
        ns.link("set", index=ns.link_lookup(ifname=ifname)[0], state="up")


def connect_to_bridge(bridge_ns: str, bridge: str, host_side: str, peer_ns: str, peer_ifname: str) -> None:
    """A veth from a port of `bridge` (in bridge_ns) to peer_ifname inside peer_ns."""
    with NetNS(bridge_ns) as ns:
        ns.link("add", ifname=host_side, kind="veth", peer={"ifname": peer_ifname, "net_ns_fd": peer_ns})
        idx = ns.link_lookup(ifname=host_side)[0]
        ns.link("set", index=idx, master=ns.link_lookup(ifname=bridge)[0])
        ns.link("set", index=idx, state="up")


def set_address(ns_name: str, ifname: str, address: str, prefixlen: int) -> None:
    with NetNS(ns_name) as ns:
        idx = ns.link_lookup(ifname=ifname)[0]
        ns.addr("add", index=idx, address=address, prefixlen=prefixlen)
        ns.link("set", index=idx, state="up")


def add_route(ns_name: str, dst: str, gateway: str) -> None:
    with NetNS(ns_name) as ns:
        ns.route("replace", dst=dst, gateway=gateway)


def sysctl(ns_name: str, settings: dict[str, str]) -> None:
    """Set several sysctls inside ns_name with one nsenter."""
    nsenter(ns_name, ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())], check=True)


def nsenter_argv(ns_name: str, argv: list[str]) -> list[str]:
    # Only the network namespace: `ip netns exec` would also remount /sys and hide bpffs and cgroup2.
    return ["nsenter", f"--net=/run/netns/{ns_name}", "--", *argv]


def nsenter(ns_name: str, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(nsenter_argv(ns_name, argv), **kwargs)


# -- cgroups ------------------------------------------------------------------------
def cgroup_create(path: str) -> None:
    os.makedirs(path, exist_ok=True)


def cgroup_join(path: str, pid: int | None = None) -> None:
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write(str(pid or os.getpid()))


def cgroup_remove_tree(path: str) -> None:
    """Kill what still runs below path, then remove the cgroups bottom-up."""
    if not os.path.isdir(path):
        return
    for dirpath, _dirs, _files in os.walk(path, topdown=False):
        for _ in range(50):
            pids = _procs(dirpath)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        try:
            os.rmdir(dirpath)
        except OSError:
            time.sleep(0.2)
            os.rmdir(dirpath)


def _procs(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def add_default_route_link(ns_name: str, ifname: str, address4: str, address6: str) -> None:
    """A link carrying the default routes (a namespace of its own needs one to reach any VIP).

    A veth pair with both ends inside the namespace: this kernel has no dummy links.
    """
    import socket as _socket

    with NetNS(ns_name) as ns:
        ns.link("add", ifname=ifname, kind="veth", peer=f"{ifname}p")
        idx = ns.link_lookup(ifname=ifname)[0]
        ns.link("set", index=ns.link_lookup(ifname=f"{ifname}p")[0], state="up")
        ns.link("set", index=idx, state="up")
        ns.addr("add", index=idx, address=address4.split("/")[0], prefixlen=int(address4.split("/")[1]))
        ns.addr("add", index=idx, address=address6.split("/")[0], prefixlen=int(address6.split("/")[1]))
        ns.route("add", dst="0.0.0.0/0", oif=idx)
        ns.route("add", dst="::/0", oif=idx, family=_socket.AF_INET6)
