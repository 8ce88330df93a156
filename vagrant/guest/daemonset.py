"""Run deploy/daemonset.yaml's pod template on this node with containerd, as the kubelet would: the image
imported from `make image`'s archive, the init containers to completion in order, then the containers,
each with hostNetwork (the host's netns), privileged, hostPID, the hostPath volumes at their mountPaths
(Bidirectional propagation as rshared). The ConfigMap's volume is this node's /etc/noded (its
config.yaml, CA files and manifest directory: the template's ConfigMap names an in-cluster API server the
lab has not). `delete` stops the containers with SIGTERM and a grace period, as a DaemonSet's deletion
does, and removes them.

    daemonset.py run IMAGE-ARCHIVE CONFIG-DIR   |   daemonset.py delete
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import yaml

CTR = ["ctr", "-n", "k8s.io"]
MANIFEST = "/noded/deploy/daemonset.yaml"
STATE = "/run/noded-daemonset"
IMAGE = "docker.io/library/noded:latest"


def template() -> dict:
    with open(MANIFEST) as f:
        ds = next(d for d in yaml.safe_load_all(f) if d and d.get("kind") == "DaemonSet")
    return ds["spec"]["template"]["spec"]


def mounts(container: dict, volumes: dict[str, dict], config_dir: str) -> list[str]:
    out = []
    for m in container.get("volumeMounts", []):
        vol = volumes[m["name"]]
        if "hostPath" in vol:
            src = vol["hostPath"]["path"]
            if vol["hostPath"].get("type") == "DirectoryOrCreate":
                os.makedirs(src, exist_ok=True)
        elif "configMap" in vol:
            src = config_dir
        else:
            raise SystemExit(f"daemonset.py: volume {m['name']}: only hostPath and configMap here")
        propagation = {"Bidirectional": "rshared", "HostToContainer": "rslave"}.get(
            m.get("mountPropagation"), "rprivate"
        )
        options = ["rbind", "ro" if m.get("readOnly") else "rw", propagation]
        out += ["--mount", f"type=bind,src={src},dst={m['mountPath']},options={':'.join(options)}"]
    return out


def ctr_run(container: dict, spec: dict, volumes: dict, config_dir: str, name: str, detach: bool) -> None:
    argv = [*CTR, "run", "--net-host"]
    argv += ["-d", "--log-uri", f"file:///var/log/{name}.log"] if detach else ["--rm"]
    if (container.get("securityContext") or {}).get("privileged"):
        argv.append("--privileged")
    if spec.get("hostPID"):
        argv += ["--with-ns", "pid:/proc/1/ns/pid"]
    for env in container.get("env", []):
        if "value" in env:
            argv += ["--env", f"{env['name']}={env['value']}"]
        elif env.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
            argv += ["--env", f"{env['name']}={os.uname().nodename}"]
    argv += mounts(container, volumes, config_dir)
    argv += [IMAGE, name, *container["command"]]
    print("daemonset.py:", " ".join(argv[len(CTR) :]), flush=True)
    # a detached task must not hold this process's stdio (the caller waits for its end)
    quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    subprocess.run(argv, check=True, **(quiet if detach else {}))


def run(archive: str, config_dir: str) -> None:
    subprocess.run([*CTR, "images", "import", archive], check=True, capture_output=True)
    spec = template()
    volumes = {v["name"]: v for v in spec["volumes"]}
    os.makedirs(STATE, exist_ok=True)
    names = []
    for i, c in enumerate(spec.get("initContainers", [])):
        ctr_run(c, spec, volumes, config_dir, f"noded-ds-init-{i}", detach=False)
    for c in spec["containers"]:
        name = f"noded-ds-{c['name']}"
        ctr_run(c, spec, volumes, config_dir, name, detach=True)
        names.append(name)
    with open(os.path.join(STATE, "containers.json"), "w") as f:
        json.dump({"containers": names, "grace": spec.get("terminationGracePeriodSeconds", 30)}, f)


def delete() -> None:
    with open(os.path.join(STATE, "containers.json")) as f:
        state = json.load(f)
    for name in state["containers"]:
        subprocess.run([*CTR, "task", "kill", "-s", "SIGTERM", name], check=False)
    deadline = time.monotonic() + state["grace"]
    for name in state["containers"]:
        while time.monotonic() < deadline:
            out = subprocess.run([*CTR, "task", "ls"], capture_output=True, text=True).stdout
            if not any(line.split()[:1] == [name] and "RUNNING" in line for line in out.splitlines()):
                break
            time.sleep(0.2)
        subprocess.run([*CTR, "task", "kill", "-s", "SIGKILL", name], check=False, capture_output=True)
        subprocess.run([*CTR, "task", "rm", "-f", name], check=False, capture_output=True)
        subprocess.run([*CTR, "containers", "rm", name], check=False, capture_output=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"]:
        run(sys.argv[2], sys.argv[3])
    elif sys.argv[1:2] == ["delete"]:
        delete()
    else:
        sys.exit(__doc__)
