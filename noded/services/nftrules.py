"""The nftables ruleset noded wants, as nft commands, after kube-proxy's nftables mode. Pure: no kernel.

One `table inet noded`; service VIPs are looked up in verdict maps (O(1) in the
number of services). A frontend's element goes straight to a shared pick chain, `pick-tcp-3-offcluster`:
masquerade as kube-proxy would (here: sources outside the cluster CIDRs), then DNAT to
`ip daddr . tcp dport . numgen random mod 3` looked up in one map of every frontend's endpoints per
family and protocol (`endpoints-tcp`, `endpoints6-udp`, …; nft 1.0.6 cannot read back a map typed by
`th dport`). Pick chains are shared by every frontend with as many endpoints and the same masquerading
(a handful of chains, not one per service: nft reads every chain before each transaction, and the kernel
checks a map's elements against every rule bound to it, 10,000 bindings made 100,000 elements take 20 s).
So an endpoint replaced is two map elements and no rule (a rule added makes the kernel re-validate the
whole table, ~40 ms at 10,000 services); a change in the number of endpoints changes the frontend's
element. Frontends with a Local policy's short-circuit or session affinity keep a service chain (and,
with affinity, endpoint chains and sets, as in kube-proxy). `describe` reads the table back (`nft -j list
table`) into what each frontend DNATs to: the renderer and its parser sit together.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from noded.model.tracker import Backend, Frontend, FrontendState
from noded.services.plan import Pick, plan
from noded.services.slots import plan_slots
from noded.services.view import ProgrammedView

TABLE = "inet noded"
MASQ_MARK = 0x4000

BASE_CHAINS: dict[str, str] = {
    # name -> chain spec (hooks); rules come from base_rules()
    "nat-prerouting": "{ type nat hook prerouting priority dstnat ; policy accept ; }",
    "nat-output": "{ type nat hook output priority -100 ; policy accept ; }",
    "nat-postrouting": "{ type nat hook postrouting priority srcnat ; policy accept ; }",
    "filter-prerouting": "{ type filter hook prerouting priority dstnat - 10 ; policy accept ; }",
    "filter-output": "{ type filter hook output priority -110 ; policy accept ; }",
    "services": "",
    "masquerading": "",
    "mark-for-masquerade": "",
    "reject-chain": "",
}
MAPS = {
    "service-ips": "ipv4_addr . inet_proto . inet_service : verdict",
    "service-ips6": "ipv6_addr . inet_proto . inet_service : verdict",
    "no-endpoint-services": "ipv4_addr . inet_proto . inet_service : verdict",
    "no-endpoint-services6": "ipv6_addr . inet_proto . inet_service : verdict",
}
# frontend address . port . slot -> endpoint, by family and protocol; a frontend's own pick uses slots 0..N-1,
# the Local policy's short-circuit (what pods and the node get) slots CLUSTER_SLOTS.. (numgen's offset)
ENDPOINT_MAPS = {
    f"endpoints{suffix}-{proto}": f"typeof {fam} daddr . {proto} dport . numgen random mod 1"
    f" : {fam} daddr . {proto} dport"
    for suffix, fam in (("", "ip"), ("6", "ip6"))
    for proto in ("tcp", "udp", "sctp")
}
CLUSTER_SLOTS = 1 << 24
HAIRPIN_SETS = {"hairpin": "ipv4_addr . ipv4_addr", "hairpin6": "ipv6_addr . ipv6_addr"}  # endpoint . itself
CASCADE_MAX = 32  # affinity: endpoint chains chosen by a rule cascade; more than this by an anonymous verdict map


def base_rules() -> dict[str, list[str]]:
    lookup4 = "ip daddr . meta l4proto . th dport"
    lookup6 = "ip6 daddr . meta l4proto . th dport"
    check = [
        f"ct state new {lookup4} vmap @no-endpoint-services",
        f"ct state new {lookup6} vmap @no-endpoint-services6",
    ]
    return {
        "nat-prerouting": ["jump services"],
        "nat-output": ["jump services"],
        "nat-postrouting": [  # a pod DNATed to itself through its service is masqueraded (hairpin)
            "ct status dnat ip saddr . ip daddr @hairpin jump mark-for-masquerade",
            "ct status dnat ip6 saddr . ip6 daddr @hairpin6 jump mark-for-masquerade",
            "jump masquerading",
        ],
        "filter-prerouting": check,
        "filter-output": check,
        "services": [f"{lookup4} vmap @service-ips", f"{lookup6} vmap @service-ips6"],
        "masquerading": [
            f"meta mark & {MASQ_MARK:#x} == 0 return",
            f"meta mark set meta mark ^ {MASQ_MARK:#x}",
            "masquerade fully-random",
        ],
        "mark-for-masquerade": [f"meta mark set meta mark | {MASQ_MARK:#x}"],
        # TCP gets a RST: ECONNREFUSED at once, never slowed by the kernel's ICMP rate limit
        "reject-chain": ["meta l4proto tcp reject with tcp reset", "reject"],
    }


def base_commands() -> list[str]:
    """Create-if-missing every base object (idempotent `add`s)."""
    cmds = [f"add table {TABLE}"]
    cmds += [f"add map {TABLE} {name} {{ type {spec} ; }}" for name, spec in MAPS.items()]
    cmds += [f"add map {TABLE} {name} {{ {spec} ; }}" for name, spec in ENDPOINT_MAPS.items()]
    cmds += [f"add set {TABLE} {name} {{ type {spec} ; }}" for name, spec in HAIRPIN_SETS.items()]
    cmds += [f"add chain {TABLE} {name} {spec}".rstrip() for name, spec in BASE_CHAINS.items()]
    return cmds


def _hash(*parts: object) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:8]


def _v6(ip: str) -> bool:
    """For addresses the model normalised already (a parse per backend was a third of a full sync)."""
    return ":" in ip


def _ipfam(ip: str) -> str:
    return "ip6" if _v6(ip) else "ip"


def _addr(ip: str) -> str:
    return f"[{ip}]" if _v6(ip) else ip


@dataclass(frozen=True)
class FrontendRules:
    """Everything one frontend puts in the table."""

    element_map: str  # which verdict map holds this frontend
    element: str  # "key : verdict"
    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    sets: dict[str, str] = field(default_factory=dict)  # affinity set name -> spec
    # endpoint IPs, masqueraded when they reach themselves (a tuple: a frozenset of ten was 1 KiB a frontend)
    hairpin: tuple[str, ...] = ()
    endpoint_map: str = ""  # the shared map holding its endpoint elements
    endpoints: tuple[str, ...] = ()  # "frontend . slot : endpoint" elements of endpoint_map
    picks: frozenset[tuple[str, tuple[str, ...]]] = frozenset()  # the shared pick chains it uses: (name, rules)


def frontend_rules(
    fe: Frontend, state: FrontendState, cluster_cidrs: list[str], old: FrontendRules | None = None
) -> FrontendRules:
    """The chains, sets and map element of one frontend (kube-proxy's nftables layout). With `old` (what is
    programmed), endpoints keep their slots where they can (plan_slots, as the eBPF maps): an endpoint
    replaced takes the slot of the one it replaces, one element changed."""
    sp = state.service
    held = _held_slots(old)
    p = plan(fe, state, cluster_cidrs)
    key = f"{fe.ip} . {fe.protocol.lower()} . {fe.port}"
    suffix = "6" if _v6(fe.ip) else ""
    if p.reject:
        return FrontendRules(f"no-endpoint-services{suffix}", f"{key} : goto reject-chain")
    fam = _ipfam(fe.ip)
    pods = f"{{ {', '.join(p.pod_cidrs)} }}" if p.pod_cidrs else ""
    chains: dict[str, tuple[str, ...]] = {}
    sets: dict[str, str] = {}
    elements: list[str] = []
    picks: set[tuple[str, tuple[str, ...]]] = set()
    masquerade, masquerade_rule = "", None
    if p.masquerade == "off-cluster" and pods:  # e.g. the node itself reaching a cluster IP
        masquerade, masquerade_rule = "offcluster", f"{fam} saddr != {pods} jump mark-for-masquerade"
    elif p.masquerade == "all":
        masquerade, masquerade_rule = "masq", "jump mark-for-masquerade"
    if p.pick and not p.short_circuit and not sp.affinity_timeout:  # most frontends: no chain of their own
        target, pick_rules = _pick_chain(fe, p.pick, elements, held, masquerade, masquerade_rule)
        picks.add((target, pick_rules))
    else:  # a chain of its own: a Local policy's short-circuit, or session affinity
        rules = [masquerade_rule] if masquerade_rule else []
        if p.short_circuit:
            # externalTrafficPolicy Local: pods and the node itself still reach every endpoint; everyone
            # else keeps its address and gets this node's endpoints, or nothing
            cluster_chain = _quote(f"service-{_hash(fe, 'cluster')}-{sp.name.namespace}/{sp.name.name}/cluster")
            short = _pick_endpoint(fe, state, p.short_circuit, chains, sets, elements, picks, held)
            chains[cluster_chain] = tuple(short)
            if pods:
                if p.masquerade_pods:
                    rules.append(f"{fam} saddr {pods} jump mark-for-masquerade")
                rules.append(f"{fam} saddr {pods} goto {cluster_chain}")
            rules += ["fib saddr type local jump mark-for-masquerade", f"fib saddr type local goto {cluster_chain}"]
        if p.pick:
            rules += _pick_endpoint(fe, state, p.pick, chains, sets, elements, picks, held)
        else:
            rules.append('drop comment "no local endpoints"')
        proto = fe.protocol.lower()
        target = _quote(f"service-{_hash(fe)}-{sp.name.namespace}/{sp.name.name}/{proto}/{sp.name.port}")
        chains[target] = tuple(rules)
    # hairpin: only endpoints that may be this node's pods can be DNATed back to their own source here (an
    # endpoint on another node is reached from its own node's translation); in real slices every pod's
    # endpoint names its node, so the set holds this node's pods, not the cluster's
    here = None if state.here is None else set(state.here)
    endpoint_ips = tuple(
        dict.fromkeys(
            ip for pick in (p.pick, p.short_circuit) if pick for ip, _ in pick.backends if here is None or ip in here
        )
    )
    return FrontendRules(
        f"service-ips{suffix}",
        f"{key} : goto {target}",
        chains,
        sets,
        endpoint_ips,
        f"endpoints{suffix}-{fe.protocol.lower()}",
        tuple(elements),
        frozenset(picks),
    )


def _held_slots(old: FrontendRules | None) -> dict[int, Backend]:
    """{slot: endpoint} of what is programmed (read back from its elements)."""
    held = {}
    for element in old.endpoints if old is not None else ():
        key, _, value = element.partition(" : ")
        ip, _, port = value.rpartition(" . ")
        held[int(key.rpartition(" . ")[2])] = (ip, int(port))
    return held


def _pick_chain(
    fe: Frontend,
    pick: Pick,
    elements: list[str],
    held: dict[int, Backend],
    masquerade: str = "",
    masquerade_rule: str | None = None,
) -> tuple[str, tuple[str, ...]]:
    """The shared pick chain for this many endpoints (and masquerading, and fallback), its rules, and the
    frontend's endpoint elements (added to `elements`, each endpoint in the slot `held` gives it where it
    can): a Local policy's short-circuit draws from slots of its own (numgen's offset)."""
    fam, proto, suffix = _ipfam(fe.ip), fe.protocol.lower(), "6" if _v6(fe.ip) else ""
    first = CLUSTER_SLOTS if pick.tag == "cluster" else 0
    was = [held[slot] for slot in sorted(held) if first <= slot < first + CLUSTER_SLOTS]
    order = plan_slots(was, list(pick.backends)) if was else pick.backends
    elements += [f"{fe.ip} . {fe.port} . {first + i} : {ip} . {port}" for i, (ip, port) in enumerate(order)]
    n = len(pick.backends)
    parts = [f"pick{suffix}", proto, str(n)] + ["cluster"] * bool(first) + [masquerade] * bool(masquerade)
    parts += ["terminating"] * pick.fallback
    key = f"{fam} daddr . {proto} dport . numgen random mod {n}{f' offset {first}' if first else ''}"
    note = ' comment "serving-terminating"' if pick.fallback else ""
    dnat = f"meta l4proto {proto} dnat {fam} to {key} map @endpoints{suffix}-{proto}{note}"
    return "-".join(parts), (*([masquerade_rule] if masquerade_rule else []), dnat)


def _pick_endpoint(
    fe: Frontend,
    state: FrontendState,
    pick: Pick,
    chains: dict[str, tuple[str, ...]],
    sets: dict[str, str],
    elements: list[str],
    picks: set[tuple[str, tuple[str, ...]]],
    held: dict[int, Backend],
) -> list[str]:
    """Rules choosing one backend (affinity first, then at random) and DNATing to it.

    Without affinity: a goto to the shared pick chain for this many endpoints (added to `picks`), which
    DNATs through the shared endpoint map (the frontend's elements go to `elements`). No chain per
    endpoint, because `nft` reads every chain of the table before each transaction and the kernel's chain
    dump is quadratic in their number.
    """
    if not state.service.affinity_timeout:
        name, rules = _pick_chain(fe, pick, elements, held)
        picks.add((name, rules))
        return [f"goto {name}"]
    sp = state.service
    fam = _ipfam(fe.ip)
    note = ' comment "serving-terminating"' if pick.fallback else ""
    dnat = f"meta l4proto {fe.protocol.lower()} dnat {fam}"
    rules: list[str] = []
    gotos = []
    addr_type = "ipv6_addr" if _v6(fe.ip) else "ipv4_addr"
    for ip, port in pick.backends:
        ep_chain = _quote(
            f"endpoint-{_hash(fe, ip, port, pick.tag)}-{sp.name.namespace}/{sp.name.name}/{sp.name.port}__{ip}/{port}"
        )
        aff = f"affinity-{_hash(fe, ip, port, pick.tag)}"
        sets[aff] = f"{{ type {addr_type} ; flags dynamic,timeout ; timeout {sp.affinity_timeout}s ; }}"
        rules.append(f"{fam} saddr @{aff} goto {ep_chain}")
        chains[ep_chain] = (f"update @{aff} {{ {fam} saddr }}", f"{dnat} to {_addr(ip)}:{port}{note}")
        gotos.append(f"goto {ep_chain}")
    if len(gotos) > CASCADE_MAX:
        targets = ", ".join(f"{i} : {g}" for i, g in enumerate(gotos))
        return [*rules, f"numgen random mod {len(gotos)} vmap {{ {targets} }}"]
    return rules + _random_choice(gotos)


def _random_choice(actions: list[str]) -> list[str]:
    """Rules doing one of the actions, uniformly at random: iptables' cascade, rule i matching with
    probability 1/(n-i). Not an anonymous verdict map per service: the kernel checks every jump it is
    given for loops by walking all the table's verdict maps, which made 10,000 services quadratic."""
    n = len(actions)
    return [f"numgen random mod {n - i} 0 {a}" for i, a in enumerate(actions[:-1])] + [actions[-1]]


_NOT_CHAIN_CHAR = re.compile(r"[^A-Za-z0-9/_.-]")


def _quote(name: str) -> str:
    """A chain name nft 1.0 takes unquoted: letters, digits and / - _ . only. The model validates names as
    the API server does; this keeps rule text safe even if something unvalidated ever got this far."""
    return _NOT_CHAIN_CHAR.sub("_", name.replace(":", "."))


def chain_commands(name: str, rules: tuple[str, ...], new: bool) -> list[str]:
    cmds = [f"add chain {TABLE} {name}"] if new else [f"flush chain {TABLE} {name}"]
    return cmds + [f"add rule {TABLE} {name} {rule}" for rule in rules]


def element_key(element: str) -> str:
    return element.split(" : ")[0]


def hairpin_element(ip: str) -> tuple[str, str]:
    """The hairpin set and element for one endpoint IP."""
    return ("hairpin6" if _v6(ip) else "hairpin"), f"{ip} . {ip}"


# -- the parser that reads this renderer's output back (`noded services`) --------------------------
def describe(doc: dict) -> list[ProgrammedView]:
    """Frontends and their endpoints as `nft -j list table inet noded` shows them."""
    items = doc.get("nftables", [])
    rules: dict[str, list[dict]] = {}
    for item in items:
        if "rule" in item:
            rules.setdefault(item["rule"]["chain"], []).append(item["rule"])
    timeouts = {i["set"]["name"]: i["set"].get("timeout", 0) for i in items if "set" in i}
    slots: dict[tuple[str, str, int], dict[int, tuple[str, int]]] = {}  # frontend -> slot -> endpoint
    for item in items:
        m = item.get("map")
        if m and m["name"] in ENDPOINT_MAPS:
            proto = m["name"].rpartition("-")[2]
            for key, data in m.get("elem", []):
                ip, port, slot = key["concat"]
                addr, to_port = data["concat"]
                slots.setdefault((ip, proto, int(port)), {})[int(slot)] = (addr, int(to_port))
    views = []
    for item in items:
        m = item.get("map")
        if not m or not m["name"].startswith(("service-ips", "no-endpoint-services")):
            continue
        for key, verdict in m.get("elem", []):
            ip, proto, port = key["concat"]
            chain = verdict["goto"]["target"]  # reject-chain for a frontend with no endpoints
            ready: list = []
            terminating: list = []
            affinity = 0
            for rule in rules.get(chain, []):
                for backend, fallback in _backends(rule, rules, slots.get((ip, proto, int(port)), {})):
                    if backend not in ready + terminating:
                        (terminating if fallback else ready).append(backend)
                for e in rule["expr"]:
                    affinity_set = e.get("match", {}).get("right")
                    if isinstance(affinity_set, str) and affinity_set.startswith("@affinity-"):
                        affinity = timeouts.get(affinity_set[1:], 0)
            views.append(ProgrammedView(Frontend(ip, int(port), proto.upper()), 0, affinity, ready, terminating))
    return sorted(views, key=lambda v: (v.frontend.ip, v.frontend.port, v.frontend.protocol))


def _backends(
    rule: dict, rules: dict[str, list[dict]], slots: dict[int, tuple[str, int]], fallback: bool = False
) -> list[tuple[tuple[str, int], bool]]:
    """The backends one service-chain rule DNATs to: itself, through a pick chain and the shared endpoint
    map (the frontend's `slots`, drawn by the pick rule's numgen), or through endpoint chains."""
    fallback = fallback or rule.get("comment") == "serving-terminating"
    out = []
    for e in rule["expr"]:
        dnat = e.get("dnat")
        if dnat and isinstance(dnat["addr"], str):
            out.append(((dnat["addr"], int(dnat["port"])), fallback))
        elif dnat:  # frontend address . port . numgen random mod n offset k map @endpoints-<proto>
            key = dnat["addr"]["map"]["key"]["concat"]
            draw = next(k["numgen"] for k in key if isinstance(k, dict) and "numgen" in k)
            first = draw.get("offset", 0)
            out += [(slots[slot], fallback) for slot in range(first, first + draw["mod"]) if slot in slots]
        targets = [e["goto"]["target"]] if "goto" in e else []
        targets += [v["goto"]["target"] for _i, v in e.get("vmap", {}).get("data", {}).get("set", [])]
        for target in targets:
            if target.startswith(("endpoint-", "pick")):
                out += [b for ep_rule in rules.get(target, []) for b in _backends(ep_rule, rules, slots, fallback)]
    return out
