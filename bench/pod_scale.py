"""Cluster scale of the Pod watch (issue 19), side by side in one run: what one node receives from the
API server, and what it costs the node, with every node watching every Pod (before) and with its own
Pods by field selector plus the CA node's workload stream (after: noded/tunnel/workloads.py).

The test API server (tests/fakeapi.py, the real list/watch protocol) holds `--pods` pods (150,000) spread
over `--nodes` nodes (5,000), each a Deployment pod as the API server sends it (labels, owner, two
containers, status, managedFields: ~3.9 KiB of JSON). Once the measured node has synced, `--rate` pod
changes a second (100) for `--seconds`: four in five a status update (a condition's time, an annotation),
one in five a pod replaced (deleted, a new one with a new address on the same node), as a rollout does.
Each role is a process of its own running noded's real parts (the Kubernetes source, the enrollment the
tunnel reads, the CA service and its workload stream): its CPU from /proc, its RSS, the bytes the API
server sent it (counted there, by field selector) and the stream's bytes. The CA node, which watches every
Pod in the after case as istiod does, is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import rss_mib, table

NODE = "node-00001"
TD = "cluster.local"


def make_pod(i: int, node: str, rng: random.Random, generation: int = 0) -> dict:
    app = f"app-{i // 30 % 500:03d}"
    name = f"{app}-7f9c{i % 977:03x}d5b-{i:06x}{generation:x}"
    ip = f"10.{64 + i // 65000}.{i // 250 % 256}.{i % 250 + 2}"
    stamp = f"2026-12-06T10:{rng.randrange(60):02d}:{rng.randrange(60):02d}Z"
    container = {
        "name": "app",
        "image": f"registry.example.com/{app}:1.{i % 40}.3",
        "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
        "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "POD_NAME", "valueFrom": {"fieldRef": {}}}],
        "volumeMounts": [
            {"mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "name": "kube-api-access", "readOnly": True}
        ],
        "terminationMessagePath": "/dev/termination-log",
        "imagePullPolicy": "IfNotPresent",
    }
    sidecar = {**container, "name": "log-shipper", "image": "registry.example.com/shipper:2.1.0", "ports": []}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": f"team-{i % 40:02d}",
            "uid": f"{rng.getrandbits(128):032x}",
            "creationTimestamp": stamp,
            "generateName": f"{app}-7f9c{i % 977:03x}d5b-",
            "labels": {"app": app, "pod-template-hash": f"7f9c{i % 977:03x}d5b", "version": "v1"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": stamp},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": f"{app}-7f9c{i % 977:03x}d5b",
                    "uid": f"{rng.getrandbits(128):032x}",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
            "managedFields": [
                {
                    "manager": "kube-controller-manager",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "time": stamp,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app": {}}}},
                },
                {
                    "manager": "kubelet",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "time": stamp,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:status": {"f:conditions": {}, "f:podIP": {}, "f:podIPs": {}}},
                    "subresource": "status",
                },
            ],
        },
        "spec": {
            "containers": [container, sidecar],
            "nodeName": node,
            "serviceAccountName": app,
            "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst",
            "schedulerName": "default-scheduler",
            "terminationGracePeriodSeconds": 30,
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"},
            ],
            "volumes": [{"name": "kube-api-access", "projected": {"defaultMode": 420, "sources": []}}],
        },
        "status": {
            "phase": "Running",
            "hostIP": f"172.16.{i // 30 // 250}.{i // 30 % 250 + 2}",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": stamp,
            "qosClass": "Burstable",
            "conditions": [
                {"type": t, "status": "True", "lastTransitionTime": stamp}
                for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")
            ],
            "containerStatuses": [
                {
                    "name": c["name"],
                    "ready": True,
                    "restartCount": 0,
                    "image": c["image"],
                    "imageID": f"{c['image']}@sha256:{rng.getrandbits(256):064x}",
                    "containerID": f"containerd://{rng.getrandbits(256):064x}",
                    "started": True,
                    "state": {"running": {"startedAt": stamp}},
                }
                for c in (container, sidecar)
            ],
        },
    }


# -- the roles, each a process -------------------------------------------------------------------
class _Sink:
    """What noded's hub (noded/model/hub.py) does with Pods and Namespaces: the enrollment; counted."""

    def __init__(self, enrollment) -> None:
        self.enrollment = enrollment
        self.objects = 0

    def upsert(self, obj: dict) -> bool:
        self.objects += 1
        return self.enrollment.upsert(obj)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self.objects += 1
        self.enrollment.delete(kind, namespace, name)

    def synced(self, _source: str) -> None:
        pass


def role(args: argparse.Namespace) -> None:
    import asyncio
    import logging

    import structlog

    # stdout carries the reports; noded's log (warnings up) goes to stderr
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
    )

    from noded.model.pods import Enrollment
    from noded.sources.kube import KubeSource
    from noded.sources.kubeclient import ApiClient

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    node = "ca-node" if args.role == "ca" else NODE
    enrollment = Enrollment(node, remote_from_stream=args.role == "own")
    sink = _Sink(enrollment)
    api = ApiClient(args.api)
    source = KubeSource(api, sink, kinds=("Pod", "Namespace"), node_name=node, own_pods_only=args.role == "own")
    source.start()
    stream = feed = None
    out: dict = {}
    if args.role in ("ca", "own"):
        from noded.tunnel.ca import CertificateAuthority, Issuer
        from noded.tunnel.caservice import load_credentials, serve
        from noded.tunnel.tls import context
        from noded.tunnel.workloads import WorkloadFeed, WorkloadStream

        certs = args.certs
        with open(f"{certs}/root.pem", "rb") as f:
            root = f.read()
        if args.role == "ca":
            import datetime

            ca = CertificateAuthority.load(f"{certs}/root.pem", f"{certs}/root-key.pem")
            own = load_credentials(f"{certs}/nodes/ca-node.pem", f"{certs}/nodes/ca-node-key.pem")
            feed = WorkloadFeed(enrollment, loop)
            issuer = Issuer(ca, lambda _n: set(), datetime.timedelta(hours=1))
            coro = serve("127.0.0.1", 0, issuer, own, root, f"{certs}/keys-ca", feed=feed)
            server = asyncio.run_coroutine_threadsafe(coro, loop).result()
            out["port"] = server.sockets[0].getsockname()[1]
        else:
            creds = load_credentials(f"{certs}/nodes/{NODE}.pem", f"{certs}/nodes/{NODE}-key.pem")
            ctx = context(False, creds, root, f"{certs}/keys-node")
            stream = WorkloadStream(("127.0.0.1", args.ca_port), lambda: ctx, TD, enrollment)
            running = asyncio.run_coroutine_threadsafe(stream.run(), loop)  # noqa: F841  (held: tasks are weak)
    started = time.monotonic()
    while not (source.kind_synced("Pod") and source.kind_synced("Namespace") and enrollment.remote_synced):
        time.sleep(0.05)
    print(json.dumps({"synced": round(time.monotonic() - started, 2), **out}), flush=True)
    for line in sys.stdin:
        if line.strip() != "report":
            continue
        report = {"objects": sink.objects, "pods": len(enrollment.snapshot())}
        if stream is not None:
            report.update(stream_bytes=stream.counts["bytes"], stream_lines=stream.counts["lines"])
        if feed is not None:
            report.update(feed_bytes=feed.counts["bytes"], feed_lines=feed.counts["lines"])
        print(json.dumps(report), flush=True)


# -- the parent: API server, churn, measures ---------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Role:
    def __init__(self, name: str, api: str, certs: str = "", ca_port: int = 0) -> None:
        argv = [sys.executable, os.path.abspath(__file__), "role", "--role", name, "--api", api]
        if certs:
            argv += ["--certs", certs, "--ca-port", str(ca_port)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = json.loads(self.proc.stdout.readline())

    def report(self) -> dict:
        self.proc.stdin.write("report\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def rss(self) -> float:
        return rss_mib(self.proc.pid)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Churn:
    """`rate` pod changes a second, on a thread, until stopped."""

    def __init__(self, api, pods: dict[str, tuple[int, str, dict]], rate: float, seed: int = 7) -> None:
        self.api, self.pods, self.rate = api, pods, rate
        self.rng = random.Random(seed)
        self.changes = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.names = list(pods)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        start = time.monotonic()
        while not self.stop.is_set():
            due = start + self.changes / self.rate
            if due > time.monotonic():
                time.sleep(due - time.monotonic())
            self._change()
            self.changes += 1

    def _change(self) -> None:
        rng = self.rng
        slot = rng.randrange(len(self.names))
        name = self.names[slot]
        i, node, obj = self.pods[name]
        if self.changes % 5 == 4:  # replaced: a new pod (name, address) on the same node
            self.api.remove("Pod", obj["metadata"]["namespace"], name)
            new = make_pod(i, node, rng, generation=self.changes)
            new["status"]["podIP"] = new["status"]["podIPs"][0]["ip"] = (
                f"10.200.{self.changes // 250 % 256}.{self.changes % 250 + 2}"
            )
            del self.pods[name]
            self.pods[new["metadata"]["name"]] = (i, node, new)
            self.names[slot] = new["metadata"]["name"]
            self.api.put(new)
            return
        obj = json.loads(json.dumps(obj))  # a status update: a condition's time, an annotation
        stamp = f"2026-12-06T11:{rng.randrange(60):02d}:{rng.randrange(60):02d}Z"
        obj["status"]["conditions"][1]["lastTransitionTime"] = stamp
        obj["metadata"]["annotations"]["noded.bench/seen"] = stamp
        self.pods[name] = (i, node, obj)
        self.api.put(obj)


def measure(api, role: Role, churn_rate: float, seconds: float, pods, bytes_key, extra_bytes=None) -> dict:
    sent0 = sum(api.bytes_sent[k] for k in bytes_key)
    report0 = role.report()
    cpu0 = role.cpu()
    churn = Churn(api, pods, churn_rate)
    started = time.monotonic()
    churn.start()
    time.sleep(seconds)
    churn.stop.set()
    churn.thread.join()
    time.sleep(1.0)  # the last events delivered
    elapsed = time.monotonic() - started
    report1 = role.report()
    cpu1 = role.cpu()
    api_bytes = sum(api.bytes_sent[k] for k in bytes_key) - sent0
    stream_bytes = (report1.get("stream_bytes", 0) - report0.get("stream_bytes", 0)) if extra_bytes else 0
    objects = report1["objects"] - report0["objects"] + report1.get("stream_lines", 0) - report0.get("stream_lines", 0)
    return {
        "changes_per_s": churn.changes / (elapsed - 1.0),
        "bytes_per_s": (api_bytes + stream_bytes) / elapsed,
        "api_bytes_per_s": api_bytes / elapsed,
        "stream_bytes_per_s": stream_bytes / elapsed,
        "objects_per_s": objects / elapsed,
        "cpu_pct": (cpu1 - cpu0) / elapsed * 100,
        "rss": role.rss(),
        "pods_held": report1["pods"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd")
    r = sub.add_parser("role")
    r.add_argument("--role", choices=("all", "own", "ca"), required=True)
    r.add_argument("--api", required=True)
    r.add_argument("--certs", default="")
    r.add_argument("--ca-port", type=int, default=0)
    parser.add_argument("--pods", type=int, default=150_000)
    parser.add_argument("--nodes", type=int, default=5_000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    if args.cmd == "role":
        role(args)
        return

    from noded.tunnel.ca import CertificateAuthority, write_root
    from noded.tunnel.caservice import node_credentials
    from tests.fakeapi import FakeApiServer

    rng = random.Random(1)
    api = FakeApiServer()
    started = time.monotonic()
    pods: dict[str, tuple[int, str, dict]] = {}
    objects = []
    for i in range(args.pods):
        node = f"node-{i % args.nodes:05d}"
        obj = make_pod(i, node, rng)
        pods[obj["metadata"]["name"]] = (i, node, obj)
        objects.append(obj)
    namespaces = [{"kind": "Namespace", "metadata": {"name": f"team-{n:02d}", "labels": {}}} for n in range(40)]
    api.load(objects + namespaces)
    size = sum(len(json.dumps(o)) for o in objects[:200]) / 200
    print(
        f"{args.pods:,} pods over {args.nodes:,} nodes ({size / 1024:.1f} KiB each) made in "
        f"{time.monotonic() - started:.1f} s",
        flush=True,
    )
    api.start()
    pod_path = "/api/v1/pods"
    results = {}
    with tempfile.TemporaryDirectory() as certs:
        ca = CertificateAuthority.load(*write_root(certs, TD))  # root.pem, root-key.pem
        for name in ("ca-node", NODE):
            node_credentials(ca, name, f"{certs}/nodes")

        # before: the measured node watches every Pod
        before = api.bytes_sent[(pod_path, "")]
        node = Role("all", api.url)
        sync = {"seconds": node.ready["synced"], "bytes": api.bytes_sent[(pod_path, "")] - before}
        results["before"] = {**measure(api, node, args.rate, args.seconds, pods, [(pod_path, "")]), "sync": sync}
        node.stop()

        # after: the CA node watches every Pod; the measured node its own, and the CA node's stream
        ca_role = Role("ca", api.url, certs)
        own_key = (pod_path, f"spec.nodeName={NODE}")
        before = api.bytes_sent[own_key]
        node = Role("own", api.url, certs, ca_role.ready["port"])
        first = node.report()
        sync = {"seconds": node.ready["synced"], "bytes": api.bytes_sent[own_key] - before + first["stream_bytes"]}
        ca_cpu0, ca_feed0 = ca_role.cpu(), ca_role.report()["feed_bytes"]
        t0 = time.monotonic()
        results["after"] = {**measure(api, node, args.rate, args.seconds, pods, [own_key], True), "sync": sync}
        elapsed = time.monotonic() - t0
        results["ca"] = {
            "cpu_pct": (ca_role.cpu() - ca_cpu0) / elapsed * 100,
            "rss": ca_role.rss(),
            "feed_bytes_per_s": (ca_role.report()["feed_bytes"] - ca_feed0) / elapsed,
        }
        node.stop()
        ca_role.stop()
    api.stop()

    b, a, c = results["before"], results["after"], results["ca"]
    rows = [
        [
            "initial sync: bytes received",
            f"{b['sync']['bytes'] / 2**20:,.1f} MiB",
            f"{a['sync']['bytes'] / 2**20:,.2f} MiB",
        ],
        ["initial sync: seconds", f"{b['sync']['seconds']:.1f}", f"{a['sync']['seconds']:.1f}"],
        ["pod changes in the cluster per second", f"{b['changes_per_s']:.0f}", f"{a['changes_per_s']:.0f}"],
        [
            "bytes received per second (API + stream)",
            f"{b['bytes_per_s'] / 1024:,.1f} KiB",
            f"{a['api_bytes_per_s'] / 1024:,.2f} + {a['stream_bytes_per_s'] / 1024:,.2f} KiB",
        ],
        ["objects received per second", f"{b['objects_per_s']:.1f}", f"{a['objects_per_s']:.1f}"],
        ["pods held", f"{b['pods_held']:,}", f"{a['pods_held']:,}"],
        ["RSS", f"{b['rss']:.0f} MiB", f"{a['rss']:.0f} MiB"],
        ["CPU (% of a core) during the churn", f"{b['cpu_pct']:.1f}", f"{a['cpu_pct']:.1f}"],
    ]
    print(
        table(
            f"One node at {args.pods:,} pods, {args.rate:.0f} pod changes/s",
            ["", "before: every Pod", "after: own Pods + CA stream"],
            rows,
        )
    )
    fleet_before = b["bytes_per_s"] * args.nodes
    fleet_after = a["api_bytes_per_s"] * args.nodes + b["bytes_per_s"]  # the CA node watches every Pod
    print(
        f"\nthe CA node (after): {c['cpu_pct']:.1f} % of a core, {c['rss']:.0f} MiB, "
        f"{c['feed_bytes_per_s'] / 1024:.2f} KiB/s to this node"
    )
    print(
        f"API server watch egress for Pods at {args.nodes:,} nodes, from these rates: "
        f"before {fleet_before / 2**20:,.0f} MiB/s, after {fleet_after / 2**20:,.2f} MiB/s"
    )


if __name__ == "__main__":
    main()
