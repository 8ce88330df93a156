"""The node-local DNS address (`dns.listen`, default 169.254.20.10:53): the kernel objects behind it.

As NodeLocal DNSCache does: listen addresses the node does not have go on a dummy interface
`noded-dns` (on a kernel without the dummy driver: on `lo`, tagged with noded's address protocol number
so cleanup finds exactly them), and a `noded-dns` nftables table marks DNS to and from them NOTRACK at
raw priority, so the conntrack race on parallel UDP queries (A and AAAA from one socket) cannot drop one.
`remove` takes all of it away for `noded cleanup`. Runs in the current network namespace; the
privileged calls are here.
"""

from __future__ import annotations

import ipaddress
import socket

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from noded.kernel import nft

INTERFACE = "noded-dns"
TABLE = "noded-dns"
ADDRESS_PROTO = 0xD5  # IFA_PROTO of the addresses noded adds
IP_FREEBIND = 15
IFA_F_NODAD = 0x02
EOPNOTSUPP = 95


def _notrack_script(addresses: list[tuple[str, int]]) -> str:
    rules_in, rules_out = [], []
    for host, port in addresses:
        ip = ipaddress.ip_address(host)
        if ip.is_unspecified:
            continue
        fam = "ip" if ip.version == 4 else "ip6"
        for proto in ("udp", "tcp"):
            rules_in.append(f"{fam} daddr {ip} {proto} dport {port} notrack")
            rules_out.append(f"{fam} daddr {ip} {proto} dport {port} notrack")
            rules_out.append(f"{fam} saddr {ip} {proto} sport {port} notrack")
    body_in = "\n".join(f"    {r}" for r in rules_in)
    body_out = "\n".join(f"    {r}" for r in rules_out)
    return (
        f"table inet {TABLE} {{}}\nflush table inet {TABLE}\n"
        f"table inet {TABLE} {{\n"
        f"  chain prerouting {{\n    type filter hook prerouting priority raw; policy accept;\n{body_in}\n  }}\n"
        f"  chain output {{\n    type filter hook output priority raw; policy accept;\n{body_out}\n  }}\n"
        "}\n"
    )


def prepare(addresses: list[tuple[str, int]]) -> list[str]:
    """Put the listen addresses the node lacks on `noded-dns`, and NOTRACK them; the addresses added."""
    wanted = [ipaddress.ip_address(h) for h, _ in addresses if not ipaddress.ip_address(h).is_unspecified]
    added = []
    with IPRoute() as ipr:
        have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr()}
        missing = [ip for ip in wanted if str(ip) not in have]
        if missing:
            index = _holder(ipr)
            for ip in missing:
                ipr.addr(
                    "add",
                    index=index,
                    address=str(ip),
                    prefixlen=ip.max_prefixlen,
                    IFA_PROTO=ADDRESS_PROTO,
                    flags=IFA_F_NODAD if ip.version == 6 else 0,
                )
                added.append(str(ip))
    if any(not ipaddress.ip_address(h).is_unspecified for h, _ in addresses):
        nft.run(_notrack_script(addresses))
    return added


def _holder(ipr: IPRoute) -> int:
    """The interface the addresses go on: noded-dns (made if missing), else lo."""
    if not ipr.link_lookup(ifname=INTERFACE):
        try:
            ipr.link("add", ifname=INTERFACE, kind="dummy")
        except NetlinkError as e:
            if e.code != EOPNOTSUPP:
                raise
            return ipr.link_lookup(ifname="lo")[0]
    index = ipr.link_lookup(ifname=INTERFACE)[0]
    ipr.link("set", index=index, state="up")
    return index


def sockets(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """A bound UDP socket and a listening TCP socket on host:port (non-blocking)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    out = []
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        s = socket.socket(family, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        s.bind((host, port))
        if kind == socket.SOCK_STREAM:
            s.listen(1024)
        s.setblocking(False)
        out.append(s)
    return out[0], out[1]


def retire_all_but(keep: list[str]) -> list[str]:
    """Take away the addresses noded added that are not in `keep` (a cluster DNS address no longer served,
    now or by the last run); the addresses removed."""
    keep_ips = {ipaddress.ip_address(h) for h in keep}
    removed = []
    with IPRoute() as ipr:
        for addr in ipr.get_addr():
            ip = addr.get_attr("IFA_ADDRESS")
            if addr.get_attr("IFA_PROTO") == ADDRESS_PROTO and ipaddress.ip_address(ip) not in keep_ips:
                ipr.addr("del", index=addr["index"], address=ip, prefixlen=addr["prefixlen"])
                removed.append(ip)
    return removed


def remove() -> list[str]:
    removed = []
    with IPRoute() as ipr:
        for index in ipr.link_lookup(ifname=INTERFACE):
            ipr.link("del", index=index)
            removed.append(f"interface {INTERFACE}")
        for addr in ipr.get_addr():
            if addr.get_attr("IFA_PROTO") == ADDRESS_PROTO:
                ip = addr.get_attr("IFA_ADDRESS")
                ipr.addr("del", index=addr["index"], address=ip, prefixlen=addr["prefixlen"])
                removed.append(f"address {ip}")
    try:
        nft.run(f"delete table inet {TABLE}")
        removed.append(f"nft table inet {TABLE}")
    except nft.NftError:
        pass
    return removed
