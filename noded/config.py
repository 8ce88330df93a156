"""NodedConfiguration: the config file's schema, defaults and validation (errors name the key)."""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, get_type_hints

import yaml

API_VERSION = "noded.io/v1alpha1"
KIND = "NodedConfiguration"
SERVICE_MODES = ("ebpf", "nftables", "iptables", "none")


class ConfigError(ValueError):
    """A config file problem; the message names the key."""


DURATION = {"duration": True}  # field metadata: a Go duration string ("30s", "1m30s", "500ms") or seconds
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_duration(value: Any, key: str) -> float:
    """Seconds from a duration as KubeProxyConfiguration writes them (`30s`, `1m30s`, `500ms`, `0s`), or
    a plain number of seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration such as 30s, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value and _PART.sub("", value) == "":
        seconds = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(value))
    elif value == "0":
        seconds = 0.0
    else:
        raise ConfigError(f"{key}: expected a duration such as 30s, 1m30s or 500ms, got {value!r}")
    if seconds < 0:
        raise ConfigError(f"{key}: must not be negative")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact Go-style duration for seconds (`noded config`)."""
    if seconds and seconds < 1:
        return f"{round(seconds * 1000, 3):g}ms"
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    text = (f"{int(h)}h" if h else "") + (f"{int(m)}m" if m else "") + (f"{s:g}s" if s or not (h or m) else "")
    return text


def default_node_name() -> str:
    """NODE_NAME (the downward API's spec.nodeName in the DaemonSet), else the hostname lowercased, as the
    kubelet registers it."""
    return os.environ.get("NODE_NAME") or socket.gethostname().lower()


@dataclass
class SourceConfig:
    directory: str | None = None
    kubeconfig: str | None = None
    inCluster: bool = False
    # with inCluster: the API server itself (https://HOST:PORT), never a ClusterIP noded must program first;
    # empty: KUBERNETES_SERVICE_HOST/PORT, set in the DaemonSet to the real address (Cilium's k8sServiceHost)
    apiServer: str = ""

    def validate(self, at: str) -> None:
        chosen = [k for k in ("directory", "kubeconfig") if getattr(self, k)] + (
            ["inCluster"] if self.inCluster else []
        )
        if len(chosen) > 1:
            raise ConfigError(f"{at}: choose one of directory, kubeconfig, inCluster (got {', '.join(chosen)})")
        if self.apiServer:
            if not self.inCluster:
                raise ConfigError(f"{at}.apiServer: only with inCluster (a kubeconfig names its server)")
            if not self.apiServer.startswith("https://") or not self.apiServer[len("https://") :].strip("/"):
                raise ConfigError(f"{at}.apiServer: {self.apiServer!r} is not https://HOST:PORT")


@dataclass
class ServicesConfig:
    mode: str = "ebpf"
    cgroupPath: str = ""  # empty: where cgroup2 is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified in hybrid mode)
    nodePortAddresses: list[str] = field(default_factory=list)
    # kube-proxy's: at most one sync per minSyncPeriod (a burst of changes is one sync), a full one every syncPeriod
    minSyncPeriod: float = field(default=1.0, metadata=DURATION)
    syncPeriod: float = field(default=30.0, metadata=DURATION)
    # eBPF mode: sockets the socket-LB connected to a backend that is no longer an endpoint are destroyed
    # after the sync (bpf_sock_destroy), so connected UDP clients reconnect to a current one; TCP too with
    # terminateTCPConnections (Cilium's "terminate pod connections"), off by default as in Cilium
    socketTermination: bool = True
    terminateTCPConnections: bool = False

    def validate(self, at: str) -> None:
        if self.mode not in SERVICE_MODES:
            raise ConfigError(f"{at}.mode: {self.mode!r} is not one of {', '.join(SERVICE_MODES)}")
        for i, cidr in enumerate(self.nodePortAddresses):
            _cidr(cidr, f"{at}.nodePortAddresses[{i}]")
        if self.minSyncPeriod < 0 or self.syncPeriod <= 0:
            raise ConfigError(f"{at}.syncPeriod/minSyncPeriod: must be positive")


@dataclass
class DnsConfig:
    listen: list[str] = field(default_factory=lambda: ["169.254.20.10:53"])
    upstreams: list[str] = field(default_factory=list)  # empty: the nameservers of resolvConf
    resolvConf: str = "/etc/resolv.conf"  # also gives the node's search domains (the search-path shortcut)
    ttl: int = 5  # of cluster-zone records, as CoreDNS's kubernetes plugin
    cacheCapacity: int = 9984  # entries, each of success and denial (NodeLocal DNSCache's numbers)
    cacheMaxTTL: int = 30  # seconds a forwarded answer or denial is kept at most
    servfailTTL: int = 5
    maxConcurrent: int = 1000  # upstream queries in flight; beyond, REFUSED (CoreDNS forward's max_concurrent)
    fastPath: bool = True  # the eBPF answerer on the pods' bridge: A/AAAA of cluster names and cached external ones
    # the addresses the kubelet hands pods as their nameserver (its clusterDNS); empty: the ClusterIPs of
    # kube-system/kube-dns when that Service exists. The in-pod DNS capture takes queries to these (and
    # only these) to noded; a query to any other address goes where the pod sent it.
    clusterDNS: list[str] = field(default_factory=list)
    # answer those addresses on the node too (port 53: listeners, NOTRACK, the fast path), for every pod in
    # every services mode, captured or not; no proxier translates them (NodeLocal DNSCache's takeover)
    serveClusterDNS: bool = True

    def validate(self, at: str) -> None:
        for i, address in enumerate(self.clusterDNS):
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ConfigError(f"{at}.clusterDNS[{i}]: {address!r} is not an IP address") from None
        for key in ("ttl", "cacheCapacity", "cacheMaxTTL", "servfailTTL", "maxConcurrent"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{at}.{key}: must not be negative")
        for i, hostport in enumerate(self.listen):
            _hostport(hostport, f"{at}.listen[{i}]")
        for i, hostport in enumerate(self.upstreams):
            _hostport(hostport, f"{at}.upstreams[{i}]", default_port=53)


@dataclass
class CaptureConfig:
    enabled: bool = True
    dnsForAllPods: bool = True  # pods outside the mesh still get their DNS intercepted


@dataclass
class TunnelConfig:
    trustDomain: str = "cluster.local"
    rootCert: str = "/etc/noded/ca/root.pem"  # the cluster's trust root
    caKey: str = ""  # the root's key, on the node that issues workload certificates
    caListen: str = ""  # with caKey: serve other nodes' certificate requests here (host:port)
    caAddress: str = ""  # without caKey: the CA service to ask (host:port)
    nodeCert: str = ""  # this node's certificate and key, presented to the CA service
    nodeKey: str = ""
    certTTL: float = field(default=86400.0, metadata=DURATION)  # a workload certificate's life (renewed at half)
    caRevoked: str = ""  # with caListen: a file of revoked node certificates (hex serials or node names)

    def validate(self, at: str) -> None:
        if self.certTTL < 120:
            raise ConfigError(f"{at}.certTTL: at least 120 seconds")
        if not self.trustDomain or "/" in self.trustDomain:
            raise ConfigError(f"{at}.trustDomain: {self.trustDomain!r} is not a trust domain")
        for key in ("caListen", "caAddress"):
            if getattr(self, key):
                _hostport(getattr(self, key), f"{at}.{key}")
        if self.caAddress and not (self.nodeCert and self.nodeKey):
            raise ConfigError(f"{at}.nodeCert/nodeKey: required with caAddress")


@dataclass
class ApiConfig:
    socket: str = "/run/noded/noded.sock"


@dataclass
class NodedConfiguration:
    apiVersion: str = API_VERSION
    kind: str = KIND
    nodeName: str = field(default_factory=default_node_name)
    source: SourceConfig = field(default_factory=lambda: SourceConfig(directory="/etc/noded/manifests"))
    clusterDomain: str = "cluster.local"
    clusterCIDRs: list[str] = field(default_factory=lambda: ["10.244.0.0/16"])
    services: ServicesConfig = field(default_factory=ServicesConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    tunnel: TunnelConfig = field(default_factory=TunnelConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    metricsBindAddress: str = "127.0.0.1:10249"
    healthzBindAddress: str = "0.0.0.0:10256"
    bpffsPath: str = ""

    def validate(self, at: str = "") -> None:
        if self.apiVersion != API_VERSION:
            raise ConfigError(f"apiVersion: expected {API_VERSION!r}, got {self.apiVersion!r}")
        if self.kind != KIND:
            raise ConfigError(f"kind: expected {KIND!r}, got {self.kind!r}")
        if not self.nodeName:
            raise ConfigError("nodeName: must not be empty")
        for i, cidr in enumerate(self.clusterCIDRs):
            _cidr(cidr, f"clusterCIDRs[{i}]")
        _hostport(self.metricsBindAddress, "metricsBindAddress")
        _hostport(self.healthzBindAddress, "healthzBindAddress")
        if not self.bpffsPath:
            self.bpffsPath = f"/sys/fs/bpf/noded/{self.nodeName}"
        if not self.bpffsPath.startswith("/"):
            raise ConfigError(f"bpffsPath: must be an absolute path, got {self.bpffsPath!r}")
        if not self.services.cgroupPath:
            self.services.cgroupPath = cgroup2_mount()
        if not self.source.directory and not self.source.kubeconfig and not self.source.inCluster:
            raise ConfigError("source: one of directory, kubeconfig, inCluster is required")


def _cidr(value: str, key: str) -> None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError as e:
        raise ConfigError(f"{key}: {value!r} is not a CIDR ({e})") from None


def _hostport(value: str, key: str, default_port: int | None = None) -> tuple[str, int]:
    host, sep, port = str(value).rpartition(":")
    if not sep:
        host, port = str(value), str(default_port) if default_port else ""
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        port_num = int(port)
        if not 0 <= port_num <= 65535:
            raise ValueError("port out of range")
    except ValueError:
        raise ConfigError(f"{key}: {value!r} is not an IP:port") from None
    return host, port_num


def split_hostport(value: str, default_port: int | None = None) -> tuple[str, int]:
    return _hostport(value, "address", default_port)


def _build(cls: type, data: Any, at: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{at or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            where = f"{at}.{key}" if at else str(key)
            close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
            if not close:  # a case slip (syncperiod, NodeName) is the usual one
                close = [k for k in sorted(known) if k.lower() == str(key).lower()]
            raise ConfigError(f"{where}: unknown key" + (f"; did you mean {close[0]!r}?" if close else ""))
    obj = cls()
    for f in fields(cls):
        if f.name not in data:
            continue
        key = f"{at}.{f.name}" if at else f.name
        if f.metadata.get("duration"):
            setattr(obj, f.name, parse_duration(data[f.name], key))
        else:
            setattr(obj, f.name, _coerce(hints[f.name], data[f.name], key))
    if hasattr(obj, "validate") and at:
        obj.validate(at)
    return obj


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if is_dataclass(hint):
        return _build(hint, value, key)
    text = str(hint)
    if text.startswith("list"):
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        if not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings")
        return value
    if hint is bool or text == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int or text == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float or text == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if value is None and "None" in text:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def parse(data: Any) -> NodedConfiguration:
    config = _build(NodedConfiguration, data if data is not None else {}, "")
    config.validate()
    return config


def _read(path: str) -> Any:
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None


def load(path: str) -> NodedConfiguration:
    """A config file: apiVersion and kind required (component config's rule), then parse()."""
    data = _read(path)
    for key, expected in (("apiVersion", API_VERSION), ("kind", KIND)):
        if not isinstance(data, dict) or key not in data:
            raise ConfigError(f"{path}: {key}: required ({key}: {expected})")
    try:
        return parse(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def to_dict(config: Any) -> dict:
    """The configuration as a file would hold it: durations written as durations (`noded config`)."""
    out: dict = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            value = to_dict(value)
        elif f.metadata.get("duration"):
            value = format_duration(value)
        out[f.name] = value
    return out


def load_source(path: str) -> SourceConfig:
    """Only the `source` section (validated), for a helper that needs nothing else of the node (the
    DaemonSet's cni-chain container, which mounts no cgroup or BPF file system)."""
    data = _read(path)
    section = data.get("source") if isinstance(data, dict) else None
    try:
        source = _build(SourceConfig, section if section is not None else {}, "source")
        source.validate("source")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return source


def cgroup2_mount(mounts: str = "/proc/self/mounts") -> str:
    """The cgroup v2 hierarchy's mount point: the services hooks attach to the node's cgroup root there."""
    try:
        with open(mounts) as f:
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[2] == "cgroup2":
                    return fields[1]
    except OSError:
        pass
    raise ConfigError("services.cgroupPath: not set and no cgroup2 file system is mounted")
