import json
import subprocess
import sys
import time

from noded.cni import install

BRIDGE = {"cniVersion": "1.0.0", "name": "k8s", "type": "bridge", "ipam": {"type": "host-local"}}


def test_a_lone_conf_becomes_a_conflist_and_uninstall_restores_it(tmp_path):
    conf, bins = tmp_path / "net.d", tmp_path / "bin"
    conf.mkdir()
    (conf / "10-bridge.conf").write_text(json.dumps(BRIDGE))
    fake = tmp_path / "noded-cni"
    fake.write_text("#!/bin/sh\n")
    path = install.install(str(conf), str(bins), "/run/noded/noded.sock", executable=str(fake))
    with open(path) as f:
        doc = json.load(f)
    assert path.endswith("10-bridge.conflist") and not (conf / "10-bridge.conf").exists()
    assert [p["type"] for p in doc["plugins"]] == ["bridge", "noded-cni"]
    assert doc["name"] == "k8s" and "name" not in doc["plugins"][0]
    assert (bins / "noded-cni").exists()
    assert install.install(str(conf), str(bins), "/x", executable=str(fake)) == path  # idempotent
    assert install.uninstall(str(conf), str(bins)) == ["10-bridge.conf"]
    assert sorted(p.name for p in conf.iterdir()) == ["10-bridge.conf"]
    assert json.loads((conf / "10-bridge.conf").read_text()) == BRIDGE and not (bins / "noded-cni").exists()


def test_conflist_gets_noded_last_once():
    doc = {"cniVersion": "1.0.0", "name": "k8s", "plugins": [BRIDGE, {"type": "portmap"}, {"type": "noded-cni"}]}
    out = install.chained(doc, {"type": "noded-cni", "socket": "/s"})
    assert [p["type"] for p in out["plugins"]] == ["bridge", "portmap", "noded-cni"]


def test_watch_rechains_after_the_primary_cni_rewrites_its_file(tmp_path):
    conf, bins = tmp_path / "net.d", tmp_path / "bin"
    conf.mkdir()
    (conf / "10-k8s.conflist").write_text(json.dumps({"cniVersion": "1.0.0", "name": "k8s", "plugins": [BRIDGE]}))
    argv = [sys.executable, "-m", "noded", "cni", "install", "--conf-dir", str(conf), "--bin-dir", str(bins), "--watch"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert "chained" in proc.stdout.readline()
        (conf / "10-k8s.conflist").write_text(json.dumps({"cniVersion": "1.0.0", "name": "k8s", "plugins": [BRIDGE]}))
        assert "re-chained" in proc.stdout.readline()
        deadline = time.monotonic() + 5
        while not install.is_chained(json.loads((conf / "10-k8s.conflist").read_text())):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.kill()


def test_watch_survives_a_half_written_conflist_and_chains_it_once_complete(tmp_path):
    """Issue 17, item 8: `cni install --watch` exited when it caught the primary CNI writing its file."""
    conf, bins = tmp_path / "net.d", tmp_path / "bin"
    conf.mkdir()
    whole = json.dumps({"cniVersion": "1.0.0", "name": "k8s", "plugins": [BRIDGE, {"type": "portmap"}]})
    (conf / "10-k8s.conflist").write_text(whole[: len(whole) // 2])  # caught mid-write
    install.watch(str(conf), str(bins), "/run/noded/noded.sock", interval=0.01, rounds=3)  # no exception
    (conf / "10-k8s.conflist").write_text(json.dumps({"plugins": ["not an object"]}))
    install.watch(str(conf), str(bins), "/run/noded/noded.sock", interval=0.01, rounds=2)
    (conf / "10-k8s.conflist").write_text(whole)
    install.watch(str(conf), str(bins), "/run/noded/noded.sock", interval=0.01, rounds=1)
    doc = json.loads((conf / "10-k8s.conflist").read_text())
    assert [p["type"] for p in doc["plugins"]] == ["bridge", "portmap", "noded-cni"]


def test_the_chain_container_removes_noded_cni_when_it_is_stopped(tmp_path):
    """Issue 16, item 2: the DaemonSet deleted (its containers get SIGTERM), the node's CNI configuration is
    as it was and noded-cni is gone from the bin dir, as istio-cni's install container does."""
    import signal

    conf, bins = tmp_path / "net.d", tmp_path / "bin"
    conf.mkdir()
    original = json.dumps({"cniVersion": "1.0.0", "name": "k8s", "plugins": [BRIDGE]})
    (conf / "10-k8s.conflist").write_text(original)
    argv = [sys.executable, "-m", "noded", "cni", "install", "--conf-dir", str(conf), "--bin-dir", str(bins)]
    proc = subprocess.Popen([*argv, "--watch", "--uninstall-on-exit"], stdout=subprocess.PIPE, text=True)
    try:
        assert "chained" in proc.stdout.readline()
        assert (bins / "noded-cni").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert "removed" in proc.stdout.read()
        assert (conf / "10-k8s.conflist").read_text() == original
        assert not (bins / "noded-cni").exists()
    finally:
        proc.kill()


def test_the_chain_container_keeps_noded_cni_across_a_restart_and_removes_it_with_the_daemonset(tmp_path):
    """With NODED_DAEMONSET (as the DaemonSet sets it) the chain goes only when that DaemonSet is gone or
    being deleted, read from the config's source (here a manifest directory; only the source section is
    read: the container mounts no cgroup or BPF file system); a restart or an upgrade keeps it."""
    import os
    import signal

    import yaml

    conf, bins, manifests = tmp_path / "net.d", tmp_path / "bin", tmp_path / "manifests"
    conf.mkdir()
    manifests.mkdir()
    original = json.dumps({"cniVersion": "1.0.0", "name": "k8s", "plugins": [BRIDGE]})
    (conf / "10-k8s.conflist").write_text(original)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"source": {"directory": str(manifests)}, "services": {"cgroupPath": ""}}))
    ds = {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "noded", "namespace": "kube-system"}}
    (manifests / "ds.yaml").write_text(yaml.safe_dump(ds))
    argv = [sys.executable, "-m", "noded", "cni", "install", "--conf-dir", str(conf), "--bin-dir", str(bins)]
    argv += ["--watch", "--uninstall-on-exit", "--config", str(config)]
    env = {**os.environ, "NODED_DAEMONSET": "kube-system/noded"}
    for deleted in (False, True):
        if deleted:
            (manifests / "ds.yaml").unlink()  # kubectl delete daemonset: the object first, then its pods
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
        try:
            assert "chained" in proc.stdout.readline()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
            out = proc.stdout.read()
        finally:
            proc.kill()
        if deleted:
            assert "removed" in out and (conf / "10-k8s.conflist").read_text() == original, out
            assert not (bins / "noded-cni").exists()
        else:
            assert "kept chained" in out and "noded-cni" in (conf / "10-k8s.conflist").read_text(), out
            assert (bins / "noded-cni").exists()
