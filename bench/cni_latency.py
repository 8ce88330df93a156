"""CNI ADD and DEL latency of the lab's chain with and without noded-cni (median, p99 over N pods).

A 1-node lab supplies the daemon; each pod is a fresh netns and the chain is exec'd as a runtime does
(bridge + host-local, then noded-cni handing the pod to the daemon, which installs its capture).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import median, pct, table
from noded.lab import cni, netns
from noded.lab.controller import pod_object
from noded.lab.lab import Lab


def run(lab: Lab, with_noded: bool, n: int) -> tuple[list[float], list[float]]:
    node = lab.state()["nodes"]["node1"]
    conflist = lab.conflist(node)
    if not with_noded:
        conflist = {**conflist, "plugins": [p for p in conflist["plugins"] if p["type"] != "noded-cni"]}
    tag = "with" if with_noded else "without"
    adds, dels = [], []
    for i in range(n):
        name = f"noded-pod-bench-{tag}-{i}"
        netns.create(name)
        args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={tag}-{i}"
        inv = cni.Invocation(f"bench-{tag}-{i}", f"/run/netns/{name}", args=args)
        try:
            t0 = time.perf_counter()
            result = cni.add(conflist, inv, lab.cni_path, node["netns"])
            t1 = time.perf_counter()
            cni.delete(conflist, inv, lab.cni_path, node["netns"], result)
            t2 = time.perf_counter()
            adds.append((t1 - t0) * 1000)
            dels.append((t2 - t1) * 1000)
        finally:
            netns.remove(name)
    return adds, dels


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pods", type=int, default=100)
    a = p.parse_args()
    lab = Lab()
    lab.up(1, "ebpf")
    try:
        # as in a cluster, the Pod objects (enrolled: the full capture) exist before the runtime's ADD
        ambient = {"istio.io/dataplane-mode": "ambient"}
        pods = [
            pod_object({"name": f"with-{i}", "namespace": "bench", "node": "node1", "labels": ambient})
            for i in range(a.pods)
        ]
        with open(os.path.join(lab.manifests, "bench-pods.yaml"), "w") as f:
            yaml.safe_dump_all(pods, f)
        time.sleep(2)
        rows = []
        results = {}
        for with_noded in (False, True):
            results[with_noded] = run(lab, with_noded, a.pods)
        for with_noded in (False, True):
            adds, dels = results[with_noded]
            label = "bridge + host-local + noded-cni" if with_noded else "bridge + host-local"
            rows.append(
                [label, f"{median(adds):.1f}", f"{pct(adds, 99):.1f}", f"{median(dels):.1f}", f"{pct(dels, 99):.1f}"]
            )
        added = median(results[True][0]) - median(results[False][0])
        print(
            table(
                f"CNI chain latency over {a.pods} pods (noded-cni adds {added:.1f} ms to ADD at the median)",
                ["chain", "ADD p50 ms", "ADD p99 ms", "DEL p50 ms", "DEL p99 ms"],
                rows,
            )
        )
    finally:
        lab.down()


if __name__ == "__main__":
    main()
