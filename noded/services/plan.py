"""What kube-proxy's netfilter modes do with one frontend, decided once for the nftables and iptables
renderers: reject or not, whom to masquerade, the externalTrafficPolicy Local short-circuit, and which
endpoints to pick from. Pure."""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

from noded.model.tracker import Backend, Frontend, FrontendState


@dataclass(frozen=True)
class Pick:
    """Choose one of these backends (affinity first, then at random)."""

    backends: tuple[Backend, ...]
    fallback: bool  # serving-terminating endpoints, used because none is ready
    tag: str  # "" for the frontend's own choice, "cluster" for the short-circuit's


@dataclass(frozen=True)
class FrontendPlan:
    reject: bool  # no endpoint anywhere: refuse new connections
    pod_cidrs: tuple[str, ...]  # the cluster CIDRs of the frontend's family
    masquerade: str  # "off-cluster": sources outside pod_cidrs; "all"; "" (Local policy decides below)
    short_circuit: Pick | None  # externalTrafficPolicy Local: what pods and the node itself get
    masquerade_pods: bool  # short-circuited pods are masqueraded too (they addressed another node)
    pick: Pick | None  # None: drop (Local policy, no endpoint on this node)


@functools.lru_cache(maxsize=64)
def _cidrs_of_family(cluster_cidrs: tuple[str, ...], v6: bool) -> tuple[str, ...]:
    """The cluster CIDRs of one family, parsed once (not once per frontend of a 10,000-service sync)."""
    return tuple(c for c in cluster_cidrs if ipaddress.ip_network(c, strict=False).version == (6 if v6 else 4))


def plan(fe: Frontend, state: FrontendState, cluster_cidrs: list[str]) -> FrontendPlan:
    pods = _cidrs_of_family(tuple(cluster_cidrs), ":" in fe.ip)  # addresses the model normalised
    backends = state.ready or state.terminating
    pick = Pick(backends, not state.ready, "") if backends else None
    short = None
    if state.in_cluster and (state.in_cluster[0] or state.in_cluster[1]):
        ready, terminating = state.in_cluster
        short = Pick(ready or terminating, not ready, "cluster")
    if not state.external:
        masquerade = "off-cluster"
    elif state.local_external:
        masquerade = ""
    else:
        masquerade = "all"  # externalTrafficPolicy Cluster: replies must come back through this node
    return FrontendPlan(
        reject=pick is None and short is None,
        pod_cidrs=pods,
        masquerade=masquerade,
        short_circuit=short if state.local_external else None,
        masquerade_pods=state.kind == "NodePort",
        pick=pick,
    )
