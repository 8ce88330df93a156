"""The static noded-cni (cni/noded-cni.c, built by `make bpf`): what a DaemonSet's install container puts
on the host must run there without the image's Python (issue 16, item 2). It forwards the call to the
daemon's cni.sock and prints what noded's plugin logic answers; with the daemon away it fails closed."""

from __future__ import annotations

import json
import subprocess

import pytest

from noded.cni import forward
from noded.cni.install import static_plugin

PLUGIN = static_plugin()
PREV = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}], "ips": [{"address": "10.244.1.2/24"}]}
pytestmark = pytest.mark.skipif(PLUGIN is None, reason="make bpf builds the static plugin")


def conf(socket_path: str, **extra) -> str:
    return json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "noded-cni", "socket": socket_path, **extra})


def run(env: dict, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run([PLUGIN], input=stdin, env=env, capture_output=True, text=True, timeout=30)


def test_it_is_static():
    import struct

    with open(PLUGIN, "rb") as f:
        data = f.read()
    assert data[:4] == b"\x7fELF" and data[4] == 2  # ELF64
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
    assert 3 not in types and 2 not in types  # no PT_INTERP (no loader), no PT_DYNAMIC (no shared library)


def test_without_the_daemon_it_fails_closed_del_and_version_succeed(tmp_path):
    sock = str(tmp_path / "noded.sock")
    env = {"CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_NETNS": "/run/netns/x"}
    add = run({**env, "CNI_COMMAND": "ADD"}, conf(sock, prevResult=PREV))
    assert add.returncode == 1 and json.loads(add.stdout)["code"] == 11
    assert run({**env, "CNI_COMMAND": "DEL"}, conf(sock)).returncode == 0
    version = run({"CNI_COMMAND": "VERSION"}, "")
    assert version.returncode == 0 and "1.1.0" in json.loads(version.stdout)["supportedVersions"]


def test_it_forwards_to_the_daemon_and_prints_what_the_plugin_logic_answers(tmp_path):
    sock = str(tmp_path / "noded.sock")
    server = forward.serve(sock)
    try:
        env = {"CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_NETNS": "/run/netns/x", "CNI_COMMAND": "ADD"}
        ok = run(env, conf(sock, prevResult=PREV))  # not a Kubernetes pod (no K8S_ args): passed through
        assert ok.returncode == 0 and json.loads(ok.stdout) == PREV
        bad = run({**env, "CNI_CONTAINERID": "../../etc"}, conf(sock, prevResult=PREV))
        assert bad.returncode == 1 and json.loads(bad.stdout)["code"] == 4
        version = run({"CNI_COMMAND": "VERSION"}, "")
        assert json.loads(version.stdout)["supportedVersions"]
        garbage = run(env, f'{{"socket": "{sock}", not json')
        assert garbage.returncode == 1 and json.loads(garbage.stdout)["code"] == 6
    finally:
        server.shutdown()
        server.server_close()
