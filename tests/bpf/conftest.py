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


class NetnsCgroupEnv:
    """A netns and a cgroup of the test's own, echo servers in the netns, clients in both."""

    def __init__(self, tag: str) -> None:
        self.ns = f"noded-test-{tag}"
        self.cgroup = f"{netns.CGROUP_ROOT}/noded-test-{tag}"
        self.bpffs = f"/sys/fs/bpf/noded/test-{tag}"
        self.servers: list[subprocess.Popen] = []
        netns.create(self.ns)
        netns.cgroup_create(self.cgroup)

    def echo(self, port: int, name: str, udp: int = 0) -> None:
        argv = [sys.executable, "-m", "noded.lab.echo", "--name", name, "--tcp", str(port), "--udp", str(udp)]
        proc = subprocess.Popen(netns.nsenter_argv(self.ns, argv), stdout=subprocess.PIPE, text=True)
        assert "serving" in proc.stdout.readline()
        self.servers.append(proc)

    def _in_cgroup(self, argv: list[str]) -> subprocess.CompletedProcess:
        res = subprocess.run(
            netns.nsenter_argv(self.ns, argv),
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=lambda: netns.cgroup_join(self.cgroup),
        )
        assert res.returncode == 0, res.stderr
        return res

    def client(self, mode: str, host: str, port: int, **opts: object) -> dict:
        """Run the probe inside the cgroup (so the hooks see it) and the test's netns."""
        argv = [sys.executable, "-m", "noded.lab.probe", mode, host, str(port)]
        for k, v in opts.items():
            argv += [f"--{k}", str(v)]
        return json.loads(self._in_cgroup(argv).stdout)

    def python(self, code: str) -> str:
        return self._in_cgroup([sys.executable, "-c", code]).stdout

    def close(self) -> None:
        for s in self.servers:
            s.kill()
            s.wait()
        sock_lb.remove(self.bpffs)
        netns.cgroup_remove_tree(self.cgroup)
        netns.remove(self.ns)


def unique_tag() -> str:
    return f"{os.getpid()}-{int(time.monotonic() * 1000) % 100000}"


class LbEnv(NetnsCgroupEnv):
    """The socket-LB loaded by the test itself, with a model and proxier to drive."""

    def __init__(self, tag: str) -> None:
        super().__init__(tag)
        self.maps = sock_lb.load_and_attach(self.bpffs, self.cgroup)
        self.model = ServiceModel()
        self.proxier = EbpfProxier(self.model, self.maps)

    def apply(self, *objs: dict) -> None:
        for obj in objs:
            assert self.model.upsert(obj)
        self.proxier.sync()

    def close(self) -> None:
        self.maps.close()
        super().close()


@pytest.fixture
def lb():
    env = LbEnv(unique_tag())
    try:
        yield env
    finally:
        env.close()
