"""The node's own addresses, where NodePorts listen (nodePortAddresses applied)."""

from __future__ import annotations

import ipaddress

from pyroute2 import IPRoute


def local_addresses() -> dict[str, tuple[str, int]]:
    """Every address on this network namespace's interfaces, with the interface (name, index) holding it."""
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        return {
            (a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS")): (names.get(a["index"], "?"), a["index"])
            for a in ipr.get_addr()
        }


def nodeport_addresses(
    addresses: list[str] | dict[str, object], node_port_cidrs: list[str], cluster_cidrs: list[str]
) -> list[str]:
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
