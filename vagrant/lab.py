#!/usr/bin/env python3
"""The Vagrant lab's driver (run as root from the checkout; standard library only).

    lab.py up       libvirt in the lab's own network namespace, the box (built if missing), noded's wheels,
                    `vagrant up` of NODED_NODES nodes (2)
    lab.py check    the end-to-end check: a container on node1 reaches, by DNS name, a service whose backend
                    is a container on the last node
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
T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def in_netns(argv: list[str]) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{NETNS}", "--", *argv]


def sh(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("check", True)
    return subprocess.run(argv, **kwargs)


def vagrant(*args: str, capture: bool = False, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "VAGRANT_DEFAULT_PROVIDER": "libvirt", "NODED_NODES": str(NODES), "NODED_SOURCE": SOURCE}
    return sh(in_netns(["vagrant", *args]), cwd=HERE, env=env, check=check, text=True, capture_output=capture)


# -- libvirt -------------------------------------------------------------------------------------------
def libvirt_running() -> bool:
    return subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True).returncode == 0


def prepare_libvirt() -> None:
    if not os.path.exists(f"/run/netns/{NETNS}"):
        sh(["ip", "netns", "add", NETNS])
        sh(["ip", "-n", NETNS, "link", "set", "lo", "up"])
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
    env = {**os.environ, "VAGRANT_DEFAULT_PROVIDER": "libvirt", "NODED_NODES": str(NODES), "NODED_SOURCE": SOURCE}
    names = [f"node{i}" for i in range(1, NODES + 1)]
    waves = [names[:1], names[1:]] if SOURCE == "k3s" else [names]
    for wave in waves:
        procs = {
            name: subprocess.Popen(
                in_netns(["vagrant", "provision", name]), cwd=HERE, env=env, stdout=subprocess.PIPE, text=True
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


def manifests(echo: dict, client: dict) -> list[dict]:
    """What the API server would hold: the service, its EndpointSlice and the two Pods."""

    def pod(p: dict) -> dict:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": p["name"], "namespace": p["namespace"], "labels": p["labels"]},
            "spec": {"nodeName": p["node"], "serviceAccountName": "default"},
            "status": {"phase": "Running", "podIP": p["ips"][0], "podIPs": [{"ip": ip} for ip in p["ips"]]},
        }

    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "echo", "namespace": "default"},
            "spec": {
                "clusterIP": SERVICE_IP,
                "clusterIPs": [SERVICE_IP],
                "selector": {"app": "echo"},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
            },
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "echo-lab",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "echo"},
            },
            "addressType": "IPv4",
            "endpoints": [
                {
                    "addresses": echo["ips"][:1],
                    "conditions": {"ready": True, "serving": True, "terminating": False},
                    "nodeName": echo["node"],
                    "targetRef": {"kind": "Pod", "namespace": "default", "name": "echo"},
                }
            ],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        },
        pod(echo),
        pod(client),
    ]


def check() -> int:
    config = ssh_config()
    nodes = [f"node{i}" for i in range(1, NODES + 1)]
    far = nodes[-1]
    for node in nodes:
        kernel = on(node, "uname -r", config).strip()
        state = on(node, "systemctl is-active noded", config, check=False).strip()
        say(f"{node}: Linux {kernel}, noded {state}")
    echo = json.loads(on(far, f"{POD} run default/echo --label app=echo -- httpd -f -p 8080 -h /www", config))
    say(f"pod default/echo on {echo['node']}: {', '.join(echo['ips'])} (containerd + runc, CNI bridge + noded-cni)")
    client = json.loads(on("node1", f"{POD} run default/client --label app=client -- sleep 86400", config))
    say(f"pod default/client on {client['node']}: {', '.join(client['ips'])}")
    docs = json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests(echo, client)}, indent=1)
    if SOURCE == "k3s":
        # the API server holds them; the lab's pods are the runtime's, not the kubelet's, so the service has
        # no selector and its EndpointSlice is given, as for any selector-less service
        service, endpoints = manifests(echo, client)[:2]
        del service["spec"]["selector"]
        docs = json.dumps({"apiVersion": "v1", "kind": "List", "items": [service, endpoints]})
        on("node1", "k3s kubectl apply -f - >/dev/null", config, stdin=docs)
        nodes = []
    for node in nodes:
        on(
            node,
            "cat > /etc/noded/manifests/lab.yaml.tmp && mv /etc/noded/manifests/lab.yaml.tmp "
            "/etc/noded/manifests/lab.yaml",
            config,
            stdin=docs,
        )
    say(f"service default/echo {SERVICE_IP}:80 -> {echo['ips'][0]}:8080 written to every node's manifests")
    ok = False
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        # no -q, no -T, no -O -: with each, Debian 12's busybox-static wget segfaults (seen here)
        fetch = "rm -f /tmp/body; timeout 10 wget -O /tmp/body http://echo/ 2>/dev/null && cat /tmp/body"
        body = on("node1", f"{POD} exec default/client -- sh -c '{fetch}'", config, check=False)
        if body.strip() == f"hello from default/echo on {far}":
            ok = True
            break
        time.sleep(2)
    lookup = on("node1", f"{POD} exec default/client -- nslookup echo.default.svc.cluster.local", config, check=False)
    for line in lookup.splitlines():
        if line.strip():
            say(f"  nslookup: {line.strip()}")
    if not ok:
        say(f"FAILED: wget http://echo/ from default/client on node1 did not reach echo on {far}")
        for node in nodes:
            say(f"{node} journal:\n" + on(node, "journalctl -u noded --no-pager | tail -20", config, check=False))
        return 1
    say(f"wget http://echo/ from default/client on node1 -> {body.strip()!r}")
    status = on("node1", "noded status", config, check=False)
    for line in status.splitlines()[:12]:
        say(f"  node1 status: {line}")
    say(
        "PASS: a container on node1 reached a service whose backend is a container on "
        f"{far}, by DNS name (node-local resolver, socket-LB, routed pod network)"
    )
    return 0


def main() -> int:
    if os.geteuid() != 0:
        sys.exit("lab.py: run as root")
    verb = sys.argv[1] if len(sys.argv) > 1 else "up"
    if verb == "up":
        prepare_libvirt()
        ensure_box()
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
    if verb == "down":
        if os.path.exists(f"/run/netns/{NETNS}") and libvirt_running():
            vagrant("destroy", "-f", check=False)
        stop_libvirt()
        shutil.rmtree(RUN_DIR, ignore_errors=True)
        say("lab removed")
        return 0
    if verb == "vagrant":
        return vagrant(*sys.argv[2:], check=False).returncode
    if verb == "ssh":
        config = ssh_config()
        return subprocess.run(in_netns(["ssh", "-F", config, *sys.argv[2:]])).returncode
    sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(main())
