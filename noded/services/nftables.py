"""nftables proxier: one atomic `nft -f` transaction per sync, touching only changed frontends.

A full sync (the first, and every syncPeriod) re-asserts every base chain, map
and frontend and deletes noded chains nobody wants, which repairs tampering.
"""

from __future__ import annotations

from collections import Counter

import structlog

from noded.kernel.conntrack import ConntrackCleaner
from noded.kernel.nft import NFT, NftCommand, nft, nft_json
from noded.model.tracker import Frontend, ServiceKey, ServiceModel
from noded.services import nftrules
from noded.services.mirror import RuleMirror, kept
from noded.services.nftrules import TABLE, FrontendRules
from noded.services.proxier import NetfilterExtras

log = structlog.get_logger("noded.services.nftables")
ELEMENTS_PER_COMMAND = 10_000


def table_exists(cmd: tuple[str, ...] = NFT, table: str = TABLE) -> bool:
    """Whether the table is there, from the list of tables (not a listing of its whole contents)."""
    family, name = table.split()
    tables = nft_json("list", "tables", family, cmd=cmd).get("nftables", [])
    return any(item.get("table", {}).get("name") == name for item in tables)


def delete_table(cmd: tuple[str, ...] = NFT) -> bool:
    if not table_exists(cmd):
        return False
    nft(f"delete table {TABLE}\n", cmd)
    return True


class NftProxier(NetfilterExtras):
    name = "nftables"

    def __init__(
        self,
        model: ServiceModel,
        cluster_cidrs: list[str],
        cmd: tuple[str, ...] = NFT,
        conntrack: ConntrackCleaner | None = None,
        tool: NftCommand | None = None,
    ) -> None:
        self.mirror = RuleMirror(model, cluster_cidrs, nftrules.frontend_rules)
        self.cmd = cmd
        self.tool = tool or NftCommand(cmd)
        self.conntrack = conntrack or ConntrackCleaner()
        self.transactions = 0
        self.last_script = ""  # the last transaction, when small (mirror.kept)
        self.hairpin_refs: Counter[str] = Counter()  # endpoint IP -> frontends using it
        self.pick_chains: set[str] = set()  # shared pick chains in the table (a partial sync only adds them)

    def sync(self, full: bool = False) -> int:
        desired_by_key = self.mirror.changes(full)
        delta: Counter[str] | None = None
        if full:
            after = self.mirror.after(desired_by_key)
            hairpin_refs = Counter(ip for r in after.values() for ip in r.hairpin)
            pick_rules = dict(pick for r in after.values() for pick in r.picks)
            script, picks = self._full_script(after, pick_rules, hairpin_refs), set(pick_rules)
        else:
            script, delta = self._partial_script(desired_by_key)
            picks = self.pick_chains | {
                name for d in desired_by_key.values() for r in d.values() for name, _ in r.picks
            }
        if script:
            self.tool.run(script)
            self.transactions += 1
            self.last_script = kept(script)
        self.pick_chains = picks
        self.mirror.commit(desired_by_key)
        self.conntrack.clear(self.mirror.touched_udp)
        if delta is None:
            self.hairpin_refs = hairpin_refs
        else:  # in place, once nft took the script: a copy of 100,000 counts cost 70 ms per change
            for ip, change in delta.items():
                left = self.hairpin_refs[ip] + change
                if left > 0:
                    self.hairpin_refs[ip] = left
                else:
                    self.hairpin_refs.pop(ip, None)
        return len(desired_by_key)

    def _partial_script(
        self, desired_by_key: dict[ServiceKey, dict[Frontend, FrontendRules]]
    ) -> tuple[str, Counter[str]]:
        # Order matters in one transaction: elements go first (so chains are unreferenced), then
        # additions, then chains (flushed, then deleted) and sets nobody uses any more.
        element_dels: list[str] = []
        new_picks: dict[str, tuple[str, ...]] = {}  # shared pick chains not in the table yet: made first
        adds: list[str] = []
        endpoint_dels: dict[str, list[str]] = {}  # shared endpoint map -> keys going (or changing)
        endpoint_adds: dict[str, list[str]] = {}  # shared endpoint map -> elements coming (or changed)
        chain_dels: list[str] = []
        set_dels: list[str] = []
        hairpin_delta: Counter[str] = Counter()
        for key, new in desired_by_key.items():
            old = self.mirror.old_of(key)
            for fe in old.keys() | new.keys():
                a, b = old.get(fe), new.get(fe)
                if a == b:
                    continue
                hairpin_delta.update(b.hairpin if b else ())
                hairpin_delta.subtract(a.hairpin if a else ())
                _element_changes(a, b, endpoint_dels, endpoint_adds)
                if a is not None and (b is None or a.element != b.element):
                    key_text = nftrules.element_key(a.element)
                    element_dels.append(f"delete element {TABLE} {a.element_map} {{ {key_text} }}")
                if b is not None:
                    new_picks.update((name, rules) for name, rules in b.picks if name not in self.pick_chains)
                    adds += [f"add set {TABLE} {name} {spec}" for name, spec in b.sets.items()]
                    for name, rules in b.chains.items():
                        prev = a.chains.get(name) if a else None
                        if prev != rules:
                            adds += nftrules.chain_commands(name, rules, new=prev is None)
                    if a is None or a.element != b.element:
                        adds.append(f"add element {TABLE} {b.element_map} {{ {b.element} }}")
                if a is not None:
                    chain_dels += sorted(a.chains.keys() - (b.chains.keys() if b else set()))
                    set_dels += sorted(a.sets.keys() - (b.sets.keys() if b else set()))
        for ip, delta in hairpin_delta.items():
            before = self.hairpin_refs[ip]
            hairpin_set, element = nftrules.hairpin_element(ip)
            if before == 0 and delta > 0:
                adds.append(f"add element {TABLE} {hairpin_set} {{ {element} }}")
            elif before > 0 and before + delta == 0:
                element_dels.append(f"delete element {TABLE} {hairpin_set} {{ {element} }}")
        element_dels += _element_commands("delete", endpoint_dels)
        adds += _element_commands("add", endpoint_adds)
        made = [c for name, rules in new_picks.items() for c in nftrules.chain_commands(name, rules, new=True)]
        cmds = element_dels + made + adds
        cmds += [f"flush chain {TABLE} {name}" for name in chain_dels]
        cmds += [f"delete chain {TABLE} {name}" for name in chain_dels]
        cmds += [f"delete set {TABLE} {name}" for name in set_dels]
        return ("\n".join(cmds) + "\n" if cmds else ""), hairpin_delta

    def _full_script(
        self, desired: dict[Frontend, FrontendRules], picks: dict[str, tuple[str, ...]], hairpin: Counter[str]
    ) -> str:
        """Everything re-asserted: the frontends, the shared pick chains they use and the hairpin endpoints."""
        existing = self._existing_objects()
        cmds = nftrules.base_commands()
        for name, rules in nftrules.base_rules().items():
            cmds += nftrules.chain_commands(name, tuple(rules), new=False)
        cmds += [f"flush map {TABLE} {name}" for name in nftrules.MAPS]
        cmds += [f"flush set {TABLE} {name}" for name in nftrules.HAIRPIN_SETS]
        there = set(existing["chains"])  # a chain made now needs no flush (10,000 commands fewer at a start)
        for name, rules in sorted(picks.items()):
            cmds += nftrules.chain_commands(name, rules, new=name not in there)
        wanted_chains: set[str] = set(picks)
        wanted_sets: set[str] = set()
        for rules in desired.values():
            for name, spec in rules.sets.items():
                cmds.append(f"add set {TABLE} {name} {spec}")
                wanted_sets.add(name)
            for name, chain_rules in rules.chains.items():
                cmds += nftrules.chain_commands(name, chain_rules, new=name not in there)
                wanted_chains.add(name)
        cmds += [f"flush map {TABLE} {name}" for name in nftrules.ENDPOINT_MAPS]
        elements: dict[str, list[str]] = {}
        for rules in desired.values():
            elements.setdefault(rules.element_map, []).append(rules.element)
            if rules.endpoints:
                elements.setdefault(rules.endpoint_map, []).extend(rules.endpoints)
        for ip in sorted(hairpin):
            hairpin_set, element = nftrules.hairpin_element(ip)
            elements.setdefault(hairpin_set, []).append(element)
        cmds += _element_commands("add", elements)
        stale_chains = [c for c in existing["chains"] if c not in nftrules.BASE_CHAINS and c not in wanted_chains]
        cmds += [f"flush chain {TABLE} {c}" for c in stale_chains]
        cmds += [f"delete chain {TABLE} {c}" for c in stale_chains]
        base_sets = {*nftrules.MAPS, *nftrules.HAIRPIN_SETS}
        cmds += [f"delete set {TABLE} {s}" for s in existing["sets"] if s not in wanted_sets and s not in base_sets]
        return "\n".join(cmds) + "\n"

    def _existing_objects(self) -> dict[str, list[str]]:
        """The table's chain and set names, without their rules or elements (listing the whole table at 10,000
        services is 46 MB of JSON: 6 s for nft and more to parse)."""
        family, name = TABLE.split()
        out: dict[str, list[str]] = {"chains": [], "sets": []}
        for what, kind, terse in (("chains", "chain", ()), ("sets", "set", ("-t",))):
            for item in self.tool.json(*terse, "list", what, family).get("nftables", []):
                if kind in item and item[kind].get("table") == name:
                    out[what].append(item[kind]["name"])
        return out


def _element_changes(
    old: FrontendRules | None, new: FrontendRules | None, dels: dict[str, list[str]], adds: dict[str, list[str]]
) -> None:
    """One frontend's endpoint elements that change: keys to delete (gone, or given another endpoint) and
    elements to add, by shared map (a frontend's map never changes: it follows its address family)."""
    before = {nftrules.element_key(e): e for e in old.endpoints} if old else {}
    after = {nftrules.element_key(e): e for e in new.endpoints} if new else {}
    for key, element in before.items():
        if after.get(key) != element:
            dels.setdefault(old.endpoint_map, []).append(key)
    for key, element in after.items():
        if before.get(key) != element:
            adds.setdefault(new.endpoint_map, []).append(element)


def _element_commands(verb: str, items_by_set: dict[str, list[str]]) -> list[str]:
    """`add`/`delete element` commands, one per set and up to ELEMENTS_PER_COMMAND items each: nft parses
    and evaluates a command per line, and 110,000 one-element commands took seconds."""
    return [
        f"{verb} element {TABLE} {name} {{ {', '.join(items[i : i + ELEMENTS_PER_COMMAND])} }}"
        for name, items in items_by_set.items()
        for i in range(0, len(items), ELEMENTS_PER_COMMAND)
    ]
