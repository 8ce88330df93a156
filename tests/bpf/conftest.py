"""A socket-LB under test: programs attached to a cgroup of the test's own, clients in a netns of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from noded.bpf import sock_lb
from noded.lab import netns
from noded.model.tracker import ServiceModel
from noded.services.ebpf import EbpfProxier


class LbEnv:
    def __init__(self, tag: str) -> None:
        self.ns = f"noded-test-{tag}"
        self.cgroup = f"{netns.CGROUP_ROOT}/noded-test-{tag}"
        self.bpffs = f"/sys/fs/bpf/noded/test-{tag}"
        self.servers: list[subprocess.Popen] = []
        netns.create(self.ns)
        netns.cgroup_create(self.cgroup)
        self.maps = sock_lb.load_and_attach(self.bpffs, self.cgroup)
        self.model = ServiceModel()
        self.proxier = EbpfProxier(self.model, self.maps)

    def apply(self, *objs: dict) -> None:
        for obj in objs:
            assert self.model.upsert(obj)
        self.proxier.sync()

    def echo(self, port: int, name: str, udp: int = 0) -> None:
        argv = netns.nsenter_argv(
            self.ns, [sys.executable, "-m", "noded.lab.echo", "--name", name, "--tcp", str(port), "--udp", str(udp)]
        )
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert "serving" in proc.stdout.readline()
        self.servers.append(proc)

    def client(self, mode: str, host: str, port: int, **opts: object) -> dict:
        """Run the probe inside the cgroup (so the hooks see it) and the test's netns."""
        argv = [sys.executable, "-m", "noded.lab.probe", mode, host, str(port)]
        for k, v in opts.items():
            argv += [f"--{k}", str(v)]
        res = subprocess.run(
            netns.nsenter_argv(self.ns, argv),
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=lambda: netns.cgroup_join(self.cgroup),
        )
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def python(self, code: str) -> str:
        res = subprocess.run(
            netns.nsenter_argv(self.ns, [sys.executable, "-c", code]),
            capture_output=True,
            text=True,
            timeout=60,
            preexec_fn=lambda: netns.cgroup_join(self.cgroup),
        )
        assert res.returncode == 0, res.stderr
        return res.stdout

    def close(self) -> None:
        for s in self.servers:
            s.kill()
            s.wait()
        self.maps.close()
        sock_lb.remove(self.bpffs)
        netns.cgroup_remove_tree(self.cgroup)
        netns.remove(self.ns)


@pytest.fixture
def lb():
    env = LbEnv(f"{os.getpid()}-{int(time.monotonic() * 1000) % 100000}")
    try:
        yield env
    finally:
        env.close()
