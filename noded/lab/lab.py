"""The multi-node lab: nodes, pods and an external host as network namespaces on one machine.

Everything it makes is named noded-* and recorded in its state file, and
`down` removes all of it. It never touches the root namespace's links, rules
or routes, and attaches nothing outside its own cgroup subtree.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import yaml

from noded.bpf.sock_lb import remove as cleanup_bpf
from noded.cni.install import install_plugin
from noded.files import write_atomic
from noded.lab import cni, controller, netns
from noded.sources.directory import parse_manifests
from noded.tunnel.ca import CertificateAuthority, write_root
from noded.tunnel.caservice import node_credentials

STATE_DIR = os.environ.get("NODED_LAB_DIR", "/run/noded-lab")
CGROUP = f"{netns.CGROUP_ROOT}/noded-lab"
FABRIC_NS = "noded-fabric"
FABRIC_BRIDGE = "fabric0"
CA_PORT = 15012  # the CA service, as istiod's
EXTERNAL_NS = "noded-external"
FABRIC_PREFIX = "10.77.0"
EXTERNAL_ADDRESS = f"{FABRIC_PREFIX}.2"
FABRIC_PREFIX6 = "fd77::"
EXTERNAL_ADDRESS6 = f"{FABRIC_PREFIX6}2"
CLUSTER_CIDR = "10.244.0.0/16"
CLUSTER_CIDR6 = "fd44::/48"
CNI_PLUGINS = "/usr/lib/cni"  # Debian containernetworking-plugins


class LabError(RuntimeError):
    pass


class Lab:
    def __init__(self, state_dir: str = STATE_DIR) -> None:
        self.dir = state_dir
        self.manifests = f"{state_dir}/manifests"
        self.state_path = f"{state_dir}/state.json"

    # -- state ------------------------------------------------------------------------
    @property
    def is_up(self) -> bool:
        return os.path.exists(self.state_path)

    def state(self) -> dict[str, Any]:
        if not self.is_up:
            raise LabError("no lab is up: run `noded lab up`")
        with open(self.state_path) as f:
            return json.load(f)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The state, locked against other lab commands, saved on success."""
        os.makedirs(self.dir, exist_ok=True)
        with open(f"{self.dir}/lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self.state()
            yield state
            write_atomic(self.state_path, json.dumps(state, indent=1))

    @property
    def bin_dir(self) -> str:
        return f"{self.dir}/bin"

    @property
    def cni_path(self) -> list[str]:
        """Where the runtime finds the chain's plugins: Debian's, then noded-cni as `noded cni install` puts it."""
        return [CNI_PLUGINS, self.bin_dir]

    def node_dir(self, node: str) -> str:
        return f"{self.dir}/{node}"

    # -- up / down ----------------------------------------------------------------------
    def up(self, nodes: int = 2, mode: str = "ebpf") -> dict[str, Any]:
        if self.is_up:
            raise LabError(f"a lab is already up ({self.state_path}); run `noded lab down` first")
        if netns.list_ours():
            raise LabError(f"leftover noded namespaces {netns.list_ours()}; run `noded lab down` first")
        os.makedirs(self.manifests, exist_ok=True)
        install_plugin(self.bin_dir)
        state: dict[str, Any] = {"mode": mode, "nodes": {}, "pods": {}, "clusterIPs": {}, "applied": []}
        write_atomic(self.state_path, json.dumps(state))
        try:
            netns.create(FABRIC_NS)
            netns.add_bridge(FABRIC_NS, FABRIC_BRIDGE)
            netns.create(EXTERNAL_NS)
            netns.connect_to_bridge(FABRIC_NS, FABRIC_BRIDGE, "external", EXTERNAL_NS, "eth0")
            netns.set_address(EXTERNAL_NS, "eth0", EXTERNAL_ADDRESS, 24)
            netns.set_address(EXTERNAL_NS, "eth0", EXTERNAL_ADDRESS6, 64)
            netns.cgroup_create(CGROUP)
            names = [f"node{i}" for i in range(1, nodes + 1)]
            for i, name in enumerate(names, start=1):
                state["nodes"][name] = self._make_node(name, i, mode)
            for name, node in state["nodes"].items():
                for other, peer in state["nodes"].items():
                    if other != name:
                        netns.add_route(node["netns"], peer["podCIDR"], peer["address"])
                        netns.add_route(node["netns"], peer["podCIDR6"], peer["address6"])
            # the external host plays the nodes' upstream router (their default route, as real nodes have;
            # iptables mode rejects in FORWARD, which needs a route) and sends load-balancer IPs to node1
            for node in state["nodes"].values():
                netns.add_route(node["netns"], "0.0.0.0/0", EXTERNAL_ADDRESS)
                netns.add_route(node["netns"], "::/0", EXTERNAL_ADDRESS6)
            first = state["nodes"][names[0]]
            netns.add_route(EXTERNAL_NS, controller.LB_CIDR, first["address"])
            netns.add_route(EXTERNAL_NS, controller.LB_CIDR6, first["address6"])
            write_atomic(self.state_path, json.dumps(state, indent=1))
            self._reconcile(state)
            for name in names:
                self.start_daemon(name)
            for name in names:
                self.wait_ready(name)
        except Exception:
            self.down()
            raise
        return state

    def _make_node(self, name: str, index: int, mode: str) -> dict[str, Any]:
        ns = f"noded-{name}"
        address = f"{FABRIC_PREFIX}.{10 + index}"
        node = {
            "name": name,
            "netns": ns,
            "address": address,
            "address6": f"{FABRIC_PREFIX6}{10 + index:x}",
            "podCIDR": f"10.244.{index}.0/24",
            "podCIDR6": f"fd44:0:0:{index:x}::/64",
            "zone": f"zone-{'abcdefgh'[(index - 1) % 8]}",
            "cgroup": f"{CGROUP}/{name}",
            "bpffsPath": f"/sys/fs/bpf/noded/{name}",
            "config": f"{self.node_dir(name)}/config.yaml",
        }
        netns.create(ns)
        netns.connect_to_bridge(FABRIC_NS, FABRIC_BRIDGE, f"v-{name}"[:15], ns, "eth0")
        netns.set_address(ns, "eth0", address, 24)
        netns.set_address(ns, "eth0", node["address6"], 64)
        # no per-peer ICMP budget (6, then 1/s): it would make rejects by netfilter look like drops to a
        # test's external host, which sends many in a row
        netns.sysctl(
            ns,
            {
                "net.ipv4.ip_forward": "1",
                "net.ipv6.conf.all.forwarding": "1",
                "net.ipv4.icmp_ratelimit": "0",
                "net.ipv6.icmp.ratelimit": "0",
            },
        )
        for sub in ("", "/system", "/pods"):
            netns.cgroup_create(node["cgroup"] + sub)
        os.makedirs(f"{self.node_dir(name)}/ipam", exist_ok=True)
        tunnel = self._tunnel_config(name, index, address)
        config = {
            "apiVersion": "noded.io/v1alpha1",
            "kind": "NodedConfiguration",
            "nodeName": name,
            "source": {"directory": self.manifests},
            "clusterCIDRs": [CLUSTER_CIDR, CLUSTER_CIDR6],
            # a lab follows each change at once (kube-proxy's 1s default would merge the tests' quick edits)
            "services": {"mode": mode, "cgroupPath": node["cgroup"], "minSyncPeriod": "100ms"},
            "dns": {"clusterDNS": list(controller.CLUSTER_DNS)},
            "api": {"socket": self.api_socket(name)},
            "bpffsPath": node["bpffsPath"],
            "tunnel": tunnel,
        }
        write_atomic(node["config"], yaml.safe_dump(config))
        return node

    def _tunnel_config(self, name: str, index: int, address: str) -> dict[str, str]:
        """The lab's own root; node1 holds its key and serves the CA, the others ask it with a node
        certificate made here."""
        ca_dir = os.path.join(self.dir, "ca")
        root_cert, root_key = write_root(ca_dir, "cluster.local")
        if index == 1:
            return {"rootCert": root_cert, "caKey": root_key, "caListen": f"{address}:{CA_PORT}"}
        ca = CertificateAuthority.load(root_cert, root_key)
        node_cert, node_key = node_credentials(ca, name, os.path.join(ca_dir, "nodes"))
        ca_address = f"{FABRIC_PREFIX}.11:{CA_PORT}"
        return {"rootCert": root_cert, "caAddress": ca_address, "nodeCert": node_cert, "nodeKey": node_key}

    def api_socket(self, node_name: str) -> str:
        return f"{self.node_dir(node_name)}/noded.sock"

    def conflist(self, node: dict[str, Any]) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": "noded-lab",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": node["podCIDR"]}], [{"subnet": node["podCIDR6"]}]],
                        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
                        "dataDir": f"{self.node_dir(node['name'])}/ipam",
                    },
                },
                {"type": "noded-cni", "socket": self.api_socket(node["name"])},
            ],
        }

    def down(self) -> list[str]:
        """Remove everything the lab made; safe to run on a half-made or absent lab."""
        done: list[str] = []
        state: dict[str, Any] = {}
        if self.is_up:
            with contextlib.suppress(Exception):
                state = self.state()
        for name, node in state.get("nodes", {}).items():
            self.stop_daemon(name)
            if netns.exists(node["netns"]):  # `noded cleanup` where the daemon ran: pins and nft table
                res = netns.nsenter(
                    node["netns"],
                    [sys.executable, "-m", "noded", "cleanup", "-c", node["config"]],
                    capture_output=True,
                    text=True,
                )
                done += [f"{name}: {line.removeprefix('removed ')}" for line in res.stdout.splitlines()]
            else:  # its netns is gone already; the pins are not tied to it
                done += [f"{name}: {path}" for path in cleanup_bpf(node["bpffsPath"])]
        for key, pod in state.get("pods", {}).items():
            with contextlib.suppress(Exception):
                self._cni_del(state, pod)
            netns.remove(pod["netns"])
            done.append(f"pod {key}")
        for ns in netns.list_ours():
            netns.remove(ns)
            done.append(f"netns {ns}")
        netns.cgroup_remove_tree(CGROUP)
        if os.path.isdir("/sys/fs/bpf/noded") and not os.listdir("/sys/fs/bpf/noded"):
            os.rmdir("/sys/fs/bpf/noded")
        shutil.rmtree(self.dir, ignore_errors=True)
        return done

    # -- daemons ------------------------------------------------------------------------
    def start_daemon(self, name: str) -> int:
        node = self.state()["nodes"][name]
        with open(f"{self.node_dir(name)}/noded.log", "ab") as log:
            argv = netns.nsenter_argv(node["netns"], [sys.executable, "-m", "noded", "run", "--config", node["config"]])
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=lambda: netns.cgroup_join(node["cgroup"] + "/system"),
            )
        with open(f"{self.node_dir(name)}/noded.pid", "w") as f:
            f.write(str(proc.pid))
        return proc.pid

    def daemon_pid(self, name: str) -> int | None:
        try:
            with open(f"{self.node_dir(name)}/noded.pid") as f:
                pid = int(f.read())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def stop_daemon(self, name: str, sig: int = signal.SIGTERM) -> None:
        pid = self.daemon_pid(name)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        for _ in range(100):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if self.daemon_pid(name) is None:
                break
            time.sleep(0.05)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self.node_dir(name)}/noded.pid")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self.node_dir(name)}/status.json")

    def restart_daemon(self, name: str, kill: bool = False) -> int:
        self.stop_daemon(name, signal.SIGKILL if kill else signal.SIGTERM)
        pid = self.start_daemon(name)
        self.wait_ready(name)
        return pid

    def wait_ready(self, name: str, timeout: float = 30.0) -> None:
        path = f"{self.node_dir(name)}/status.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.daemon_pid(name) is None:
                raise LabError(
                    f"noded on {name} exited; see {self.node_dir(name)}/noded.log:\n{self.daemon_log(name)[-3000:]}"
                )
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError), open(path) as f:
                if json.load(f).get("syncs", 0) >= 1:
                    return
            time.sleep(0.05)
        raise LabError(f"noded on {name} did not sync within {timeout}s; see {self.node_dir(name)}/noded.log")

    def daemon_log(self, name: str) -> str:
        try:
            with open(f"{self.node_dir(name)}/noded.log", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    # -- pods ---------------------------------------------------------------------------
    def add_pod(
        self, key: str, node_name: str, labels: dict[str, str] | None = None, service_account: str = "default"
    ) -> dict[str, Any]:
        namespace, _, name = key.partition("/")
        if not name:
            namespace, name = "default", namespace
        key = f"{namespace}/{name}"
        with self._locked() as state:
            if node_name not in state["nodes"]:
                raise LabError(f"no node {node_name!r}; nodes: {', '.join(state['nodes'])}")
            if key in state["pods"]:
                raise LabError(f"pod {key} exists")
            node = state["nodes"][node_name]
            pod = {
                "namespace": namespace,
                "name": name,
                "node": node_name,
                "labels": labels or {},
                "serviceAccount": service_account,
                "netns": f"noded-pod-{namespace}-{name}"[:200],
                "containerId": f"noded-lab-{namespace}-{name}",
                "cgroup": f"{node['cgroup']}/pods/{namespace}_{name}",
                "ready": True,
            }
            netns.create(pod["netns"])
            netns.cgroup_create(pod["cgroup"])
            # as in a cluster, the Pod object exists (scheduled, labelled) before the runtime sets it up
            state["pods"][key] = {**pod, "ips": []}
            self._reconcile(state)
            try:
                result = cni.add(self.conflist(node), self._invocation(pod), self.cni_path, node["netns"])
            except Exception:
                del state["pods"][key]
                self._reconcile(state)
                netns.remove(pod["netns"])
                raise
            pod["ips"] = cni.result_ips(result)
            pod["cniResult"] = result
            state["pods"][key] = pod
            self._reconcile(state)
        return pod

    def set_pod(self, key: str, **fields: Any) -> None:
        """Change a pod's readiness (ready=..., terminating=...) and re-run the controllers."""
        with self._locked() as state:
            state["pods"][key].update(fields)
            self._reconcile(state)

    def delete_pod(self, key: str) -> None:
        with self._locked() as state:
            pod = state["pods"].pop(key)
            self._cni_del(state, pod)
            netns.remove(pod["netns"])
            netns.cgroup_remove_tree(pod["cgroup"])
            self._reconcile(state)

    def _invocation(self, pod: dict[str, Any]) -> cni.Invocation:
        return cni.Invocation(
            container_id=pod["containerId"],
            netns_path=f"/run/netns/{pod['netns']}",
            args=f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod['namespace']};K8S_POD_NAME={pod['name']}",
        )

    def _cni_del(self, state: dict[str, Any], pod: dict[str, Any]) -> None:
        node = state["nodes"][pod["node"]]
        cni.delete(self.conflist(node), self._invocation(pod), self.cni_path, node["netns"], pod.get("cniResult"))

    # -- manifests and controllers ------------------------------------------------------
    def apply(self, path: str) -> list[str]:
        """Copy a manifest file into the shared directory, allocating ClusterIPs; returns what it holds."""
        with open(path) as f:
            text = f.read()
        target = f"{self.manifests}/applied-{os.path.basename(path)}"
        with self._locked() as state:
            try:
                docs = parse_manifests(text, path)
            except yaml.YAMLError:
                write_atomic(target, text)  # the daemon reports it; the lab is no API server
                return [f"{path}: not valid YAML, copied as is"]
            docs = controller.allocate_service_fields(docs, state)
            write_atomic(target, yaml.safe_dump_all(docs, sort_keys=False))
            if target not in state["applied"]:
                state["applied"].append(target)
            self._reconcile(state)
        return [f"{d.get('kind')} {(d.get('metadata') or {}).get('name')}" for d in docs if isinstance(d, dict)]

    def delete(self, path: str) -> None:
        target = f"{self.manifests}/applied-{os.path.basename(path)}"
        with self._locked() as state:
            if os.path.exists(target):
                os.unlink(target)
            if target in state["applied"]:
                state["applied"].remove(target)
            self._reconcile(state)

    def _services(self) -> list[dict]:
        services = []
        for name in sorted(os.listdir(self.manifests)):
            if not name.startswith("applied-"):
                continue
            with contextlib.suppress(OSError, yaml.YAMLError), open(f"{self.manifests}/{name}") as f:
                services += [
                    d for d in parse_manifests(f.read(), name) if isinstance(d, dict) and d.get("kind") == "Service"
                ]
        return services

    def _reconcile(self, state: dict[str, Any]) -> None:
        pods = list(state["pods"].values())
        zones = {name: node["zone"] for name, node in state["nodes"].items()}
        slices = controller.endpoint_slices(self._services(), pods, zones)
        self._write_if_changed(f"{self.manifests}/zz-lab-endpointslices.yaml", slices)
        nodes = [controller.node_object(n) for n in state["nodes"].values()]
        self._write_if_changed(f"{self.manifests}/zz-lab-nodes.yaml", nodes)
        self._write_if_changed(f"{self.manifests}/zz-lab-pods.yaml", [controller.pod_object(p) for p in pods])

    def _write_if_changed(self, path: str, docs: list[dict]) -> None:
        text = yaml.safe_dump_all(docs, sort_keys=False) if docs else ""
        with contextlib.suppress(FileNotFoundError), open(path) as f:
            if f.read() == text:
                return
        write_atomic(path, text)

    # -- exec -----------------------------------------------------------------------------
    def target(self, name: str) -> tuple[str, str | None]:
        """(netns, cgroup) of `NAMESPACE/NAME`, `node/NODE` or `external`."""
        if name == "external":
            return EXTERNAL_NS, None
        state = self.state()
        if name.startswith("node/"):
            node = state["nodes"].get(name[5:])
            if node is None:
                raise LabError(f"no node {name[5:]!r}")
            return node["netns"], node["cgroup"] + "/system"
        key = name if "/" in name else f"default/{name}"
        pod = state["pods"].get(key)
        if pod is None:
            raise LabError(f"no pod {key!r}")
        return pod["netns"], pod["cgroup"]

    def popen(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        ns, cgroup = self.target(name)
        join = (lambda: netns.cgroup_join(cgroup)) if cgroup else None
        return subprocess.Popen(netns.nsenter_argv(ns, argv), preexec_fn=join, **kwargs)

    def run(self, name: str, argv: list[str], timeout: float = 60, **kwargs: Any) -> subprocess.CompletedProcess:
        proc = self.popen(name, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def exec(self, name: str, argv: list[str]) -> None:
        """Replace this process with argv inside the target (the CLI's `lab exec`)."""
        ns, cgroup = self.target(name)
        if cgroup:
            netns.cgroup_join(cgroup)
        full = netns.nsenter_argv(ns, argv)
        os.execvp(full[0], full)

    def status(self) -> dict[str, Any]:
        state = self.state()
        return {
            "mode": state["mode"],
            "external": {"address": EXTERNAL_ADDRESS, "netns": EXTERNAL_NS},
            "nodes": [
                {
                    "name": n["name"],
                    "address": n["address"],
                    "address6": n.get("address6"),
                    "podCIDR": n["podCIDR"],
                    "podCIDR6": n.get("podCIDR6"),
                    "zone": n.get("zone"),
                    "netns": n["netns"],
                    "daemonPid": self.daemon_pid(n["name"]),
                }
                for n in state["nodes"].values()
            ],
            "pods": [
                {
                    "namespace": p["namespace"],
                    "name": p["name"],
                    "node": p["node"],
                    "ips": p["ips"],
                    "labels": p["labels"],
                    "ready": p.get("ready", True),
                    "terminating": p.get("terminating", False),
                }
                for p in state["pods"].values()
            ],
            "services": [
                {
                    "namespace": k.split("/")[0],
                    "name": k.split("/")[1],
                    "clusterIPs": [ip],
                    "nodePorts": {
                        p.split("/", 2)[2]: n for p, n in state.get("nodePorts", {}).items() if p.startswith(k + "/")
                    },
                    "loadBalancerIPs": [state["lbIPs"][k]] if k in state.get("lbIPs", {}) else [],
                }
                for k, ip in state["clusterIPs"].items()
            ],
        }
