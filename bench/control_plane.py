"""Control plane at scale: program N services x M endpoints from scratch, then time single EndpointSlice changes.

In-process (model + eBPF proxier on real pinned maps) for the event -> map
latency, and a real `noded run` on a manifest directory for cold-start time
and daemon RSS at that size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import median, pct, rss_mib, table
from noded.bpf import sock_lb
from noded.lab import netns
from noded.model.tracker import ServiceModel
from noded.services.ebpf import EbpfProxier
from tests.objects import endpoint, service, slice_

TAG = "bench"


def objects(n: int, m: int) -> list[dict]:
    out = []
    for i in range(n):
        vip = f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}"
        out.append(service(f"s{i}", vip))
        out.append(slice_(f"s{i}", [endpoint(f"172.{16 + j}.{(i // 256) % 256}.{i % 256}") for j in range(m)]))
    return out


def in_process(n: int, m: int, changes: int) -> dict:
    cgroup = f"{netns.CGROUP_ROOT}/noded-{TAG}"
    bpffs = f"/sys/fs/bpf/noded/{TAG}"
    netns.cgroup_create(cgroup)
    maps = sock_lb.load_and_attach(bpffs, cgroup)
    try:
        objs = objects(n, m)
        rss0 = rss_mib()
        model = ServiceModel()
        proxier = EbpfProxier(model, maps)
        t0 = time.perf_counter()
        for o in objs:
            model.upsert(o)
        t1 = time.perf_counter()
        proxier.sync(full=True)
        t2 = time.perf_counter()
        lat = []
        for k in range(changes):
            i = (k * 7919) % n
            eps = [endpoint(f"172.{16 + j}.{(i // 256) % 256}.{i % 256}") for j in range(m)]
            eps[k % m] = endpoint(f"172.99.{k // 256 % 256}.{k % 256}")  # one endpoint replaced
            start = time.perf_counter()
            model.upsert(slice_(f"s{i}", eps))
            proxier.sync()
            lat.append((time.perf_counter() - start) * 1000)
        return {
            "parse_s": t1 - t0,
            "program_s": t2 - t1,
            "writes": proxier.map_writes,
            "lat_p50_ms": median(lat),
            "lat_p99_ms": pct(lat, 99),
            "lat_max_ms": max(lat),
            "rss_delta_mib": rss_mib() - rss0,
        }
    finally:
        maps.close()
        sock_lb.remove(bpffs)
        netns.cgroup_remove_tree(cgroup)


def daemon(n: int, m: int) -> dict:
    """A real `noded run` in a netns of its own, reading n services from a manifest directory."""
    base = f"/run/noded-{TAG}"
    ns = f"noded-{TAG}"
    cgroup = f"{netns.CGROUP_ROOT}/noded-{TAG}-daemon"
    os.makedirs(f"{base}/manifests", exist_ok=True)
    with open(f"{base}/manifests/all.yaml", "w") as f:
        yaml.dump_all(objects(n, m), f, Dumper=yaml.CSafeDumper)
    cfg = {
        "apiVersion": "noded.io/v1alpha1",
        "kind": "NodedConfiguration",
        "nodeName": f"{TAG}-daemon",
        "source": {"directory": f"{base}/manifests"},
        "services": {"cgroupPath": cgroup},
        "api": {"socket": f"{base}/noded.sock"},
    }
    with open(f"{base}/config.yaml", "w") as f:
        yaml.safe_dump(cfg, f)
    netns.create(ns)
    netns.cgroup_create(cgroup)
    start = time.monotonic()
    with open(f"{base}/noded.log", "w") as log:
        proc = subprocess.Popen(
            netns.nsenter_argv(ns, [sys.executable, "-m", "noded", "run", "-c", f"{base}/config.yaml"]),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        while True:
            try:
                with open(f"{base}/status.json") as f:
                    st = json.load(f)
                if st.get("syncs", 0) >= 1 and st.get("services") == n:
                    break
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            if proc.poll() is not None:
                with open(f"{base}/noded.log") as log:
                    raise RuntimeError(log.read()[-2000:])
            time.sleep(0.05)
        ready = time.monotonic() - start
        time.sleep(1)
        return {"cold_start_s": ready, "rss_mib": rss_mib(proc.pid)}
    finally:
        proc.terminate()
        proc.wait()
        subprocess.run([sys.executable, "-m", "noded", "cleanup", "-c", f"{base}/config.yaml"], capture_output=True)
        netns.remove(ns)
        netns.cgroup_remove_tree(cgroup)
        subprocess.run(["rm", "-rf", base])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="1000,10000")
    p.add_argument("--endpoints", type=int, default=10)
    p.add_argument("--changes", type=int, default=500)
    a = p.parse_args()
    rows = []
    for n in [int(x) for x in a.sizes.split(",")]:
        r = in_process(n, a.endpoints, a.changes)
        d = daemon(n, a.endpoints)
        rows.append(
            [
                f"{n} x {a.endpoints}",
                f"{r['parse_s']:.2f}",
                f"{r['program_s']:.2f}",
                r["writes"],
                f"{r['lat_p50_ms']:.3f}",
                f"{r['lat_p99_ms']:.3f}",
                f"{r['lat_max_ms']:.2f}",
                f"{d['cold_start_s']:.2f}",
                f"{d['rss_mib']:.0f}",
            ]
        )
    print(
        table(
            "control plane (eBPF mode): programming from scratch and one EndpointSlice change",
            [
                "services x endpoints",
                "model s",
                "maps s",
                "map writes",
                "change p50 ms",
                "change p99 ms",
                "change max ms",
                "daemon cold start s",
                "daemon RSS MiB",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
