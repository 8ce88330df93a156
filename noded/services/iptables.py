"""iptables proxier: `iptables-restore --noflush` of noded's NODED-* chains, one transaction per family.

The backend (nft or legacy) is detected as kube-proxy does: whichever already holds more rules, else the
system's default `iptables`. A partial sync rewrites NODED-SERVICES (a linear list, as in kube-proxy)
and only the chains of frontends that changed; a full sync re-declares everything, removes NODED-*
chains nobody wants and restores noded's jumps from the built-in chains, which repairs tampering.
"""

from __future__ import annotations

import re

import structlog

from noded.kernel.conntrack import ConntrackCleaner
from noded.kernel.iptables import VERSIONS, Tools, detect_backend
from noded.model.tracker import Frontend, ServiceModel
from noded.services import iptrules
from noded.services.iptrules import FrontendRules
from noded.services.mirror import RuleMirror, kept
from noded.services.proxier import NetfilterExtras

log = structlog.get_logger("noded.services.iptables")


def noded_chains(saved: str) -> list[str]:
    return re.findall(r"^:(NODED-\S+)", saved, re.M)


def missing_jumps(saved: dict[str, str]) -> list[tuple[str, str, str]]:
    return [(t, c, spec) for t, c, spec in iptrules.JUMPS if f"-A {c} {spec}" not in saved[t]]


class IptablesProxier(NetfilterExtras):
    name = "iptables"

    def __init__(
        self,
        model: ServiceModel,
        cluster_cidrs: list[str],
        prefix: tuple[str, ...] = (),
        backend: str | None = None,
        conntrack: ConntrackCleaner | None = None,
        tools: Tools | None = None,
    ) -> None:
        self.mirror = RuleMirror(model, cluster_cidrs, iptrules.frontend_rules)
        self.conntrack = conntrack or ConntrackCleaner()
        self.tools = tools or Tools(backend or detect_backend(prefix), prefix)
        self.transactions = 0
        self.last_scripts: dict[int, str] = {}  # the last transactions, when small (mirror.kept)
        log.info("iptables backend", backend=self.tools.backend)

    def sync(self, full: bool = False) -> int:
        desired_by_key = self.mirror.changes(full)
        old, new = self.mirror.programmed, self.mirror.after(desired_by_key)
        changed = None if full else {fe for k, d in desired_by_key.items() for fe in (*self.mirror.old_of(k), *d)}
        for version in VERSIONS:
            script = self._script(version, old, new, changed)
            if script:
                self.tools.restore(version, script)
                self.transactions += 1
                self.last_scripts[version] = kept(script)
        self.mirror.commit(desired_by_key)
        self.conntrack.clear(self.mirror.touched_udp)
        return len(desired_by_key)

    def _script(
        self,
        version: int,
        old: dict[Frontend, FrontendRules],
        new: dict[Frontend, FrontendRules],
        changed: set[Frontend] | None,
    ) -> str:
        """The restore script of one family: everything (changed None: a full sync), or the chains of just
        the frontends that changed (their chains are theirs alone: names hash the frontend) and the
        NODED-SERVICES lists, as kube-proxy's partial sync; "" when nothing of this family changed."""
        full = changed is None
        new_v = {fe: r for fe, r in new.items() if r.version == version}
        if changed is not None:
            old_c = {fe: old[fe] for fe in changed if fe in old and old[fe].version == version}
            new_c = {fe: new_v[fe] for fe in changed if fe in new_v}
            if old_c == new_c:
                return ""
        saved = {t: self.tools.save(version, t) for t in ("nat", "filter")} if full else {}
        if full:
            write = {name: rules for r in new_v.values() for name, rules in r.chains.items()}
            stale = [c for c in noded_chains(saved["nat"]) if c not in write and c not in iptrules.NAT_CHAINS]
        else:
            wanted = {name: rules for r in new_c.values() for name, rules in r.chains.items()}
            had = {name: rules for r in old_c.values() for name, rules in r.chains.items()}
            write = {name: rules for name, rules in wanted.items() if had.get(name) != rules}
            stale = [c for c in had if c not in wanted]
        nat = ["*nat", *(f":{c} - [0:0]" for c in iptrules.NAT_CHAINS if full or c == "NODED-SERVICES")]
        nat += [f":{c} - [0:0]" for c in (*write, *stale)]
        if full:
            nat += [f"-A {c} {rule}" for c, rules in iptrules.base_rules(version).items() for rule in rules]
        nat += [f"-A NODED-SERVICES {r.nat_service_rule}" for r in new_v.values() if r.nat_service_rule]
        nat += [f"-A {c} {rule}" for c, rules in write.items() for rule in rules]
        nat += [f"-X {c}" for c in stale]
        filt = ["*filter", ":NODED-SERVICES - [0:0]"]
        filt += [f"-A NODED-SERVICES {r.filter_rule}" for r in new_v.values() if r.filter_rule]
        for table, chain, spec in missing_jumps(saved) if full else []:
            (nat if table == "nat" else filt).append(f"-I {chain} 1 {spec}")
        return "\n".join([*nat, "COMMIT", *filt, "COMMIT", ""])


def remove_all(prefix: tuple[str, ...] = ()) -> list[str]:
    """Delete noded's jumps and NODED-* chains from both backends and families; returns what went."""
    removed = []
    for backend in ("nft", "legacy"):
        tools = Tools(backend, prefix)
        for version in VERSIONS:
            saved = {t: tools.save(version, t) for t in ("nat", "filter")}
            script = []
            for table in ("nat", "filter"):
                chains = noded_chains(saved[table])
                jumps = [(c, spec) for t, c, spec in iptrules.JUMPS if t == table and f"-A {c} {spec}" in saved[table]]
                if not chains and not jumps:
                    continue
                script += [f"*{table}", *(f"-D {c} {spec}" for c, spec in jumps)]
                script += [f":{c} - [0:0]" for c in chains] + [f"-X {c}" for c in chains] + ["COMMIT"]
                removed += [f"ip{'6' if version == 6 else ''}tables-{backend} {table} {c}" for c in chains]
            if script:
                tools.restore(version, "\n".join(script) + "\n")
    return removed
