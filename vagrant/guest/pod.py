"""A pod on a lab VM, set up the way containerd's CRI plugin sets one up: a network namespace, the node's
CNI chain run in it with the Kubernetes arguments (so noded-cni learns the pod), then a real container
(containerd + runc, from the busybox root file system the provisioner made) joined to that namespace.

    pod.py run NAMESPACE/NAME [--label K=V ...] -- CMD...   prints {"name", "namespace", "node", "ips", ...}
    pod.py exec NAMESPACE/NAME -- CMD...                    runs CMD in the pod's container
    pod.py rm NAMESPACE/NAME
Run with noded's interpreter (/opt/noded/venv/bin/python) as root.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid

from noded.lab import cni

CTR = ["ctr", "--namespace", "noded-lab"]
ROOTFS = "/var/lib/noded-lab/rootfs"
PODS = "/var/lib/noded-lab/pods"
CNI_BIN = ["/opt/cni/bin"]
NODE_LOCAL_DNS = "169.254.20.10"
LOOPBACK = {"cniVersion": "1.0.0", "name": "cni-loopback", "plugins": [{"type": "loopback"}]}


def _conflist() -> dict:
    """The node's network: the first configuration in /etc/cni/net.d, as libcni picks it."""
    files = sorted(glob.glob("/etc/cni/net.d/*.conflist"))
    if not files:
        sys.exit("pod.py: no .conflist in /etc/cni/net.d")
    with open(files[0]) as f:
        return json.load(f)


def _split(key: str) -> tuple[str, str]:
    namespace, _, name = key.partition("/")
    return (namespace, name) if name else ("default", namespace)


def _state_path(namespace: str, name: str) -> str:
    return f"{PODS}/{namespace}_{name}.json"


def run(key: str, labels: dict[str, str], command: list[str]) -> dict:
    namespace, name = _split(key)
    if os.path.exists(_state_path(namespace, name)):
        remove(key)
    pod_id = f"{namespace}-{name}-{uuid.uuid4().hex[:8]}"
    netns = f"lab-{pod_id}"[:60]
    rootfs = f"{PODS}/{pod_id}/rootfs"
    os.makedirs(os.path.dirname(rootfs), exist_ok=True)
    shutil.copytree(ROOTFS, rootfs, symlinks=True)
    node = socket.gethostname()
    with open(f"{rootfs}/www/index.html", "w") as f:
        f.write(f"hello from {namespace}/{name} on {node}\n")
    with open(f"{rootfs}/etc/resolv.conf", "w") as f:  # what the kubelet writes for ClusterFirst
        f.write(
            f"search {namespace}.svc.cluster.local svc.cluster.local cluster.local\n"
            f"nameserver {NODE_LOCAL_DNS}\noptions ndots:5\n"
        )
    subprocess.run(["ip", "netns", "add", netns], check=True)
    invocation = cni.Invocation(
        container_id=pod_id,
        netns_path=f"/run/netns/{netns}",
        args=f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={pod_id}",
    )
    state = {
        "id": pod_id,
        "namespace": namespace,
        "name": name,
        "node": node,
        "labels": labels,
        "netns": netns,
        "rootfs": rootfs,
    }
    try:
        cni.add(LOOPBACK, invocation, CNI_BIN, None)  # as containerd's CRI plugin does, before the pod network
        result = cni.add(_conflist(), invocation, CNI_BIN, None)
        state["cniResult"] = result
        state["ips"] = cni.result_ips(result)
        subprocess.run(
            [
                *CTR,
                "run",
                "-d",
                "--env",
                "PATH=/bin",
                "--with-ns",
                f"network:/run/netns/{netns}",
                "--rootfs",
                rootfs,
                pod_id,
                *command,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    except Exception:
        _teardown(state)
        raise
    with open(_state_path(namespace, name), "w") as f:
        json.dump(state, f)
    return {k: state[k] for k in ("namespace", "name", "node", "ips", "labels", "id")}


def exec_in(key: str, command: list[str]) -> int:
    with open(_state_path(*_split(key))) as f:
        state = json.load(f)
    exec_id = f"x{uuid.uuid4().hex[:8]}"
    return subprocess.run([*CTR, "task", "exec", "--exec-id", exec_id, state["id"], *command]).returncode


def remove(key: str) -> None:
    path = _state_path(*_split(key))
    with open(path) as f:
        state = json.load(f)
    _teardown(state)
    os.unlink(path)


def _teardown(state: dict) -> None:
    """As the runtime tears a pod down: the container, then the CNI chain's DEL, then the namespace."""
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    subprocess.run([*CTR, "task", "kill", "-s", "SIGKILL", state["id"]], **quiet)
    subprocess.run([*CTR, "task", "delete", "-f", state["id"]], **quiet)
    subprocess.run([*CTR, "container", "delete", state["id"]], **quiet)
    invocation = cni.Invocation(container_id=state["id"], netns_path=f"/run/netns/{state['netns']}")
    try:
        cni.delete(_conflist(), invocation, CNI_BIN, None, state.get("cniResult"))
    except cni.CniError as e:
        print(f"pod.py: CNI DEL: {e}", file=sys.stderr)
    subprocess.run(["ip", "netns", "del", state["netns"]], **quiet)
    shutil.rmtree(os.path.dirname(state["rootfs"]), ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("verb", choices=["run", "exec", "rm"])
    parser.add_argument("pod")
    parser.add_argument("--label", action="append", default=[])
    argv = sys.argv[1:]
    command = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    os.makedirs(PODS, exist_ok=True)
    if args.verb == "run":
        labels = dict(item.split("=", 1) for item in args.label)
        print(json.dumps(run(args.pod, labels, command or ["sleep", "86400"])))
        return 0
    if args.verb == "exec":
        return exec_in(args.pod, command)
    remove(args.pod)
    return 0


if __name__ == "__main__":
    sys.exit(main())
