"""The iptables rules noded wants, after kube-proxy's iptables mode, as iptables-restore lines. Pure.

noded's chains are all NODED-*: NODED-SERVICES (nat) matches each frontend in a linear list and jumps
to its NODED-FE-* chain, which masquerades as kube-proxy would and DNATs to an endpoint chosen with
`statistic` (with session affinity, through NODED-SEP-* endpoint chains and `recent`, as kube-proxy). The
filter table's NODED-SERVICES rejects new connections to frontends without endpoints and drops external
traffic a Local policy cannot serve.

A pod reaching itself through its service (hairpin) is masqueraded by one rule in NODED-POSTROUTING, a
classic-BPF match (xt_bpf) comparing the DNATed packet's source and destination addresses, instead of a
rule per endpoint as in kube-proxy: with legacy iptables every transaction replaces the whole nat table in
the kernel, and that costs per rule (10,000 services x 10 endpoints: 320,000 rules -> 120,000).
`describe` reads noded's chains back (iptables-save) into what each frontend DNATs to: the renderer and its
parser sit together.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from noded.model.tracker import Frontend, FrontendState
from noded.services.plan import Pick, plan
from noded.services.view import ProgrammedView

MASQ_MARK = "0x4000"
PREFIX = "NODED-"
NAT_CHAINS = ("NODED-SERVICES", "NODED-POSTROUTING", "NODED-MARK-MASQ")
FILTER_CHAINS = ("NODED-SERVICES",)
# (table, built-in chain, rule spec after `-A CHAIN`): noded's hooks into the built-in chains
JUMPS = (
    ("nat", "PREROUTING", "-m comment --comment noded-services -j NODED-SERVICES"),
    ("nat", "OUTPUT", "-m comment --comment noded-services -j NODED-SERVICES"),
    ("nat", "POSTROUTING", "-m comment --comment noded-postrouting -j NODED-POSTROUTING"),
    ("filter", "INPUT", "-m conntrack --ctstate NEW -m comment --comment noded-services -j NODED-SERVICES"),
    ("filter", "FORWARD", "-m conntrack --ctstate NEW -m comment --comment noded-services -j NODED-SERVICES"),
    ("filter", "OUTPUT", "-m conntrack --ctstate NEW -m comment --comment noded-services -j NODED-SERVICES"),
)


# cBPF over the IP header (xt_bpf's skb data starts there): accept when source == destination address
_SAME_ADDRESS = {
    # A = saddr; X = A; A = daddr; A == X ? 1 : 0
    4: "6,32 0 0 12,7 0 0 0,32 0 0 16,29 0 1 0,6 0 0 1,6 0 0 0",
    # the same for each of the four words of saddr (8..23) and daddr (24..39); a difference fails at once
    6: "18,"
    + ",".join(f"32 0 0 {8 + 4 * w},7 0 0 0,32 0 0 {24 + 4 * w},29 0 {13 - 4 * w} 0" for w in range(4))
    + ",6 0 0 1,6 0 0 0",
}


def base_rules(version: int = 4) -> dict[str, list[str]]:
    """The nat table's fixed chains of one family (NODED-SERVICES is built per sync)."""
    return {
        "NODED-POSTROUTING": [
            # hairpin: a connection DNATed back to its own source is masqueraded, or the reply would skip us
            f'-m conntrack --ctstate DNAT -m bpf --bytecode "{_SAME_ADDRESS[version]}" -j MARK --or-mark {MASQ_MARK}',
            f"-m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
            f"-j MARK --xor-mark {MASQ_MARK}",
            "-m comment --comment noded-masquerade -j MASQUERADE --random-fully",
        ],
        "NODED-MARK-MASQ": [f"-j MARK --or-mark {MASQ_MARK}"],
    }


@dataclass(frozen=True)
class FrontendRules:
    """Everything one frontend puts in the tables of its family."""

    version: int  # 4: iptables, 6: ip6tables
    nat_service_rule: str | None  # its line in nat NODED-SERVICES
    filter_rule: str | None  # its line in filter NODED-SERVICES (reject, or drop external)
    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)  # nat chains it owns


def _chain(kind: str, *parts: object) -> str:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:16].upper()
    return f"{PREFIX}{kind}-{digest}"  # at most 28 characters, iptables' limit


_UNSAFE = re.compile(r"[^A-Za-z0-9/_.:-]")


def _safe(text: str) -> str:
    """Comment text iptables-restore reads as one word inside quotes: no quote, newline or space can get
    in (names are validated as the API server does; this holds even if something unvalidated got here)."""
    return _UNSAFE.sub("_", text)[:200]


def frontend_rules(
    fe: Frontend, state: FrontendState, cluster_cidrs: list[str], _old: FrontendRules | None = None
) -> FrontendRules:
    sp = state.service
    p = plan(fe, state, cluster_cidrs)
    version = 6 if ":" in fe.ip else 4  # normalised by the model
    host = f"{fe.ip}/{32 if version == 4 else 128}"
    proto = fe.protocol.lower()
    match = f"-d {host} -p {proto} -m {proto} --dport {fe.port}"
    comment = f'-m comment --comment "{_safe(f"{sp.name.namespace}/{sp.name.name}:{sp.name.port}")}"'
    if p.reject:
        reject = "REJECT --reject-with tcp-reset" if proto == "tcp" else "REJECT"
        return FrontendRules(version, None, f"{match} {comment} -j {reject}")
    chains: dict[str, tuple[str, ...]] = {}
    fe_chain = _chain("FE", fe)
    rules: list[str] = []
    if p.masquerade == "off-cluster" and len(p.pod_cidrs) == 1:
        rules.append(f"! -s {p.pod_cidrs[0]} -j NODED-MARK-MASQ")
    elif p.masquerade == "off-cluster" and p.pod_cidrs:  # one source CIDR per rule: mark all, unmark pods
        rules.append("-j NODED-MARK-MASQ")
        rules += [f"-s {cidr} -j MARK --and-mark {~int(MASQ_MARK, 16) & 0xFFFFFFFF:#x}" for cidr in p.pod_cidrs]
    elif p.masquerade == "all":
        rules.append("-j NODED-MARK-MASQ")
    if p.short_circuit:
        short_chain = _chain("SC", fe)
        chains[short_chain] = tuple(_pick_endpoint(fe, state, p.short_circuit, chains))
        for cidr in p.pod_cidrs:
            if p.masquerade_pods:
                rules.append(f"-s {cidr} -j NODED-MARK-MASQ")
            rules.append(f"-s {cidr} -j {short_chain}")
        rules += ["-m addrtype --src-type LOCAL -j NODED-MARK-MASQ", f"-m addrtype --src-type LOCAL -j {short_chain}"]
    filter_rule = None
    if p.pick:
        rules += _pick_endpoint(fe, state, p.pick, chains)
    else:  # Local policy and no endpoint here: what is still addressed to the frontend after nat is dropped
        who = _safe(f"{sp.name.namespace}/{sp.name.name}")
        filter_rule = f'{match} -m comment --comment "{who} has no local endpoints" -j DROP'
    chains[fe_chain] = tuple(rules)
    return FrontendRules(version, f"{match} {comment} -j {fe_chain}", filter_rule, chains)


def _pick_endpoint(fe: Frontend, state: FrontendState, pick: Pick, chains: dict[str, tuple[str, ...]]) -> list[str]:
    """Rules choosing one backend with `statistic`, so each is equally likely, and DNATing to it; with
    affinity, through an endpoint chain per backend, `recent` first."""
    sp = state.service
    version = 6 if ":" in fe.ip else 4  # normalised by the model
    mask = "255.255.255.255" if version == 4 else "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    proto = fe.protocol.lower()
    affinity: list[str] = []
    random: list[str] = []
    n = len(pick.backends)
    for i, (ip, port) in enumerate(pick.backends):
        sep = _chain("SEP", fe, ip, port, pick.tag)
        target = f"[{ip}]:{port}" if version == 6 else f"{ip}:{port}"
        note = ' -m comment --comment "serving-terminating"' if pick.fallback else ""
        recent = f"-m recent --name {sep} --mask {mask} --rsource"
        left = n - i
        chance = f"-m statistic --mode random --probability {1 / left:.10f} " if left > 1 else ""
        if sp.affinity_timeout:
            affinity.append(f"{recent} --rcheck --seconds {sp.affinity_timeout} --reap -j {sep}")
            chains[sep] = (f"-p {proto} {recent} --set -m {proto}{note} -j DNAT --to-destination {target}",)
            random.append(f"{chance}-j {sep}")
        else:
            random.append(f"{chance}-p {proto} -m {proto}{note} -j DNAT --to-destination {target}")
    return affinity + random


# -- the parser that reads this renderer's output back (`noded services`) --------------------------
def describe(nat: str, filt: str) -> list[ProgrammedView]:
    """Frontends and endpoints as iptables-save shows noded's chains."""
    rules: dict[str, list[str]] = {}
    for line in nat.split("\n"):
        if line.startswith("-A NODED-"):
            chain, _, rest = line[3:].partition(" ")
            rules.setdefault(chain, []).append(rest)
    views = []
    frontend_re = re.compile(r"-d (\S+?)/\d+ -p (\w+) -m \w+ --dport (\d+) .*-j (NODED-FE-\w+)")
    for rule in rules.get("NODED-SERVICES", []):
        m = frontend_re.search(rule)
        if not m:
            continue
        ip, proto, port, chain = m.groups()
        ready, terminating, affinity = [], [], 0
        for fe_rule in rules.get(chain, []):
            if (seconds := re.search(r"--seconds (\d+)", fe_rule)) is not None:
                affinity = int(seconds.group(1))
                continue
            if "-s " in fe_rule or "--src-type" in fe_rule:
                continue  # masquerade and the Local policy's short-circuit
            target = re.search(r"-j (NODED-SEP-\w+)", fe_rule)
            for rule in rules.get(target.group(1), []) if target else [fe_rule]:  # affinity: endpoint chains
                dnat = re.search(r"--to-destination \[?([^\]\s]+?)\]?:(\d+)$", rule)
                if dnat:
                    backend = (dnat.group(1), int(dnat.group(2)))
                    (terminating if "serving-terminating" in rule else ready).append(backend)
        views.append(ProgrammedView(Frontend(ip, int(port), proto.upper()), 0, affinity, ready, terminating))
    reject_re = re.compile(r"-d (\S+?)/\d+ -p (\w+) -m \w+ --dport (\d+) .*-j REJECT")
    for line in filt.split("\n"):
        m = reject_re.search(line) if line.startswith("-A NODED-SERVICES") else None
        if m:
            views.append(ProgrammedView(Frontend(m.group(1), int(m.group(3)), m.group(2).upper()), 0, 0, [], []))
    return sorted(views, key=lambda v: (v.frontend.ip, v.frontend.port, v.frontend.protocol))
