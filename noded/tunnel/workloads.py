"""Other nodes' pods for the tunnel, served by the CA node as istiod serves workloads to ztunnels.

Why: with every node watching every Pod, the API server sends each pod change to all N nodes, whole
(4-8 KiB a pod), and every node holds every pod; at 5,000 nodes and 150,000 pods that is what hurts. The
tunnel needs little of a remote pod: its addresses, node, service account, workload name and the labels
that decide enrollment and telemetry names. So a node with `tunnel.caAddress` watches only its own Pods
(field selector `spec.nodeName`) and gets the rest from the CA node, which watches every Pod anyway (its
Issuer checks which node runs which service account), as these facts, about 200 bytes a pod. The API
server's load no longer grows with nodes × pods; the CA node's does, as istiod's does. The stream rides the
CA service's mutual TLS (node certificates both ways), so a workload fact comes from the CA node or not at
all. A metadata-only Pod watch was the other choice: it carries no addresses, node or service account.

The protocol: the node sends `{"workloads": true}`; the CA node answers one JSON line per pod
(`{"w": [namespace, name, node, serviceAccount, workload, hostNetwork, [ips], {labels}]}`), then
`{"synced": count}`, then a line per change (`{"w": ...}`, or `{"gone": [namespace, name]}`). A node
that falls QUEUE lines behind is dropped and connects again for a new snapshot (a watch's 410). Lines
from the stream are checked like any input: a malformed one is counted and skipped, never applied.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
import time
from collections.abc import Callable

import structlog

from noded.model.pods import LABEL, Enrollment, PodInfo, PodKey
from noded.tunnel.caservice import node_of

log = structlog.get_logger("noded.tunnel.workloads")

REQUEST = b'{"workloads": true}\n'
MAX_LINE = 64 * 1024
QUEUE = 65536  # changes a node may lag behind before it is dropped (it reconnects and takes a snapshot)
SNAPSHOT_BATCH = 2048  # lines written between drains
MAX_BACKOFF = 30.0
# the labels a node needs of another node's pod: enrollment, and the telemetry's canonical names
TUNNEL_LABELS = frozenset(
    (
        LABEL,
        "service.istio.io/canonical-name",
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/name",
        "app.kubernetes.io/version",
        "app",
        "version",
    )
)
MAX_NAME = 253
MAX_IPS = 8


def encode(key: PodKey, info: PodInfo | None) -> bytes:
    """A pod's line (None: gone)."""
    if info is None:
        return json.dumps({"gone": list(key)}, separators=(",", ":")).encode() + b"\n"
    labels = {k: v for k, v in info.labels.items() if k in TUNNEL_LABELS}
    fact = [key[0], key[1], info.node, info.account, info.workload, info.host_network, list(info.ips), labels]
    return json.dumps({"w": fact}, separators=(",", ":")).encode() + b"\n"


def _name(value: object) -> str:
    if not isinstance(value, str) or len(value) > MAX_NAME:
        raise ValueError(f"not a name: {str(value)[:40]!r}")
    return value


def decode(line: bytes) -> tuple[str, object]:
    """("pod", (key, PodInfo)), ("gone", key) or ("synced", count); ValueError for anything else."""
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(msg, dict) or len(msg) != 1:
        raise ValueError("a line is a JSON object with one field")
    if "w" in msg:
        fact = msg["w"]
        if not isinstance(fact, list) or len(fact) != 8:
            raise ValueError("w: 8 fields")
        namespace, name, node, account, workload = (_name(v) for v in fact[:5])
        host, ips, labels = fact[5], fact[6], fact[7]
        if not namespace or not name or not isinstance(host, bool):
            raise ValueError("w: namespace, name and hostNetwork")
        if (
            not isinstance(ips, list)
            or len(ips) > MAX_IPS
            or not all(isinstance(ip, str) and len(ip) <= 45 for ip in ips)
        ):
            raise ValueError("w: ips")
        if not isinstance(labels, dict) or not all(
            k in TUNNEL_LABELS and isinstance(v, str) and len(v) <= 63 for k, v in labels.items()
        ):
            raise ValueError("w: labels")
        info = PodInfo(
            _shared_labels(labels),
            host,
            False,
            sys.intern(node),
            () if host else tuple(ips),
            sys.intern(account or "default"),
            sys.intern(workload),
        )
        return "pod", ((sys.intern(namespace), name), info)
    if "gone" in msg:
        key = msg["gone"]
        if not isinstance(key, list) or len(key) != 2:
            raise ValueError("gone: [namespace, name]")
        return "gone", (_name(key[0]), _name(key[1]))
    if "synced" in msg and isinstance(msg["synced"], int):
        return "synced", msg["synced"]
    raise ValueError(f"unknown line {next(iter(msg))!r}")


_LABEL_SETS: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}
MAX_LABEL_SETS = 65536


def _shared_labels(labels: dict[str, str]) -> dict[str, str]:
    """One dict for each distinct label set (a Deployment's pods share theirs): 150,000 pods hold a few
    thousand dicts, not 150,000. Never mutated (PodInfo's labels are read only)."""
    key = tuple(sorted(labels.items()))
    found = _LABEL_SETS.get(key)
    if found is None:
        if len(_LABEL_SETS) >= MAX_LABEL_SETS:
            return {sys.intern(k): v for k, v in key}
        found = _LABEL_SETS[key] = {sys.intern(k): sys.intern(v) for k, v in key}
    return found


class WorkloadFeed:
    """The CA node's side: every pod's facts, a snapshot then each change, to each node that asks."""

    def __init__(self, enrollment: Enrollment, loop: asyncio.AbstractEventLoop) -> None:
        self.enrollment = enrollment
        self.loop = loop
        self.subscribers: dict[str, asyncio.Queue[bytes | None]] = {}  # node -> its pending lines
        self.counts = {"subscribed": 0, "dropped": 0, "lines": 0, "bytes": 0}
        enrollment.listeners.append(self._changed)

    def _changed(self, key: PodKey, info: PodInfo | None) -> None:
        """From whichever thread changed the enrollment: encoded there, queued on the loop."""
        if self.subscribers:
            line = encode(key, info)
            self.loop.call_soon_threadsafe(self._publish, line)

    def _publish(self, line: bytes) -> None:
        for node, queue in list(self.subscribers.items()):
            try:
                queue.put_nowait(line)
            except asyncio.QueueFull:  # too far behind: dropped; it connects again for a snapshot
                self.counts["dropped"] += 1
                log.warning("workload stream subscriber too slow, dropped", node=node)
                self.subscribers.pop(node, None)
                _end(queue)

    async def serve(self, writer: asyncio.StreamWriter, node: str) -> None:
        """One node's stream, until it goes (or falls behind)."""
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE)
        old = self.subscribers.get(node)
        if old is not None:  # the node connected again: its older stream ends
            _end(old)
        self.subscribers[node] = queue  # first: no change is missed while the snapshot is made
        self.counts["subscribed"] += 1
        try:
            pods = self.enrollment.snapshot()
            lines = await asyncio.get_running_loop().run_in_executor(None, lambda: [encode(k, p) for k, p in pods])
            for i in range(0, len(lines), SNAPSHOT_BATCH):
                self._write(writer, b"".join(lines[i : i + SNAPSHOT_BATCH]), min(SNAPSHOT_BATCH, len(lines) - i))
                await writer.drain()
            self._write(writer, b'{"synced":%d}\n' % len(lines), 1)
            await writer.drain()
            while True:
                line = await queue.get()
                batch = [line]
                while not queue.empty() and len(batch) < SNAPSHOT_BATCH:
                    batch.append(queue.get_nowait())
                if None in batch:
                    return
                self._write(writer, b"".join(batch), len(batch))
                await writer.drain()
        finally:
            if self.subscribers.get(node) is queue:
                del self.subscribers[node]

    def _write(self, writer: asyncio.StreamWriter, data: bytes, lines: int) -> None:
        writer.write(data)
        self.counts["lines"] += lines
        self.counts["bytes"] += len(data)

    def status(self) -> dict:
        return {**self.counts, "nodes": sorted(self.subscribers)}


def _end(queue: asyncio.Queue[bytes | None]) -> None:
    """Tell a subscriber's stream to end (a line dropped to make room: it is ending anyway)."""
    if queue.full():
        queue.get_nowait()
    queue.put_nowait(None)


class WorkloadStream:
    """A node's side: the CA node's stream kept open (reconnecting with backoff), applied to this node's
    Enrollment as the other nodes' pods."""

    def __init__(
        self,
        address: tuple[str, int],
        context: Callable[[], ssl.SSLContext],
        trust_domain: str,
        enrollment: Enrollment,
    ) -> None:
        self.address = address
        self.context = context  # the node certificate's current client context (it is renewed)
        self.trust_domain = trust_domain
        self.enrollment = enrollment
        self.connected = False
        self.counts = {"connects": 0, "lines": 0, "bytes": 0, "rejected": 0, "snapshots": 0}
        self.last_error: str | None = None
        self.synced_at: float | None = None

    async def run(self) -> None:
        backoff = 0.5
        while True:
            started = time.monotonic()
            try:
                await self._once()
                self.last_error = "the CA node closed the stream"
            except (OSError, ValueError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
                self.last_error = f"{type(e).__name__}: {e}"[:300]
            self.connected = False
            log.warning("workload stream lost, connecting again", error=self.last_error, retry_in=backoff)
            if time.monotonic() - started > 60:
                backoff = 0.5  # it had worked a while
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _once(self) -> None:
        host, port = self.address
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=self.context(), server_hostname=host, limit=MAX_LINE), 10
        )
        try:
            node_of(writer.get_extra_info("peercert"), self.trust_domain)  # the CA service is a node
            self.counts["connects"] += 1
            self.connected = True
            writer.write(REQUEST)
            snapshot: dict[PodKey, PodInfo] | None = {}
            while line := await reader.readline():
                self.counts["lines"] += 1
                self.counts["bytes"] += len(line)
                try:
                    what, value = decode(line)
                except ValueError as e:
                    self.counts["rejected"] += 1
                    log.warning("workload line rejected", error=str(e))
                    continue
                if snapshot is not None:  # the snapshot: applied whole once complete
                    if what == "pod":
                        key, info = value
                        snapshot[key] = info
                    elif what == "gone":
                        snapshot.pop(value, None)
                    else:
                        pods, snapshot = snapshot, None
                        await asyncio.get_running_loop().run_in_executor(None, self.enrollment.replace_remote, pods)
                        self.counts["snapshots"] += 1
                        self.synced_at = time.time()
                        log.info("workload stream synced", workloads=len(pods))
                elif what == "pod":
                    self.enrollment.set_remote(*value)
                elif what == "gone":
                    self.enrollment.set_remote(value, None)
        finally:
            writer.close()

    def status(self) -> dict:
        return {
            "address": f"{self.address[0]}:{self.address[1]}",
            "connected": self.connected,
            "synced": self.enrollment.remote_synced,
            **self.counts,
            "lastError": self.last_error,
        }
