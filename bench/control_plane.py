"""Control plane at scale, per services mode: program N services x M endpoints from scratch, time single
EndpointSlice changes (an endpoint replaced; one endpoint more), and a real `noded run` on a manifest
directory for cold start and RSS.

In-process runs use the test suite's environments: a netns (and cgroup) of their own with the proxier
of that mode programming the real kernel (pinned maps, nft table, iptables chains).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import median, pct, rss_mib, table
from noded.lab import netns
from tests.bpf.conftest import IptEnv, LbEnv, NftEnv, open_env, unique_tag
from tests.objects import endpoint, service, slice_

TAG = "bench"


class IptLegacyEnv(IptEnv):
    backend = "legacy"


# "iptables" is whatever the detection picks (nft here, as on a stock Debian 12); "iptables-legacy" is
# the same mode on a node whose rules are in the legacy backend
ENVS = {"ebpf": LbEnv, "nftables": NftEnv, "iptables": IptEnv, "iptables-legacy": IptLegacyEnv}


def vip(i: int) -> str:
    return f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}"


NODES = 100  # the cluster's nodes the endpoints run on; the daemon's node ({TAG}-daemon) is one of them


def endpoints(i: int, m: int) -> list[dict]:
    """m endpoints, each naming its node as the EndpointSlice controller writes them (1 in NODES is here)."""
    return [endpoint(f"172.{16 + j}.{(i // 256) % 256}.{i % 256}", node=_node(i + j)) for j in range(m)]


def _node(n: int) -> str:
    return f"{TAG}-daemon" if n % NODES == 0 else f"node-{n % NODES}"


def objects(n: int, m: int) -> list[dict]:
    out = []
    for i in range(n):
        out += [service(f"s{i}", vip(i)), slice_(f"s{i}", endpoints(i, m))]
    return out


def in_process(mode: str, n: int, m: int, changes: int) -> dict:
    env = open_env(ENVS[mode], f"{TAG}-{unique_tag()}")
    if getattr(env, "terminator", None) is not None:  # the daemon's default (services.terminateTCPConnections)
        env.terminator.tcp = False
    try:
        env.model.node_name = f"{TAG}-daemon"  # the node the objects place 1 in NODES endpoints on, as daemon()
        objs = objects(n, m)
        rss0 = rss_mib()
        t0 = time.perf_counter()
        for o in objs:
            env.model.upsert(o)
        t1 = time.perf_counter()
        env.proxier.sync(full=True)
        t2 = time.perf_counter()
        lat = []
        for k in range(changes):
            i = (k * 7919) % n
            eps = endpoints(i, m)
            eps[k % m] = endpoint(f"172.99.{k // 256 % 256}.{k % 256}", node=_node(k))  # one endpoint replaced
            start = time.perf_counter()
            env.model.upsert(slice_(f"s{i}", eps))
            env.proxier.sync()
            lat.append((time.perf_counter() - start) * 1000)
        grow = []  # the other kind of change: one endpoint more (the nftables mode rewrites a rule for it)
        for k in range(changes):
            i = (k * 7919 + 1) % n
            eps = [*endpoints(i, m), endpoint(f"172.98.{k // 256 % 256}.{k % 256}", node=_node(k))]
            start = time.perf_counter()
            env.model.upsert(slice_(f"s{i}", eps))
            env.proxier.sync()
            grow.append((time.perf_counter() - start) * 1000)
        return {
            "model_s": t1 - t0,
            "program_s": t2 - t1,
            "lat_p50_ms": median(lat),
            "lat_p99_ms": pct(lat, 99),
            "grow_p50_ms": median(grow),
            "grow_p99_ms": pct(grow, 99),
            "rss_delta_mib": rss_mib() - rss0,
        }
    finally:
        env.close()


def daemon(mode: str, n: int, m: int, fmt: str = "yaml") -> dict:
    """A real `noded run` in a netns of its own, reading n services from a manifest directory (one YAML
    file, or the same objects as one JSON List), or (fmt "api") listing them, 500 a page, from the test API
    server over HTTPS with a bearer token, as from kube-apiserver."""
    base = f"/run/noded-{TAG}"
    ns = f"noded-{TAG}"
    cgroup = f"{netns.CGROUP_ROOT}/noded-{TAG}-daemon"
    os.makedirs(f"{base}/manifests", exist_ok=True)
    netns.create(ns)
    api = None
    if fmt == "api":
        from tests.fakeapi import FakeApiServer, serving_cert

        ca, cert, key = serving_cert(pathlib.Path(base))
        api = FakeApiServer(ns, tls=(cert, key), token="bench-token")
        api.load(objects(n, m))
        api.start()
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "b",
            "clusters": [{"name": "b", "cluster": {"server": api.url, "certificate-authority": ca}}],
            "contexts": [{"name": "b", "context": {"cluster": "b", "user": "u"}}],
            "users": [{"name": "u", "user": {"token": "bench-token"}}],
        }
        with open(f"{base}/kubeconfig", "w") as f:
            yaml.safe_dump(kubeconfig, f)
        source = {"kubeconfig": f"{base}/kubeconfig"}
    else:
        with open(f"{base}/manifests/all.{fmt}", "w") as f:
            if fmt == "json":
                json.dump({"apiVersion": "v1", "kind": "List", "items": objects(n, m)}, f)
            else:
                yaml.dump_all(objects(n, m), f, Dumper=yaml.CSafeDumper)
        source = {"directory": f"{base}/manifests"}
    cfg = {
        "apiVersion": "noded.io/v1alpha1",
        "kind": "NodedConfiguration",
        "nodeName": f"{TAG}-daemon",
        "source": source,
        # every change synced on its own: what one change costs, not kube-proxy's 1s batching
        "services": {"mode": mode.removesuffix("-legacy"), "cgroupPath": cgroup, "minSyncPeriod": "0s"},
        "api": {"socket": f"{base}/noded.sock"},
        "metricsBindAddress": "127.0.0.1:0",
        "healthzBindAddress": "127.0.0.1:0",
    }
    with open(f"{base}/config.yaml", "w") as f:
        yaml.safe_dump(cfg, f)
    netns.cgroup_create(cgroup)
    if mode == "iptables-legacy":  # a rule in the legacy backend makes the daemon's detection pick it
        netns.nsenter(ns, ["iptables-legacy", "-A", "INPUT", "-m", "comment", "--comment", "legacy", "-j", "ACCEPT"])
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
        if api is not None:
            api.stop()
        netns.nsenter(ns, [sys.executable, "-m", "noded", "cleanup", "-c", f"{base}/config.yaml"], capture_output=True)
        netns.remove(ns)
        netns.cgroup_remove_tree(cgroup)
        subprocess.run(["rm", "-rf", base])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="1000,10000")
    p.add_argument("--modes", default="ebpf,nftables,iptables")
    p.add_argument("--endpoints", type=int, default=10)
    p.add_argument("--changes", type=int, default=100)
    a = p.parse_args()
    rows = []
    for n in [int(x) for x in a.sizes.split(",")]:
        for mode in a.modes.split(","):
            r = in_process(mode, n, a.endpoints, a.changes)
            d = daemon(mode, n, a.endpoints)
            dj = daemon(mode, n, a.endpoints, "json")
            da = daemon(mode, n, a.endpoints, "api")
            rows.append(
                [
                    mode,
                    f"{n} x {a.endpoints}",
                    f"{r['model_s']:.2f}",
                    f"{r['program_s']:.2f}",
                    f"{r['lat_p50_ms']:.2f}",
                    f"{r['lat_p99_ms']:.2f}",
                    f"{r['grow_p50_ms']:.2f} / {r['grow_p99_ms']:.2f}",
                    f"{d['cold_start_s']:.2f}",
                    f"{dj['cold_start_s']:.2f}",
                    f"{da['cold_start_s']:.2f}",
                    f"{d['rss_mib']:.0f}",
                    f"{dj['rss_mib']:.0f}",
                    f"{da['rss_mib']:.0f}",
                ]
            )
            print(rows[-1], file=sys.stderr, flush=True)
    print(
        table(
            "control plane per mode: full sync from scratch, one EndpointSlice change, a real daemon",
            [
                "mode",
                "services x endpoints",
                "model s",
                "full sync s",
                "change p50 ms",
                "change p99 ms",
                "one endpoint more p50 / p99 ms",
                "daemon cold start s (YAML)",
                "(JSON)",
                "(API list)",
                "daemon RSS MiB (YAML)",
                "(JSON)",
                "(API list)",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
