"""Lab workloads used by the demo, the tests and the benchmarks: echo servers, probes, and waiting for the dataplane."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from noded.lab import netns
from noded.lab.lab import Lab, LabError


def end_demo(lab: Lab, servers: list[subprocess.Popen], keep: bool) -> None:
    """A demo's end: its workloads stopped, and the lab taken down unless asked to keep it."""
    for server in servers:
        server.kill()
    if not keep:
        lab.down()
        print("== lab removed (use --keep to leave it up)")


def start_server(lab: Lab, pod: str, module: str, *args: str) -> subprocess.Popen:
    """A lab workload (`python -m module args…`) in the pod, once it has said it is serving."""
    argv = [sys.executable, "-m", module, *args]
    proc = lab.popen(pod, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    if "serving" not in line:
        proc.kill()
        raise LabError(f"{module} in {pod} did not start: {line}{proc.stdout.read()}")
    return proc


def start_echo(lab: Lab, pod: str, name: str | None = None, tcp: int = 8080, udp: int = 0) -> subprocess.Popen:
    name = name or pod.split("/")[-1]
    return start_server(lab, pod, "noded.lab.echo", "--name", name, "--tcp", str(tcp), "--udp", str(udp))


def start_http_echo(
    lab: Lab, pod: str, name: str | None = None, port: int = 8080, status: int = 200
) -> subprocess.Popen:
    """noded/lab/httpecho.py in the pod: JSON of what each request carried."""
    name = name or pod.split("/")[-1]
    return start_server(lab, pod, "noded.lab.httpecho", "--name", name, "--port", str(port), "--status", str(status))


def probe(lab: Lab, pod: str, mode: str, host: str, port: int, **opts: object) -> dict:
    argv = [sys.executable, "-m", "noded.lab.probe", mode, host, str(port)]
    for key, value in opts.items():
        argv += [f"--{key}", str(value)]
    res = lab.run(pod, argv, timeout=300)
    if res.returncode != 0:
        raise LabError(f"probe in {pod} failed: {res.stderr}")
    return json.loads(res.stdout)


def programmed(lab: Lab, node: str) -> dict[str, dict]:
    """Frontend -> {ready, terminating} as node's kernel holds them now (maps or nft table, by mode)."""
    from noded.services.view import programmed_views

    state = lab.state()
    node_state = state["nodes"][node]
    prefix = tuple(netns.nsenter_argv(node_state["netns"], []))
    views = programmed_views(state["mode"], node_state["bpffsPath"], prefix) or []
    return {
        str(v.frontend): {
            "ready": sorted(f"{a}:{p}" for a, p in v.ready),
            "terminating": sorted(f"{a}:{p}" for a, p in v.terminating),
        }
        for v in views
    }


def wait_programmed(
    lab: Lab,
    node: str,
    frontend: str,
    ready: int | None = None,
    terminating: int = 0,
    timeout: float = 10.0,
    ready_ips: list[str] | None = None,
) -> float:
    """Wait until node's kernel holds frontend with that many backends (or exactly ready_ips);
    returns the seconds it took."""
    start = time.monotonic()
    while True:
        got = programmed(lab, node).get(frontend)
        if got is not None and (
            (ready_ips is not None and sorted(b.split(":")[0] for b in got["ready"]) == sorted(ready_ips))
            or (
                ready_ips is None
                and (ready is None or (len(got["ready"]) == ready and len(got["terminating"]) == terminating))
            )
        ):
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise LabError(f"{frontend} on {node}: wanted {ready} ready/{terminating} terminating, have {got}")
        time.sleep(0.02)


def service_yaml(
    name: str,
    selector: dict[str, str] | None,
    ports: list[tuple[str, str, int, int]],
    namespace: str = "default",
    extra_spec: dict | None = None,
) -> str:
    import yaml

    spec: dict = {"ports": [{"name": n, "protocol": proto, "port": p, "targetPort": t} for n, proto, p, t in ports]}
    if selector:
        spec["selector"] = selector
    spec.update(extra_spec or {})
    return yaml.safe_dump(
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace}, "spec": spec}
    )


def pod_capture(lab: Lab, pod_key: str) -> dict:
    """What the pod's node daemon says about the pod's capture (its API's PodInfo)."""
    from noded.api import h2client

    state = lab.state()
    pod = state["pods"][pod_key]
    return h2client.call(lab.api_socket(pod["node"]), "/noded.v1.Noded/PodInfo", {"containerId": pod["containerId"]})


def node_status(lab: Lab, node: str) -> dict:
    """The node daemon's API Status: sync state and the DNS side's counters."""
    from noded.api import h2client

    return h2client.call(lab.api_socket(node), "/noded.v1.Noded/Status", {})


def node_metrics(lab: Lab, node: str) -> str:
    """The node daemon's /metrics text (its metrics port inside the node's netns)."""
    code = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:10249/metrics').read().decode())"
    res = lab.run(f"node/{node}", [sys.executable, "-c", code], timeout=20)
    if res.returncode != 0:
        raise LabError(f"metrics of {node}: {res.stderr.strip()}")
    return res.stdout


AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def mesh_pods(lab: Lab) -> list[subprocess.Popen]:
    """The capture lab's pods: echo servers (TCP 8080, UDP 5353) echo-1 on node1, echo-2 on node2 and the
    enrolled mesh-echo on node1; the clients mesh-client (enrolled) and plain-client on node1. Returns the
    servers (to kill)."""
    servers = []
    for pod, node, labels in (
        ("default/echo-1", "node1", {"app": "echo"}),
        ("default/echo-2", "node2", {"app": "echo"}),
        ("default/mesh-echo", "node1", {"app": "mesh-echo", **AMBIENT}),
    ):
        lab.add_pod(pod, node, labels)
        servers.append(start_echo(lab, pod, tcp=8080, udp=5353))
    lab.add_pod("default/mesh-client", "node1", AMBIENT)
    lab.add_pod("default/plain-client", "node1")
    return servers


def follow_until(follower: subprocess.Popen, name: str, seconds: float = 5.0) -> tuple[dict, list[dict]]:
    """Read a `probe follow` client's lines until one is answered by `name` (the echo server's name, the
    answer's first word): (that line, the lines before). LabError when none is within `seconds`."""
    import json

    seen: list[dict] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = follower.stdout.readline()
        if not line:
            break
        event = json.loads(line)
        if event.get("answer", "").split(" ")[0] == name:
            return event, seen
        seen.append(event)
    raise LabError(f"no answer from {name}: {seen[-5:]}")
