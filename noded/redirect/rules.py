"""The capture ruleset installed inside a pod's network namespace. Pure.

Istio ambient's in-pod contract, in nftables: outbound TCP is REDIRECTed to 15001, inbound TCP is
TPROXYed to 15006 (HBONE on 15008 kept as addressed), DNS over UDP and TCP to port 53 of the cluster DNS
addresses (the kubelet's clusterDNS) is REDIRECTed to 15053 where the node does not answer them itself;
DNS over UDP to the addresses the node answers (node-local, and cluster DNS it serves) is NOTRACK; port 53
of any other address goes where the pod sent it (its own DNS server, or a service's), payload untouched.
Sockets of the tunnel itself carry mark 0x539/0xfff and are never captured; connections the tunnel
accepted get conntrack mark 0x111, restored on the pod's replies so that they are routed back to the
tunnel through table 100 (a local route for everything). Non-enrolled pods get only the DNS rules. IPv4
and IPv6 alike: the listeners are on 127.0.0.1 and ::1.
"""

from __future__ import annotations

import ipaddress

OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
HBONE_PORT = 15008
DNS_PORT = 15053
TUNNEL_MARK = 0x539
CONN_MARK = 0x111
MARK_MASK = 0xFFF
ROUTE_TABLE = 100
TABLE = "inet noded-capture"

_NOT_TUNNEL = f"meta mark & {MARK_MASK:#x} != {TUNNEL_MARK:#x}"
_SET_CONN_MARK = f"meta mark set meta mark & {~MARK_MASK & 0xFFFFFFFF:#x} | {CONN_MARK:#x}"


def capture_script(enrolled: bool, direct_dns: tuple[str, ...] = (), cluster_dns: tuple[str, ...] = ()) -> str:
    """One atomic `nft -f` replacing whatever capture the pod had. DNS to `cluster_dns` goes to noded's
    in-pod listener; DNS to `direct_dns` (the node-local DNS addresses) is left alone even when it is a
    cluster DNS address too: it reaches noded on the node, through the eBPF fast path."""
    prerouting = [
        # packets the tunnel sends mark their connection, so the pod's replies go back to the tunnel
        f"meta mark & {MARK_MASK:#x} == {TUNNEL_MARK:#x} ct mark set ct mark & {~MARK_MASK & 0xFFFFFFFF:#x}"
        f" | {CONN_MARK:#x}",
    ]
    output_route = [
        f"ct mark & {MARK_MASK:#x} == {CONN_MARK:#x} meta mark set ct mark",
    ]
    output_nat = [f"meta mark & {MARK_MASK:#x} == {TUNNEL_MARK:#x} return"]
    # DNS over UDP to the addresses the node answers itself is never tracked in the pod (as NodeLocal DNSCache
    # does on the node): no conntrack entry per query, and no insertion race dropping one of the A and AAAA
    # queries a glibc client sends at once from one socket (the "5 s DNS delay")
    raw_out, raw_in = [], []
    for family in ("ip", "ip6"):
        direct = ", ".join(a for a in direct_dns if (":" in a) == (family == "ip6") and _is_address(a))
        if direct:
            raw_out.append(f"{family} daddr {{ {direct} }} udp dport 53 notrack")
            raw_in.append(f"{family} saddr {{ {direct} }} udp sport 53 notrack")
    for family in ("ip", "ip6"):
        addresses = ", ".join(
            a for a in cluster_dns if a not in direct_dns and (":" in a) == (family == "ip6") and _is_address(a)
        )
        if addresses:
            output_nat.append(
                f"{family} daddr {{ {addresses} }} meta l4proto {{ tcp, udp }} th dport 53 redirect to :{DNS_PORT}"
            )
    if enrolled:
        prerouting += [
            'iifname "lo" ip daddr != 127.0.0.1 meta l4proto tcp accept',
            'iifname "lo" ip6 daddr != ::1 meta l4proto tcp accept',
            *(
                f"meta nfproto {proto} tcp dport {HBONE_PORT} {_NOT_TUNNEL} tproxy {family} to :{HBONE_PORT}"
                f" {_SET_CONN_MARK} accept"
                for proto, family in (("ipv4", "ip"), ("ipv6", "ip6"))
            ),
            "meta l4proto tcp ct state established,related accept",
            f"ip daddr != 127.0.0.1 meta l4proto tcp {_NOT_TUNNEL} tproxy ip to 127.0.0.1:{INBOUND_PORT}"
            f" {_SET_CONN_MARK} accept",
            f"ip6 daddr != ::1 meta l4proto tcp {_NOT_TUNNEL} tproxy ip6 to [::1]:{INBOUND_PORT}"
            f" {_SET_CONN_MARK} accept",
        ]
        output_nat += [
            f"meta l4proto tcp meta mark & {MARK_MASK:#x} == {CONN_MARK:#x} accept",
            'oifname "lo" ip daddr != 127.0.0.1 accept',
            'oifname "lo" ip6 daddr != ::1 accept',
            f"ip daddr != 127.0.0.1 meta l4proto tcp redirect to :{OUTBOUND_PORT}",
            f"ip6 daddr != ::1 meta l4proto tcp redirect to :{OUTBOUND_PORT}",
        ]
    chains = {
        "raw-out": ("type filter hook output priority raw ; policy accept ;", raw_out),
        "raw-in": ("type filter hook prerouting priority raw ; policy accept ;", raw_in),
        "prerouting": ("type filter hook prerouting priority mangle ; policy accept ;", prerouting),
        "output-route": ("type route hook output priority mangle ; policy accept ;", output_route),
        "output-nat": ("type nat hook output priority -100 ; policy accept ;", output_nat),
    }
    # flush, not delete: the same chains always exist, and deleting a table with base chains costs
    # the kernel an RCU grace period (~10 ms per pod setup)
    lines = [f"add table {TABLE}", f"flush table {TABLE}"]
    for name, (spec, rules) in chains.items():
        lines.append(f"add chain {TABLE} {name} {{ {spec} }}")
        lines += [f"add rule {TABLE} {name} {rule}" for rule in rules]
    return "\n".join(lines) + "\n"


def _is_address(text: str) -> bool:
    """Only addresses reach rule text (never a name from a manifest)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def remove_script() -> str:
    return f"add table {TABLE}\ndelete table {TABLE}\n"
