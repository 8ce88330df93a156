"""Other nodes' pods from the CA node (issue 19, cluster scale): the workload stream over the CA service's
real mutual TLS, from the CA node's Enrollment into a node's; only node certificates on either end;
hostile lines skipped; a node that falls behind dropped and back with a new snapshot."""

from __future__ import annotations

import asyncio
import datetime
import json

import pytest

from noded.model.pods import Enrollment, PodInfo
from noded.tunnel import ca as ca_mod
from noded.tunnel import workloads
from noded.tunnel.ca import CertificateAuthority, Issuer, create_root
from noded.tunnel.caservice import load_credentials, node_credentials, serve
from noded.tunnel.tls import context
from noded.tunnel.workloads import WorkloadFeed, WorkloadStream, decode, encode
from tests.unit.test_tunnel_caservice import fake_ca
from tests.unit.test_tunnel_identity import ECHO, TD, workload


def pod(name: str, node: str, ip: str, namespace: str = "default", ambient: bool = True, **labels: str) -> dict:
    meta = {"name": name, "namespace": namespace, "labels": {**labels}}
    if ambient:
        meta["labels"]["istio.io/dataplane-mode"] = "ambient"
    return {
        "kind": "Pod",
        "metadata": meta,
        "spec": {"nodeName": node, "serviceAccountName": f"sa-{name}"},
        "status": {"podIPs": [{"ip": ip}]},
    }


def test_a_pod_line_round_trips_with_only_what_the_tunnel_needs():
    info = PodInfo(
        {"istio.io/dataplane-mode": "ambient", "app": "echo", "pod-template-hash": "abc", "team": "x" * 60},
        False,
        True,
        "node2",
        ("10.244.2.7", "fd00::7"),
        "echo",
        "echo",
    )
    what, (key, got) = decode(encode(("default", "echo-1"), info))
    assert what == "pod" and key == ("default", "echo-1")
    assert got.labels == {"istio.io/dataplane-mode": "ambient", "app": "echo"}  # the rest stays home
    assert (got.node, got.ips, got.account, got.workload, got.local) == ("node2", info.ips, "echo", "echo", False)
    assert decode(encode(("default", "echo-1"), None)) == ("gone", ("default", "echo-1"))
    assert decode(b'{"synced":3}\n') == ("synced", 3)


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"[]",
        b'{"w": [], "gone": []}',
        b'{"w": ["default", "p", "n", "sa", "w", false, ["10.0.0.1"]]}',  # 7 fields
        b'{"w": ["", "p", "n", "sa", "w", false, [], {}]}',  # no namespace
        b'{"w": ["default", "p", "n", "sa", "w", "no", [], {}]}',  # hostNetwork not a bool
        b'{"w": ["default", "p", "n", "sa", "w", false, ["1","2","3","4","5","6","7","8","9"], {}]}',
        b'{"w": ["default", "p", "n", "sa", "w", false, [1], {}]}',
        b'{"w": ["default", "p", "n", "sa", "w", false, [], {"other": "label"}]}',
        b'{"w": ["default", "p", "n", "sa", "w", false, [], {"app": 5}]}',
        b'{"gone": ["default"]}',
        b'{"synced": "yes"}',
        b'{"delete": ["default", "p"]}',
        json.dumps({"w": ["x" * 300, "p", "n", "sa", "w", False, [], {}]}).encode(),
    ],
)
def test_a_malformed_line_is_refused(line):
    with pytest.raises(ValueError):
        decode(line)


def test_remote_pods_come_from_the_stream_and_local_ones_from_the_source():
    enrollment = Enrollment("node2", remote_from_stream=True)
    assert not enrollment.remote_synced
    enrollment.upsert(pod("mine", "node2", "10.244.2.5"))
    enrollment.upsert(pod("theirs", "node1", "10.244.1.5"))  # from the source: not taken
    assert enrollment.workload_at("10.244.1.5") is None
    _, (key, info) = decode(encode(("default", "theirs"), PodInfo({}, False, False, "node1", ("10.244.1.9",), "x")))
    enrollment.replace_remote({key: info})
    assert enrollment.remote_synced and enrollment.workload_at("10.244.1.9") == key
    # the stream cannot override this node's own pods, nor remove them
    _, (_, fake) = decode(encode(("default", "mine"), PodInfo({}, False, False, "node1", ("10.244.1.66",), "x")))
    enrollment.set_remote(("default", "mine"), fake)
    enrollment.set_remote(("default", "mine"), None)
    assert enrollment.workload_at("10.244.2.5") == ("default", "mine")
    enrollment.replace_remote({})  # a new snapshot without it: gone
    assert enrollment.workload_at("10.244.1.9") is None
    assert enrollment.pod(("default", "mine")) is not None


def _setup(tmp_path):
    ca = CertificateAuthority(*create_root(TD))
    root = ca_mod.cert_pem(ca.root)
    keys = str(tmp_path / "keys")
    own = load_credentials(*node_credentials(ca, "ca-node", str(tmp_path / "nodes")))
    node2 = load_credentials(*node_credentials(ca, "node2", str(tmp_path / "nodes")))
    issuer = Issuer(ca, lambda _node: set(), ttl=datetime.timedelta(hours=1))
    return ca, root, keys, own, node2, issuer


async def _until(predicate, seconds: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_the_ca_node_streams_every_pod_and_each_change_to_a_node(tmp_path):
    _ca, root, keys, own, node2, issuer = _setup(tmp_path)
    central = Enrollment("ca-node")  # watches every pod, as the CA node does
    central.upsert({"kind": "Namespace", "metadata": {"name": "default", "labels": {}}})
    central.upsert(pod("a", "node1", "10.244.1.2"))
    central.upsert(pod("b", "node2", "10.244.2.2"))  # node2's own: its source tells it, not the stream
    central.upsert(pod("c", "node1", "10.244.1.3", ambient=False))

    async def main():
        feed = WorkloadFeed(central, asyncio.get_running_loop())
        server = await serve("127.0.0.1", 0, issuer, own, root, keys, feed=feed)
        node = Enrollment("node2", remote_from_stream=True)
        node.upsert({"kind": "Namespace", "metadata": {"name": "default", "labels": {}}})
        stream = WorkloadStream(
            ("127.0.0.1", server.sockets[0].getsockname()[1]), lambda: context(False, node2, root, keys), TD, node
        )
        task = asyncio.ensure_future(stream.run())
        await _until(lambda: node.remote_synced)
        assert node.workload_at("10.244.1.2") == ("default", "a") and node.enrolled("default", "a")
        assert node.workload_at("10.244.1.3") == ("default", "c") and not node.enrolled("default", "c")
        assert node.workload_at("10.244.2.2") is None  # its own pods are its source's
        central.upsert(pod("d", "node3", "10.244.3.4"))  # changes, from the CA node's source thread
        await asyncio.get_running_loop().run_in_executor(None, central.delete, "Pod", "default", "a")
        await _until(lambda: node.workload_at("10.244.3.4") == ("default", "d"))
        await _until(lambda: node.workload_at("10.244.1.2") is None)
        assert node.pod(("default", "d")).account == "sa-d"
        assert feed.status()["nodes"] == ["node2"] and stream.status()["rejected"] == 0
        task.cancel()
        server.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_node_too_far_behind_is_dropped_and_comes_back_with_a_snapshot(tmp_path, monkeypatch):
    monkeypatch.setattr(workloads, "QUEUE", 4)
    monkeypatch.setattr(workloads, "MAX_BACKOFF", 0.2)
    _ca, root, keys, own, node2, issuer = _setup(tmp_path)
    central = Enrollment("ca-node")

    async def main():
        feed = WorkloadFeed(central, asyncio.get_running_loop())
        server = await serve("127.0.0.1", 0, issuer, own, root, keys, feed=feed)
        node = Enrollment("node2", remote_from_stream=True)
        stream = WorkloadStream(
            ("127.0.0.1", server.sockets[0].getsockname()[1]), lambda: context(False, node2, root, keys), TD, node
        )
        task = asyncio.ensure_future(stream.run())
        await _until(lambda: node.remote_synced)
        for i in range(50):  # 50 changes at once: past the queue of 4
            central.upsert(pod(f"p{i}", "node1", f"10.244.1.{i + 10}"))
        await _until(lambda: feed.counts["dropped"] >= 1)
        await _until(lambda: all(node.workload_at(f"10.244.1.{i + 10}") for i in range(50)))
        assert stream.counts["snapshots"] >= 2 and stream.counts["connects"] >= 2
        task.cancel()
        server.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_stream_from_no_node_or_with_garbage_is_not_believed(tmp_path):
    """A CA address answering with a workload's certificate is refused before any line is read; lines that
    do not parse are counted and skipped, the good ones applied."""
    ca, root, keys, _own, node2, _issuer = _setup(tmp_path)

    async def main():
        server, address = await fake_ca(workload(ca, ECHO), root, keys, lambda req: {"w": []})
        node = Enrollment("node2", remote_from_stream=True)
        stream = WorkloadStream(address, lambda: context(False, node2, root, keys), TD, node)
        with pytest.raises(ValueError, match="is not a node identity"):
            await stream._once()
        server.close()
        ca_node = load_credentials(*node_credentials(ca, "ca-node", str(tmp_path / "nodes")))

        async def handle(reader, writer):
            await reader.readline()
            good = encode(("default", "x"), PodInfo({}, False, False, "node1", ("10.244.1.8",), "sa"))
            writer.write(b'{"w": ["default"]}\n' + good + b"\xff\xfe\n" + b'{"synced":1}\n')
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context(True, ca_node, root, keys))
        stream = WorkloadStream(
            ("127.0.0.1", server.sockets[0].getsockname()[1]), lambda: context(False, node2, root, keys), TD, node
        )
        await stream._once()
        assert stream.counts["rejected"] == 2 and node.workload_at("10.244.1.8") == ("default", "x")
        server.close()

    asyncio.run(asyncio.wait_for(main(), 30))
