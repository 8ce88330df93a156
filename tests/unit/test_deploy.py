"""What ships in deploy/: the systemd unit passes `systemd-analyze verify` as `noded install` writes it,
install/uninstall reverse each other, and the DaemonSet manifest validates against the Kubernetes client's
models (every field known, required fields present)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
import yaml
from kubernetes import client

from noded import config, install

DEPLOY = os.path.join(os.path.dirname(__file__), "..", "..", "deploy")


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_the_unit_as_installed_passes_systemd_analyze_verify(tmp_path):
    done = install.install(str(tmp_path))
    unit = tmp_path / install.UNIT
    assert str(unit) in done and os.access(tmp_path / install.CNI_PLUGIN, os.X_OK)
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr
    text = unit.read_text()
    assert "Type=notify" in text and re.search(r"^ExecStart=/\S+/noded run", text, re.M)
    installed = config.load(str(tmp_path / install.CONFIG))  # the default config is valid
    assert installed.source.kubeconfig == "/etc/noded/kubeconfig"  # its own identity, never the kubelet's
    assert sorted(install.uninstall(str(tmp_path))) == sorted(done)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_uninstall_keeps_a_config_the_operator_changed(tmp_path):
    install.install(str(tmp_path))
    cfg = tmp_path / install.CONFIG
    cfg.write_text(cfg.read_text() + "clusterDomain: example.internal\n")
    install.uninstall(str(tmp_path))
    assert cfg.exists()


def _check_fields(data, type_name: str, at: str) -> None:
    """Every key is a field of the model (the client itself ignores unknown ones)."""
    if type_name.lower().startswith("list["):
        for i, item in enumerate(data):
            _check_fields(item, type_name[5:-1], f"{at}[{i}]")
        return
    if not re.fullmatch(r"V1\w+", type_name):  # str, int, Dict[...], object
        return
    klass = getattr(client, type_name)
    known = {json_name: attr for attr, json_name in klass.attribute_map.items()}
    assert isinstance(data, dict), f"{at}: expected an object"
    for key, value in data.items():
        assert key in known, f"{at}.{key}: not a field of {type_name}"
        _check_fields(value, klass.openapi_types[known[key]], f"{at}.{key}")


def test_the_daemonset_manifest_validates_against_the_kubernetes_models():
    with open(os.path.join(DEPLOY, "daemonset.yaml")) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    kinds = {d["kind"] for d in docs}
    assert kinds == {
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "DaemonSet",
    }
    api = client.ApiClient()
    for doc in docs:
        type_name = f"V1{doc['kind']}"
        _check_fields(doc, type_name, doc["kind"])
        obj = api.deserialize(json.dumps(doc), type_name, "application/json")  # required fields checked
        assert obj.metadata.name
    daemonset = next(d for d in docs if d["kind"] == "DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] and pod["serviceAccountName"] == "noded"
    # read-only RBAC on exactly what the daemon watches
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    assert {v for rule in role["rules"] for v in rule["verbs"]} == {"list", "watch"}  # read-only, what noded uses
    watched = {r for rule in role["rules"] for r in rule["resources"]}
    assert watched == {
        "services",
        "pods",
        "namespaces",
        "nodes",
        "endpointslices",
        "authorizationpolicies",
        "gateways",
        "httproutes",
    }
    # one ClusterRole for both modes: bound to the DaemonSet's ServiceAccount and the systemd nodes' group
    binding = next(d for d in docs if d["kind"] == "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    subjects = {(s["kind"], s["name"]) for s in binding["subjects"]}
    assert subjects == {("ServiceAccount", "noded"), ("Group", "noded:nodes")}
    # and one namespaced read: its own DaemonSet, by name (uninstall or restart, at shutdown)
    own = next(d for d in docs if d["kind"] == "Role")
    assert own["rules"] == [
        {
            "apiGroups": ["apps"],
            "resources": ["daemonsets"],
            "resourceNames": [daemonset["metadata"]["name"]],
            "verbs": ["get"],
        }
    ]
    ref = f"{daemonset['metadata']['namespace']}/{daemonset['metadata']['name']}"
    for c in pod["containers"]:
        assert {"name": "NODED_DAEMONSET", "value": ref} in c["env"], c["name"]
    # the config it mounts is a valid noded config
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    config.parse(yaml.safe_load(cm["data"]["config.yaml"]))


def test_status_table_names_each_subject():
    from noded.cli import render_status

    text = render_status(
        {
            "node": "node2",
            "pid": 7,
            "running": True,
            "mode": "ebpf",
            "services": 3,
            "endpointSlices": 4,
            "sources": {"kubernetes": {"synced": True, "lastError": None}},
            "attachedPrograms": ["noded_connect4"],
            "dns": {
                "queries": 9,
                "local": 5,
                "upstreams": [{"address": "10.0.0.2:53", "healthy": False}],
                "fastPath": {"answered": 100, "records": 3},
            },
            "tunnel": {
                "issuer": "remote 10.77.0.11:15012",
                "denied": 1,
                "policies": ["default/p"],
                "certificates": [
                    {"identity": "spiffe://cluster.local/ns/default/sa/echo", "notAfter": "2026-11-23T10:24:10+00:00"}
                ],
            },
        }
    )
    lines = dict(line.split(None, 1) for line in text.splitlines())
    assert lines["node"].startswith("node2: running, pid 7")
    assert "kubernetes synced" in lines["sources"] and "3 services, 4 slices" in lines["services"]
    assert "10.0.0.2:53 DOWN" in lines["dns"] and "fast path 100 answered" in lines["dns"]
    assert "1 denied" in lines["tunnel"] and "sa/echo until 2026-11-23T10:24:10Z" in lines["certificate"]


def test_status_shows_rejected_objects_refused_peers_and_socket_termination():
    from noded.cli import render_status

    text = render_status(
        {
            "node": "node1",
            "running": True,
            "rejectedByKind": {"AuthorizationPolicy": 2, "Pod": 1},
            "socketTermination": {"enabled": False, "reason": "kernel without bpf_sock_destroy"},
            "tunnel": {
                "issuer": "local",
                "rejected": {"default/bad": "spec.rules[0]: ..."},
                "refusedPeers": 3,
                "selfCalls": 4,
                "endedConnections": {"ENHANCE_YOUR_CALM": 5},
            },
        }
    )
    assert "rejected      2 AuthorizationPolicy, 1 Pod" in text
    assert "OFF: kernel without bpf_sock_destroy" in text
    assert "1 failing closed" in text and "3 peers, 4 self-calls, 5 HBONE connections ended" in text
