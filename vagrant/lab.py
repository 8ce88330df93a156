#!/usr/bin/env python3
"""The Vagrant lab's driver (run as root from the checkout; standard library only).

    lab.py up       libvirt in the lab's own network namespace, the box (built if missing), noded's wheels,
                    `vagrant up` of NODED_NODES nodes (2)
    lab.py check    the end-to-end check: a container on node1 reaches, by DNS name, a service whose backend
                    is a container on the last node
    lab.py deadlock after check: node1's noded restarted with its API server unreachable; a unit ordered
                    after it (as containerd and kubelet are) starts within seconds, programmed pods keep working
    lab.py daemonset  deploy/daemonset.yaml run by containerd instead of the unit, check, a pod replacement,
                    then the DaemonSet deleted (CNI configuration and kernel as before)
    lab.py down     destroys the VMs and stops what `up` started
    lab.py vagrant ARGS...  / lab.py ssh NODE [CMD]   vagrant or ssh inside the lab's namespace

libvirt's networks (bridges, dnsmasq, NAT rules) live in the network namespace `vagrant-noded`, where this
script starts libvirtd when no libvirtd runs: the host's own networking is never touched. Where a libvirtd
already runs (a workstation's, under systemd) it is used as it is.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE = os.environ.get("NODED_VAGRANT_CACHE", os.path.join(HERE, ".cache"))
BOX_FILE = os.path.join(CACHE, "noded-debian12.box")
BOX_NAME = os.environ.get("NODED_BOX", "noded/debian12")
WHEELS = os.path.join(CACHE, "wheels")
NETNS = "vagrant-noded"  # not noded-*: the netns lab removes those as its own
RUN_DIR = "/run/noded-vagrant"
NODES = int(os.environ.get("NODED_NODES", "2"))
SOURCE = os.environ.get("NODED_SOURCE", "manifests")
K3S_VERSION = os.environ.get("NODED_K3S_VERSION", "v1.31.4+k3s1")
K3S_URL = f"https://github.com/k3s-io/k3s/releases/download/{K3S_VERSION.replace('+', '%2B')}/k3s"
QEMU_CONF = "/etc/libvirt/qemu.conf"
QEMU_CONF_LINES = ['user = "root"', 'group = "root"']  # else each VM definition stalls ~50 s here
SERVICE_IP = "10.96.0.20"
MESH_SERVICE_IP = "10.96.0.21"
AMBIENT = "istio.io/dataplane-mode=ambient"
MANIFEST = "/etc/noded/manifests/lab.yaml"
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def in_netns(argv: list[str]) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{NETNS}", "--", *argv]


def sh(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("check", True)
    return subprocess.run(argv, **kwargs)


def vagrant_env() -> dict[str, str]:
    return {**os.environ, "VAGRANT_DEFAULT_PROVIDER": "libvirt", "NODED_NODES": str(NODES), "NODED_SOURCE": SOURCE}


def vagrant(*args: str, capture: bool = False, check: bool = True) -> subprocess.CompletedProcess:
    return sh(in_netns(["vagrant", *args]), cwd=HERE, env=vagrant_env(), check=check, text=True, capture_output=capture)


# -- libvirt -------------------------------------------------------------------------------------------
def libvirt_running() -> bool:
    return subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True).returncode == 0


def ensure_netns() -> None:
    if not os.path.exists(f"/run/netns/{NETNS}"):
        sh(["ip", "netns", "add", NETNS])
        sh(["ip", "-n", NETNS, "link", "set", "lo", "up"])


def prepare_libvirt() -> None:
    ensure_netns()
    if libvirt_running():
        say("libvirtd is running: using it")
    else:
        with open(QEMU_CONF) as f:
            conf = f.read()
        missing = [line for line in QEMU_CONF_LINES if line not in conf.splitlines()]
        if missing:
            with open(QEMU_CONF, "a") as f:
                f.write("\n# noded vagrant lab\n" + "\n".join(missing) + "\n")
        os.makedirs(RUN_DIR, exist_ok=True)
        for daemon in ("virtlogd", "libvirtd"):
            sh(in_netns([daemon, "-d"]))
            with open(f"{RUN_DIR}/{daemon}.ours", "w") as f:
                f.write("started by vagrant/lab.py\n")
        for _ in range(100):
            if libvirt_running():
                break
            time.sleep(0.1)
        say(f"libvirtd started in network namespace {NETNS}")
    pools = sh(["virsh", "-c", "qemu:///system", "pool-list", "--all", "--name"], capture_output=True, text=True)
    if "default" not in pools.stdout.split():
        os.makedirs("/var/lib/libvirt/images", exist_ok=True)
        virsh = ["virsh", "-q", "-c", "qemu:///system"]
        sh([*virsh, "pool-define-as", "default", "dir", "--target", "/var/lib/libvirt/images"], capture_output=True)
        sh([*virsh, "pool-start", "default"], capture_output=True)
        sh([*virsh, "pool-autostart", "default"], capture_output=True)


def stop_libvirt() -> None:
    for daemon in ("libvirtd", "virtlogd"):
        if os.path.exists(f"{RUN_DIR}/{daemon}.ours"):
            subprocess.run(["pkill", "-x", daemon])
            os.unlink(f"{RUN_DIR}/{daemon}.ours")
    if os.path.exists(f"/run/netns/{NETNS}"):
        subprocess.run(["ip", "netns", "pids", NETNS], capture_output=True)
        sh(["ip", "netns", "del", NETNS], check=False)


# -- box and wheels ------------------------------------------------------------------------------------------
def ensure_box() -> None:
    if not os.path.exists(BOX_FILE):
        say("no box yet: building it (vagrant/build-box.sh)")
        sh(["bash", os.path.join(HERE, "build-box.sh")])
    marker = os.path.join(CACHE, ".box-added")
    listed = vagrant("box", "list", capture=True).stdout
    if BOX_NAME in listed and os.path.exists(marker) and os.path.getmtime(marker) >= os.path.getmtime(BOX_FILE):
        return
    say(f"adding box {BOX_NAME}")
    vagrant("box", "add", "--force", "--name", BOX_NAME, BOX_FILE, capture=True)
    with open(marker, "w") as f:
        f.write(BOX_FILE + "\n")


def build_wheels() -> None:
    """noded's wheel (with its BPF objects) and its dependencies' wheels, for the VMs' offline install."""
    if not os.path.exists(os.path.join(ROOT, "noded/bpf/obj/sock_lb.o")):
        sys.exit("lab.py: the BPF objects are not built (make bpf)")
    os.makedirs(WHEELS, exist_ok=True)
    for name in os.listdir(WHEELS):
        if name.startswith("noded-"):
            os.unlink(os.path.join(WHEELS, name))
    pip = os.path.join(ROOT, ".venv/bin/pip")
    pip = pip if os.path.exists(pip) else shutil.which("pip3") or "pip3"
    shutil.rmtree(os.path.join(ROOT, "build"), ignore_errors=True)
    sh([pip, "wheel", "-q", "--wheel-dir", WHEELS, ROOT], cwd=ROOT)
    say(f"wheels: {len(os.listdir(WHEELS))} in {WHEELS}")


def provision_all() -> None:
    """`vagrant provision` of every node at once (vagrant locks per machine): under software emulation
    installing noded takes minutes per node. The k3s server (node1) goes first: agents join it."""
    names = [f"node{i}" for i in range(1, NODES + 1)]
    waves = [names[:1], names[1:]] if SOURCE == "k3s" else [names]
    for wave in waves:
        procs = {
            name: subprocess.Popen(
                in_netns(["vagrant", "provision", name]), cwd=HERE, env=vagrant_env(), stdout=subprocess.PIPE, text=True
            )
            for name in wave
        }
        failed = []
        for name, proc in procs.items():
            out, _ = proc.communicate()
            print(out, end="", flush=True)
            if proc.returncode != 0:
                failed.append(name)
        if failed:
            sys.exit(f"lab.py: provisioning failed on {', '.join(failed)}")


def make_ca() -> None:
    """The lab's trust root and node credentials, made on the host with noded's own CA code: node1 holds the
    key and serves the CA on the fabric, the other nodes ask it with their node certificate. Synced to the VMs
    under vagrant/.cache/ca (a lab's root: its key is readable by every lab VM)."""
    ca_dir = os.path.join(CACHE, "ca")
    python = os.path.join(ROOT, ".venv/bin/python")
    code = (
        "import sys\n"
        "from noded.tunnel.ca import CertificateAuthority, write_root\n"
        "from noded.tunnel.caservice import node_credentials\n"
        "cert, key = write_root(sys.argv[1], 'cluster.local')\n"
        "ca = CertificateAuthority.load(cert, key)\n"
        "for i in range(2, int(sys.argv[2]) + 1):\n"
        "    node_credentials(ca, f'node{i}', sys.argv[1] + '/nodes')\n"
    )
    sh([python if os.path.exists(python) else sys.executable, "-c", code, ca_dir, str(NODES)], cwd=ROOT)


def fetch_k3s() -> None:
    path = os.path.join(CACHE, "k3s")
    if os.path.exists(path):
        return
    say(f"downloading k3s {K3S_VERSION}")
    got = subprocess.run(["curl", "-fsSL", "--max-time", "300", "-o", path + ".tmp", K3S_URL])
    if got.returncode != 0:
        sys.exit(f"lab.py: k3s could not be downloaded from {K3S_URL}; use NODED_SOURCE=manifests (offline)")
    os.chmod(path + ".tmp", 0o755)
    os.rename(path + ".tmp", path)


def share_kubeconfig() -> None:
    """k3s: the agents' noded reads the API server with node1's kubeconfig."""
    config = ssh_config()
    kubeconfig = on("node1", "cat /etc/noded/kubeconfig", config)
    for i in range(2, NODES + 1):
        on(f"node{i}", "umask 077; cat > /etc/noded/kubeconfig && systemctl restart noded", config, stdin=kubeconfig)
    say("kubeconfig shared; noded restarted on the agents")


# -- nodes -----------------------------------------------------------------------------------------------
def ssh_config() -> str:
    path = os.path.join(RUN_DIR, "ssh_config")
    os.makedirs(RUN_DIR, exist_ok=True)
    with open(path, "w") as f:
        f.write(vagrant("ssh-config", capture=True).stdout)
    return path


def on(node: str, command: str, config: str, stdin: str | None = None, check: bool = True) -> str:
    proc = sh(
        in_netns(["ssh", "-F", config, "-o", "LogLevel=ERROR", node, "sudo", "sh", "-c", _quote(command)]),
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"{node}: {command}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def _quote(command: str) -> str:
    return "'" + command.replace("'", "'\\''") + "'"


POD = "/opt/noded/venv/bin/python /noded/vagrant/guest/pod.py"


def pod_object(p: dict) -> dict:
    """The Pod as the API server holds it: scheduled and labelled first, its IPs once the runtime has them."""
    obj = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": p["name"], "namespace": p["namespace"], "labels": p["labels"]},
        "spec": {"nodeName": p["node"], "serviceAccountName": "default"},
    }
    if p.get("ips"):
        obj["status"] = {"phase": "Running", "podIP": p["ips"][0], "podIPs": [{"ip": ip} for ip in p["ips"]]}
    return obj


def write_manifests(nodes: list[str], items: list[dict], config: str) -> None:
    docs = json.dumps({"apiVersion": "v1", "kind": "List", "items": items}, indent=1)
    for node in nodes:
        on(node, f"cat > {MANIFEST}.tmp && mv {MANIFEST}.tmp {MANIFEST}", config, stdin=docs)


def service_objects(name: str, cluster_ip: str, backend: dict) -> list[dict]:
    """A ClusterIP service (port 80 -> 8080) and its EndpointSlice, as the API server and the EndpointSlice
    controller would hold them."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "clusterIP": cluster_ip,
                "clusterIPs": [cluster_ip],
                "selector": {"app": name},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
            },
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-lab", "namespace": "default", "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "endpoints": [
                {
                    "addresses": backend["ips"][:1],
                    "conditions": {"ready": True, "serving": True, "terminating": False},
                    "nodeName": backend["node"],
                    "targetRef": {"kind": "Pod", "namespace": "default", "name": backend["name"]},
                }
            ],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        },
    ]


def fetch(client: str, url: str, config: str) -> str:
    """The body `client` (a pod on node1) gets from url; '' on failure."""
    # no -q, no -T, no -O -: with each, Debian 12's busybox-static wget segfaults (seen here)
    get = f"rm -f /tmp/body; timeout 10 wget -O /tmp/body {url} 2>/dev/null && cat /tmp/body"
    return on("node1", f"{POD} exec {client} -- sh -c '{get}'", config, check=False).strip()


def tunnel_counts(node: str, config: str) -> dict:
    status = on(node, "noded status -o json", config, check=False)
    return json.loads(status).get("tunnel", {}) if status.strip().startswith("{") else {}


def check() -> int:
    config = ssh_config()
    nodes = [f"node{i}" for i in range(1, NODES + 1)]
    far = nodes[-1]
    for node in nodes:
        kernel = on(node, "uname -r", config).strip()
        state = on(node, "systemctl is-active noded", config, check=False).strip()
        say(f"{node}: Linux {kernel}, noded {state}")
    httpd = "-- httpd -f -p 8080 -h /www"
    if SOURCE != "k3s":  # as in a cluster, the Pod objects exist before the runtime sets them up
        planned = [
            ("echo", far, {"app": "echo"}),
            ("client", "node1", {"app": "client"}),
            ("mesh-echo", far, {"app": "mesh-echo", AMBIENT.split("=")[0]: AMBIENT.split("=")[1]}),
            ("mesh-client", "node1", {AMBIENT.split("=")[0]: AMBIENT.split("=")[1]}),
        ]
        scheduled = [{"name": n, "namespace": "default", "node": node, "labels": lb} for n, node, lb in planned]
        write_manifests(nodes, [pod_object(p) for p in scheduled], config)
    pods = {
        "echo": json.loads(on(far, f"{POD} run default/echo --label app=echo {httpd}", config)),
        "client": json.loads(on("node1", f"{POD} run default/client --label app=client", config)),
        "mesh-echo": json.loads(
            on(far, f"{POD} run default/mesh-echo --label app=mesh-echo --label {AMBIENT} {httpd}", config)
        ),
        "mesh-client": json.loads(on("node1", f"{POD} run default/mesh-client --label {AMBIENT}", config)),
    }
    for p in pods.values():
        say(f"pod {p['namespace']}/{p['name']} on {p['node']}: {', '.join(p['ips'])} (containerd + runc)")
    services = {"echo": (SERVICE_IP, pods["echo"]), "mesh-echo": (MESH_SERVICE_IP, pods["mesh-echo"])}
    items = [doc for name, (ip, backend) in services.items() for doc in service_objects(name, ip, backend)]
    if SOURCE == "k3s":
        # the API server holds them; the lab's pods are the runtime's, not the kubelet's, so the services have
        # no selector and their EndpointSlices are given, as for any selector-less service
        for doc in items:
            doc.get("spec", {}).pop("selector", None)
        docs = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
        on("node1", "k3s kubectl apply -f - >/dev/null", config, stdin=docs)
    else:
        items += [pod_object(p) for p in pods.values()]
        write_manifests(nodes, items, config)
    say("services echo and mesh-echo (ambient) written to every node's source")
    expected = f"hello from default/echo on {far}"
    body = ""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and (body := fetch("default/client", "http://echo/", config)) != expected:
        time.sleep(2)
    lookup = on("node1", f"{POD} exec default/client -- nslookup echo.default.svc.cluster.local", config, check=False)
    for line in lookup.splitlines():
        if line.strip():
            say(f"  nslookup: {line.strip()}")
    if body != expected:
        say(f"FAILED: wget http://echo/ from default/client on node1 did not reach echo on {far}: {body!r}")
        for node in nodes:
            say(f"{node} journal:\n" + on(node, "journalctl -u noded --no-pager | tail -20", config, check=False))
        return 1
    say(f"wget http://echo/ from default/client on node1 -> {body!r}")
    before = (tunnel_counts("node1", config).get("hbone_out", 0), tunnel_counts(far, config).get("hbone_in", 0))
    expected = f"hello from default/mesh-echo on {far}"
    deadline = time.monotonic() + 90  # the pods' certificates: node1 issues its own, the others ask node1's CA
    while (
        time.monotonic() < deadline and (body := fetch("default/mesh-client", "http://mesh-echo/", config)) != expected
    ):
        time.sleep(2)
    after = (tunnel_counts("node1", config), tunnel_counts(far, config))
    tunneled = after[0].get("hbone_out", 0) > before[0] and after[1].get("hbone_in", 0) > before[1]
    if body != expected or not tunneled:
        say(f"FAILED: mesh-client -> mesh-echo: {body!r}, tunnel counts {before} -> {after}")
        return 1
    certs = [f"{c['identity']} until {c['notAfter'][:19]}Z" for c in after[1].get("certificates", [])]
    say(
        f"wget http://mesh-echo/ from ambient default/mesh-client -> {body!r}, through HBONE: node1 hbone_out "
        f"{before[0]} -> {after[0]['hbone_out']}, {far} hbone_in {before[1]} -> {after[1]['hbone_in']}"
    )
    say(f"  {far} certificates: {', '.join(certs) or 'none'}")
    status = on("node1", "noded status", config, check=False)
    for line in status.splitlines()[:12]:
        say(f"  node1 status: {line}")
    say(
        "PASS: containers on node1 reached services whose backends are containers on "
        f"{far}, by DNS name (node-local resolver, socket-LB, routed pod network), and the ambient pair "
        "through the mTLS tunnel"
    )
    return 0


def still_serving(config: str, mesh: bool = True, seconds: float = 60) -> bool:
    """After check(): node1's client pods still reach echo by name (and mesh-echo through the tunnel)."""
    far = f"node{NODES}"
    wanted = {"default/client": ("http://echo/", f"hello from default/echo on {far}")}
    if mesh:
        wanted["default/mesh-client"] = ("http://mesh-echo/", f"hello from default/mesh-echo on {far}")
    ok = True
    for client, (url, expected) in wanted.items():
        deadline = time.monotonic() + seconds
        while (body := fetch(client, url, config)) != expected and time.monotonic() < deadline:
            time.sleep(1)
        say(f"  wget {url} from {client} -> {body!r}")
        ok = ok and body == expected
    return ok


DAEMONSET = "/opt/noded/venv/bin/python /noded/vagrant/guest/daemonset.py"
CNI_STATE = "sha256sum /etc/cni/net.d/*.conflist; ls /opt/cni/bin | tr '\\n' ' '"
# every kernel object noded makes: pinned BPF, its nft tables and iptables chains (host and pod netns), the
# node-local DNS interface
KERNEL_STATE = (
    "ls /sys/fs/bpf/noded 2>/dev/null; nft list tables | grep noded; iptables-save | grep -i noded; "
    "ip -br link show noded-dns 2>/dev/null; for n in $(ip netns list | cut -d' ' -f1); do "
    'ip netns exec $n nft list tables 2>/dev/null | grep noded | sed "s/^/$n: /"; done; true'
)
DS_OBJECT = "/etc/noded/manifests/daemonset.yaml"  # the source plays the API server: the DaemonSet it holds


def daemonset_object() -> str:
    """deploy/daemonset.yaml's DaemonSet as the API server holds it once applied."""
    with open(os.path.join(ROOT, "deploy", "daemonset.yaml")) as f:
        text = f.read()
    start = text.index("\napiVersion: apps/v1\nkind: DaemonSet")
    return text[start:]


def daemonset() -> int:
    """deploy/daemonset.yaml's pod template run by containerd on every node (vagrant/guest/daemonset.py),
    with `make image`'s archive, instead of the systemd unit: the same check, then the DaemonSet deleted:
    the CNI configuration as it was before it came."""
    config = ssh_config()
    nodes = [f"node{i}" for i in range(1, NODES + 1)]
    before = {}
    for node in nodes:  # the node as it would be without noded: the unit off, its chain and state removed
        on(
            node,
            "systemctl disable --now noded >/dev/null 2>&1; noded cni uninstall >/dev/null; "
            "noded cleanup --all >/dev/null",
            config,
        )
        before[node] = on(node, CNI_STATE, config)
        on(node, f"cat > {DS_OBJECT}", config, stdin=daemonset_object())
        on(node, f"{DAEMONSET} run /noded/vagrant/.cache/noded-image.tar /etc/noded", config)
        deadline = time.monotonic() + 120
        while "noded-cni" not in on(
            node, "cat /etc/cni/net.d/*.conflist; test -S /run/noded/noded.sock && echo SOCK", config, check=False
        ) or "SOCK" not in on(node, "test -S /run/noded/noded.sock && echo SOCK", config, check=False):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{node}: the DaemonSet's noded did not come up")
            time.sleep(1)
        plugin = on(node, "head -c 4 /opt/cni/bin/noded-cni | od -c | head -1; ctr -n k8s.io task ls", config)
        say(f"{node}: DaemonSet running (containerd): {' '.join(plugin.split())}")
    result = check()
    node = nodes[0]  # a rolling update first: the pods go and come back, the DaemonSet stays
    held = on(node, KERNEL_STATE, config)
    on(node, f"{DAEMONSET} delete && {DAEMONSET} run /noded/vagrant/.cache/noded-image.tar /etc/noded", config)
    kept = on(node, KERNEL_STATE, config)
    chained = "noded-cni" in on(node, "cat /etc/cni/net.d/*.conflist", config)
    say(
        f"{node}: DaemonSet pods replaced (DaemonSet kept): kernel state {'kept' if kept == held else 'CHANGED'}"
        f", noded-cni {'still chained' if chained else 'UNCHAINED'} ({len(held.splitlines())} objects)"
    )
    if kept != held or not chained:
        result = 1
    if not still_serving(config):
        result = 1
    for node in nodes:
        on(node, f"rm {DS_OBJECT}", config)  # kubectl delete daemonset: the object goes, then its pods
        on(node, f"{DAEMONSET} delete", config)
        after = on(node, CNI_STATE, config)
        left = on(node, KERNEL_STATE, config).strip()
        say(
            f"{node}: DaemonSet deleted; CNI configuration {'as it was' if after == before[node] else 'CHANGED'}, "
            f"noded kernel state {'none' if not left else 'LEFT: ' + left}"
        )
        if after != before[node] or left:
            say(f"  before: {before[node]!r}\n  after: {after!r}")
            result = 1
    say(
        "PASS: the DaemonSet ran as written, kept the dataplane across a pod replacement, and went without a "
        "trace in the CNI configuration or the kernel"
        if result == 0
        else "FAIL"
    )
    return result


PROBE_UNIT = """[Unit]
Description=stands in for containerd and kubelet: ordered after noded, as they are
Wants=noded.service
After=noded.service
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/true
"""
# a kubeadm control-plane node whose API server is a static pod kubelet has not started: refused
UNREACHABLE = """apiVersion: v1
kind: Config
current-context: c
clusters: [{name: c, cluster: {server: "https://127.0.0.1:6443", insecure-skip-tls-verify: true}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
users: [{name: u, user: {token: "not-yet"}}]
"""
SWAP_SOURCE = (
    "/opt/noded/venv/bin/python -c \"import yaml; c = yaml.safe_load(open('/etc/noded/config.yaml.lab')); "
    "c['source'] = {'kubeconfig': '/etc/noded/kubeconfig-unreachable'}; "
    "yaml.safe_dump(c, open('/etc/noded/config.yaml', 'w'))\""
)


def monotonic_us(node: str, unit: str, prop: str, config: str) -> int:
    return int(on(node, f"systemctl show -P {prop} {unit}", config).strip() or 0)


def deadlock() -> int:
    """Issue 16's deadlock scenario, after `check`: node1's noded (systemd) restarted with its API server
    unreachable, as on a control-plane node whose API server kubelet must start; a unit ordered after noded
    (containerd and kubelet are) starts within seconds, and the pods already programmed keep working."""
    config = ssh_config()
    node = "node1"
    on(node, "cat > /etc/systemd/system/noded-after.service && systemctl daemon-reload", config, stdin=PROBE_UNIT)
    on(node, "cat > /etc/noded/kubeconfig-unreachable", config, stdin=UNREACHABLE)
    on(node, f"cp /etc/noded/config.yaml /etc/noded/config.yaml.lab && {SWAP_SOURCE}", config)
    result = 0
    try:
        on(node, "systemctl stop noded-after noded", config)
        started = time.monotonic()
        on(node, "systemctl start noded-after", config)  # pulls noded in first, and waits for its READY=1
        waited = time.monotonic() - started
        noded_start = monotonic_us(node, "noded", "ExecMainStartTimestampMonotonic", config)
        noded_ready = monotonic_us(node, "noded", "ActiveEnterTimestampMonotonic", config)
        after_start = monotonic_us(node, "noded-after", "ActiveEnterTimestampMonotonic", config)
        ready_s, after_s = (noded_ready - noded_start) / 1e6, (after_start - noded_start) / 1e6
        say(
            f"{node}: API server unreachable (https://127.0.0.1:6443 refused): `systemctl start noded-after` "
            f"returned in {waited:.1f} s; noded READY {ready_s:.2f} s after its start, the unit ordered after "
            f"it started {after_s:.2f} s after noded's start"
        )
        for line in on(node, "noded status", config, check=False).splitlines()[:8]:
            say(f"  {node} status: {line}")
        journal = on(
            node,
            'journalctl -u noded -n 40 --no-pager -o cat | grep -o \'"event": "[^"]*"\' | sort | uniq -c',
            config,
            check=False,
        )
        for line in journal.splitlines():
            say(f"  {node} journal: {line.strip()}")
        if not (0 < ready_s < 10 and 0 < after_s < 10):
            say("FAILED: the unit ordered after noded waited for the API server")
            result = 1
        if not still_serving(config, mesh=False, seconds=20):
            say("FAILED: a programmed pod lost its service while the API server is unreachable")
            result = 1
        mesh = fetch("default/mesh-client", "http://mesh-echo/", config)
        say(f"  ambient default/mesh-client -> {mesh!r} (its capture is restored once Pods are listed: fails closed)")
    finally:
        on(node, "mv /etc/noded/config.yaml.lab /etc/noded/config.yaml && systemctl restart noded", config)
        on(node, "systemctl stop noded-after; rm -f /etc/systemd/system/noded-after.service", config, check=False)
    say(f"{node}: source restored; noded restarted")
    if not still_serving(config):
        result = 1
    say("PASS: no deadlock; the programmed pods kept their services" if result == 0 else "FAIL")
    return result


def main() -> int:
    if os.geteuid() != 0:
        sys.exit("lab.py: run as root")
    verb = sys.argv[1] if len(sys.argv) > 1 else "up"
    if verb == "up":
        prepare_libvirt()
        ensure_box()
        make_ca()
        if SOURCE == "k3s":
            fetch_k3s()
        build_wheels()
        say(f"vagrant up ({NODES} nodes)")
        vagrant("up", "--provider", "libvirt", "--no-provision")
        vagrant("rsync")  # the checkout as it is now, also onto VMs that were up already
        say("provisioning (the nodes in parallel)")
        provision_all()
        if SOURCE == "k3s":
            share_kubeconfig()
        say("nodes are up")
        return 0
    if verb == "check":
        return check()
    if verb == "daemonset":
        return daemonset()
    if verb == "deadlock":
        return deadlock()
    if verb == "down":
        if os.path.exists(f"/run/netns/{NETNS}") and libvirt_running():
            vagrant("destroy", "-f", check=False)
        stop_libvirt()
        shutil.rmtree(RUN_DIR, ignore_errors=True)
        say("lab removed")
        return 0
    if verb == "vagrant":
        ensure_netns()
        return vagrant(*sys.argv[2:], check=False).returncode
    if verb == "ssh":
        config = ssh_config()
        return subprocess.run(in_netns(["ssh", "-F", config, *sys.argv[2:]])).returncode
    sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(main())
