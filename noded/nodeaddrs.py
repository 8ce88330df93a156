"""The node's own addresses, where NodePorts listen (nodePortAddresses applied)."""

from __future__ import annotations

import ipaddress

from pyroute2 import IPRoute


def local_addresses() -> list[str]:
    """Every address on this network namespace's interfaces (netlink)."""
    with IPRoute() as ipr:
        return [a.get_attr("IFA_ADDRESS") or a.get_attr("IFA_LOCAL") for a in ipr.get_addr()]


def nodeport_addresses(addresses: list[str], node_port_cidrs: list[str], cluster_cidrs: list[str]) -> list[str]:
    """With nodePortAddresses set, the addresses inside those CIDRs (loopback included if asked for);
    otherwise every address but loopback, link-local and the pod gateways inside the cluster CIDRs."""
    out = []
    for text in addresses:
        ip = ipaddress.ip_address(text.split("%")[0])
        if node_port_cidrs:
            if any(ip in ipaddress.ip_network(c, strict=False) for c in node_port_cidrs):
                out.append(str(ip))
        elif not (ip.is_loopback or ip.is_link_local) and not any(
            ip in ipaddress.ip_network(c, strict=False) for c in cluster_cidrs
        ):
            out.append(str(ip))
    return sorted(set(out))
