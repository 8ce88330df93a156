"""The cluster zone (Kubernetes DNS-Based Service Discovery, schema 1.1.0) answered from the model. Sans-IO.

`ClusterZone.answer(query)` takes a parsed query and returns the reply for a name the zone owns (the
cluster domain, and reverse names of the addresses it knows), or None for a query to forward. Where
the specification is silent it does what CoreDNS's kubernetes plugin does: NXDOMAIN vs NODATA with the
zone's SOA in the authority section, dashed-IP host names for headless endpoints without a hostname,
`<dashed-ip>.<ns>.pod.<zone>` records, ExternalName answered as a CNAME chased inside the zone (the
caller resolves an external target and appends it: `Answer.chase`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import dns.rrset

from noded.model.objects import DnsService, EndpointSlice
from noded.model.tracker import ServiceKey, ServiceModel

SCHEMA_VERSION = "1.1.0"
MAX_CNAME_CHAIN = 8
A, AAAA, SRV, PTR, TXT, SOA, CNAME = (
    dns.rdatatype.A,
    dns.rdatatype.AAAA,
    dns.rdatatype.SRV,
    dns.rdatatype.PTR,
    dns.rdatatype.TXT,
    dns.rdatatype.SOA,
    dns.rdatatype.CNAME,
)
AddressRecords = dict[tuple[str, int], list[str]]  # (absolute lowercase name, type) -> addresses
REVERSE = (dns.name.from_text("in-addr.arpa."), dns.name.from_text("ip6.arpa."))


@dataclass(frozen=True, slots=True)
class HostRecord:
    label: str  # the endpoint's hostname, or its address dashed
    address: str
    ports: tuple[tuple[str, str, int], ...]  # the slice's (name, protocol, port)


@dataclass
class Answer:
    reply: dns.message.Message
    chase: dns.name.Name | None = None  # an external CNAME target for the caller to resolve and append
    rotated: bool = False  # an address rrset was turned by the query ID: the reply bytes depend on the ID


def rotate_addresses(rrsets: list[dns.rrset.RRset], query_id: int) -> bool:
    """Turn each A/AAAA rrset of several records by the query ID (its first record: number ID mod count), the
    round robin CoreDNS's loadbalance plugin gives, made deterministic so the eBPF fast path writes the same
    bytes for the same query; whether any was turned."""
    rotated = False
    for i, rrset in enumerate(rrsets):
        if rrset.rdtype in (A, AAAA) and len(rrset) > 1:
            records = list(rrset)
            k = query_id % len(records)
            rrsets[i] = dns.rrset.from_rdata_list(rrset.name, rrset.ttl, records[k:] + records[:k])
            rotated = True
    return rotated


class _Index:
    """The zone's view of the model, updated service by service as the model reports changes: the services,
    headless services' host records, namespaces, and each address's owners for reverse names."""

    def __init__(self) -> None:
        self.generation = -1
        self.services: dict[ServiceKey, DnsService] = {}
        self.hosts: dict[ServiceKey, list[HostRecord]] = {}
        self.namespaces: dict[str, int] = {}  # namespace -> services in it
        # address -> its owner: a service (its cluster IP), or a list of (service, host label or "") when it has
        # a host name or several owners (the common single owner costs no object of its own)
        self.reverse: dict[str, ServiceKey | list[tuple[ServiceKey, str]]] = {}

    def put(self, key: ServiceKey, svc: DnsService | None, slices: list[EndpointSlice]) -> None:
        """Replace what the index holds for one service (None: it is gone)."""
        self._drop(key)
        if svc is None:
            return
        self.services[key] = svc
        self.namespaces[svc.namespace] = self.namespaces.get(svc.namespace, 0) + 1
        for ip in svc.cluster_ips:
            self._own(ip, key, "")
        if svc.headless:
            hosts = _host_records(svc, slices)
            if hosts:
                self.hosts[key] = hosts
            for host in hosts:
                self._own(host.address, key, host.label)

    def _owners(self, ip: str) -> list[tuple[ServiceKey, str]]:
        held = self.reverse.get(ip)
        if held is None:
            return []
        return held if isinstance(held, list) else [(held, "")]

    def _own(self, ip: str, key: ServiceKey, label: str) -> None:
        if ip not in self.reverse and not label:
            self.reverse[ip] = key
        else:
            self.reverse[ip] = [*self._owners(ip), (key, label)]

    def _drop(self, key: ServiceKey) -> None:
        svc = self.services.pop(key, None)
        if svc is None:
            return
        left = self.namespaces.pop(svc.namespace) - 1
        if left:
            self.namespaces[svc.namespace] = left
        addresses = set(svc.cluster_ips) | {h.address for h in self.hosts.pop(key, ())}
        for ip in addresses:
            owners = [o for o in self._owners(ip) if o[0] != key]
            if not owners:
                self.reverse.pop(ip, None)
            elif len(owners) == 1 and not owners[0][1]:
                self.reverse[ip] = owners[0][0]
            else:
                self.reverse[ip] = owners

    def names_of(self, ip: str) -> list[str]:
        """The names (relative to the zone) an address has."""
        out = []
        for (namespace, name), label in self._owners(ip):
            out.append(f"{label}.{name}.{namespace}.svc" if label else f"{name}.{namespace}.svc")
        return out


def _dashed(ip: str) -> str:
    return ip.replace(".", "-").replace(":", "-")


def _family(ip: str) -> int:
    return A if ipaddress.ip_address(ip).version == 4 else AAAA


def _host_records(svc: DnsService, slices: list[EndpointSlice]) -> list[HostRecord]:
    """A headless service's endpoints as DNS publishes them: ready ones (all with publishNotReadyAddresses)."""
    out: dict[tuple[str, str], HostRecord] = {}
    for s in slices:
        if s.address_type not in ("IPv4", "IPv6"):
            continue
        for ep in s.endpoints:
            if ep.ready or svc.publish_not_ready:
                label = (ep.hostname or _dashed(ep.address)).lower()
                out.setdefault((label, ep.address), HostRecord(label, ep.address, s.ports))
    return sorted(out.values(), key=lambda h: (h.label, h.address))


class ClusterZone:
    def __init__(self, model: ServiceModel, domain: str = "cluster.local", ttl: int = 5) -> None:
        self.model = model
        self.origin = dns.name.from_text(domain.strip(".") + ".")
        self.ttl = ttl
        self._changes = model.dns_changes()
        self._index = _Index()

    # -- the index, kept in step with the model -------------------------------------------
    def _current(self) -> _Index:
        """The index as of the model's latest DNS change: built whole once, then updated only for the services
        the model reports changed (a change costs its own service, not the zone's size)."""
        generation = self.model.dns_generation
        if generation == self._index.generation:
            return self._index
        changed = self._changes.take()
        if self._index.generation < 0:
            generation, services, slices = self.model.dns_snapshot()
            index = _Index()
            for key, svc in services.items():
                index.put(key, svc, slices.get(key, []))
            self._index = index
        else:
            for key in changed:
                self._index.put(key, *self.model.dns_entry(key))
        self._index.generation = generation
        return self._index

    def address_records(self, keys: set[ServiceKey] | None = None) -> dict[ServiceKey, AddressRecords]:
        """The A/AAAA answers for service names and headless endpoints' names, by service: {service: {(absolute
        lowercase name, type): addresses in answer order}} for these services (all: None; a service gone has
        none). What the eBPF fast path (noded/bpf/dns_fast.py) serves."""
        index = self._current()
        out: dict[ServiceKey, AddressRecords] = {}
        for key in index.services if keys is None else keys:
            records: AddressRecords = {}
            svc = index.services.get(key)
            if svc is not None and svc.type != "ExternalName":
                base = f"{svc.name}.{svc.namespace}.svc.{self.origin}".lower()
                hosts = index.hosts.get(key, [])
                ips = sorted({h.address for h in hosts}) if svc.headless else list(svc.cluster_ips)
                for rdtype in (A, AAAA):
                    same = [ip for ip in ips if _family(ip) == rdtype]
                    if same:
                        records[(base, rdtype)] = same
                for host in hosts:
                    records.setdefault((f"{host.label}.{base}", _family(host.address)), []).append(host.address)
            out[key] = records
        return out

    # -- queries ----------------------------------------------------------------------------
    def owns(self, name: dns.name.Name) -> bool:
        return name.is_subdomain(self.origin)

    def is_reverse(self, name: dns.name.Name) -> bool:
        return any(name.is_subdomain(r) for r in REVERSE)

    def answer(self, query: dns.message.Message) -> Answer | None:
        """The reply for a query this zone answers; None to forward it. The query has one question."""
        q = query.question[0]
        if q.rdclass != dns.rdataclass.IN:
            return None
        if self.is_reverse(q.name):
            return self._reverse(query, q.name, q.rdtype)
        if not self.owns(q.name):
            return None
        reply = self._reply(query)
        chase = self._fill(reply, q.name, q.rdtype, 0)
        return Answer(reply, chase, rotate_addresses(reply.answer, query.id))

    def _reply(self, query: dns.message.Message) -> dns.message.Message:
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.AA
        return reply

    def _fill(self, reply: dns.message.Message, name: dns.name.Name, rdtype: int, depth: int) -> dns.name.Name | None:
        """Put the records for name/rdtype in reply (following in-zone CNAMEs); an external target to chase."""
        index = self._current()
        # latin-1 takes any byte: a label no service has (not UTF-8) is just a name that does not exist
        labels = [label.decode("latin-1").lower() for label in name.relativize(self.origin).labels]
        found = self._lookup(index, labels, rdtype, name, reply)
        if found is None:
            if depth == 0:
                reply.set_rcode(dns.rcode.NXDOMAIN)
                self._soa(reply)
            return None
        rrsets, target = found
        for rrset in rrsets:
            reply.answer.append(rrset)
        if target is not None and rdtype != CNAME:
            if self.owns(target) and depth < MAX_CNAME_CHAIN:
                return self._fill(reply, target, rdtype, depth + 1)
            if not self.owns(target):
                return target
        if depth == 0 and not rrsets:
            self._soa(reply)  # NODATA
        return None

    def _lookup(
        self, index: _Index, labels: list[str], rdtype: int, name: dns.name.Name, reply: dns.message.Message
    ) -> tuple[list[dns.rrset.RRset], dns.name.Name | None] | None:
        """(answer rrsets, CNAME target) for an existing name (empty rrsets: NODATA); None: no such name."""
        if not labels:
            return ([self._soa_rrset()] if rdtype == SOA else []), None
        if labels == ["dns-version"]:
            return ([self._rrset(name, TXT, [f'"{SCHEMA_VERSION}"'])] if rdtype == TXT else []), None
        if labels[-1] == "svc":
            return self._service_names(index, labels[:-1], rdtype, name, reply)
        if labels[-1] == "pod" and len(labels) == 3:
            return self._pod(labels[0], rdtype, name)
        if labels in (["svc"], ["pod"]):
            return [], None
        return None

    def _service_names(self, index, rel, rdtype, name, reply):
        if not rel:
            return [], None
        if len(rel) == 1:
            return ([], None) if rel[0] in index.namespaces else None
        key = (rel[-1], rel[-2])
        svc = index.services.get(key)
        if svc is None:
            return None
        if len(rel) == 2:
            if svc.headless and not index.hosts.get(key):
                return None  # a headless service with no ready endpoint has no records: NXDOMAIN (spec, CoreDNS)
            return self._service(index, svc, rdtype, name)
        if len(rel) == 3:
            if rel[0].startswith("_"):  # _proto.svc.ns: an empty non-terminal when some port has that protocol
                exists = any(f"_{proto.lower()}" == rel[0] for _n, proto, _p in svc.ports)
                return ([], None) if exists else None
            hosts = [h for h in index.hosts.get(key, []) if h.label == rel[0]]
            if not hosts:
                return None
            ips = [h.address for h in hosts if _family(h.address) == rdtype]
            return ([self._rrset(name, rdtype, ips)] if ips else []), None
        if len(rel) == 4 and rel[0].startswith("_") and rel[1].startswith("_"):
            return self._srv(index, svc, rel[0][1:], rel[1][1:].upper(), rdtype, name, reply)
        return None

    def _service(self, index: _Index, svc: DnsService, rdtype: int, name: dns.name.Name):
        if svc.type == "ExternalName":
            target = dns.name.from_text(svc.external_name + ".")
            return [self._rrset(name, CNAME, [target.to_text()])], target
        if rdtype not in (A, AAAA):
            return [], None
        if svc.headless:
            ips = sorted({h.address for h in index.hosts.get((svc.namespace, svc.name), [])})
        else:
            ips = list(svc.cluster_ips)
        ips = [ip for ip in ips if _family(ip) == rdtype]
        return ([self._rrset(name, rdtype, ips)] if ips else []), None

    def _srv(self, index, svc, port_name, proto, rdtype, name, reply):
        """_<port>._<proto>.<svc>.<ns>.svc: the named port; a headless service's endpoints one by one."""
        base = f"{svc.name}.{svc.namespace}.svc.{self.origin}"
        if svc.headless:
            hosts = index.hosts.get((svc.namespace, svc.name), [])
            targets = []
            for h in hosts:
                port = next((p for n, pr, p in h.ports if n == port_name and pr == proto), None)
                if port is not None:
                    targets.append((f"{h.label}.{base}", port, h.address))
        else:
            port = next((p for n, pr, p in svc.ports if n == port_name and pr == proto), None)
            if port is None:
                return None
            targets = [(base, port, ip) for ip in svc.cluster_ips]
        if not targets:
            return None if not svc.headless else ([], None)
        if rdtype != SRV:
            return [], None
        weight = max(1, 100 // len({t for t, _p, _a in targets}))
        srv = sorted({f"0 {weight} {port} {target}" for target, port, _a in targets})
        for target, _port, address in targets:
            rrset = reply.find_rrset(
                reply.additional, dns.name.from_text(target), dns.rdataclass.IN, _family(address), create=True
            )
            rrset.update_ttl(self.ttl)
            rrset.add(dns.rdata.from_text(dns.rdataclass.IN, _family(address), address))
        return [self._rrset(name, SRV, srv)], None

    def _pod(self, dashed: str, rdtype: int, name: dns.name.Name):
        text = dashed.replace("-", ".") if dashed.count("-") == 3 else dashed.replace("-", ":")
        try:
            ip = str(ipaddress.ip_address(text))
        except ValueError:
            return None
        return ([self._rrset(name, rdtype, [ip])] if rdtype == _family(ip) else []), None

    def _reverse(self, query: dns.message.Message, name: dns.name.Name, rdtype: int) -> Answer | None:
        try:
            ip = str(ipaddress.ip_address(dns.reversename.to_address(name)))
        except (dns.exception.SyntaxError, ValueError):
            return None
        names = self._current().names_of(ip)
        if not names:
            return None  # not an address of ours: the upstream's
        reply = self._reply(query)
        if rdtype == PTR:
            reply.answer.append(self._rrset(name, PTR, sorted(f"{n}.{self.origin}" for n in names)))
        else:
            self._soa(reply)
        return Answer(reply)

    # -- records --------------------------------------------------------------------------
    def _rrset(self, name: dns.name.Name, rdtype: int, texts: list[str]) -> dns.rrset.RRset:
        return dns.rrset.from_text_list(name, self.ttl, dns.rdataclass.IN, rdtype, texts)

    def _soa_rrset(self) -> dns.rrset.RRset:
        o = self.origin
        text = f"ns.dns.{o} hostmaster.{o} {self._current().generation % 2**32} 7200 1800 86400 {self.ttl}"
        return dns.rrset.from_text_list(o, self.ttl, dns.rdataclass.IN, SOA, [text])

    def _soa(self, reply: dns.message.Message) -> None:
        reply.authority.append(self._soa_rrset())
