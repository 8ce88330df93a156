"""A socket-LB under test: programs attached to a cgroup of the test's own, clients in a netns of its own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from noded.bpf import sock_lb
from noded.bpf.nat_gc import NatCollector
from noded.bpf.sock_term import SocketTerminator
from noded.kernel.conntrack import ConntrackCleaner
from noded.lab import netns
from noded.model.tracker import ServiceModel
from noded.services.ebpf import EbpfProxier
from noded.services.iptables import IptablesProxier
from noded.services.nftables import NftProxier

LINK_ADDRESS = "192.0.2.1"
CLUSTER_CIDRS = ["192.0.2.0/24", "2001:db8::/64"]  # the test netns plays a pod: its traffic is not masqueraded


class NetnsCgroupEnv:
    """A netns and a cgroup of the test's own, echo servers in the netns, clients in both."""

    def __init__(self, tag: str) -> None:
        self.ns = f"noded-test-{tag}"
        self.cgroup = f"{netns.CGROUP_ROOT}/noded-test-{tag}"
        self.bpffs = f"/sys/fs/bpf/noded/test-{tag}"
        self.servers: list[subprocess.Popen] = []
        netns.create(self.ns)
        netns.cgroup_create(self.cgroup)
        # A default route, as every node has: locally generated traffic to a VIP needs one to leave
        # routing before netfilter's output hook sees it. Its address doubles as a backend address.
        netns.add_default_route_link(self.ns, "route0", f"{LINK_ADDRESS}/24", "2001:db8::1/64")

    def apply(self, *objs: dict) -> None:
        for obj in objs:
            assert self.model.upsert(obj)
        self.proxier.sync()

    def remove(self, kind: str, name: str, namespace: str = "default") -> None:
        self.model.delete(kind, namespace, name)
        self.proxier.sync()

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

    def follower(self, host: str, port: int, mode: str = "follow", seconds: float = 10.0) -> subprocess.Popen:
        """A probe in the cgroup and netns, in the background: `follow` is a connected UDP client printing a
        JSON line per answer, `hold` one TCP connection asking every 10 ms (noded.lab.probe)."""
        argv = [sys.executable, "-m", "noded.lab.probe", mode, host, str(port), "--seconds", str(seconds)]
        argv += ["--interval", "0.01", "--timeout", "0.2"]
        return subprocess.Popen(
            netns.nsenter_argv(self.ns, argv),
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: netns.cgroup_join(self.cgroup),
        )

    def python(self, code: str) -> str:
        return self._in_cgroup([sys.executable, "-c", code]).stdout

    def close(self) -> None:
        for s in self.servers:
            s.kill()
            s.wait()
        if getattr(self, "dir", None):
            shutil.rmtree(self.dir, ignore_errors=True)
        sock_lb.remove(self.bpffs)
        netns.cgroup_remove_tree(self.cgroup)
        netns.remove(self.ns)


def unique_tag() -> str:
    return f"{os.getpid()}-{int(time.monotonic() * 1000) % 100000}"


def open_env(cls: type, tag: str):
    """Construct an env; whatever it made before failing is removed again."""
    env = cls.__new__(cls)
    env.servers = []
    env.ns, env.cgroup, env.bpffs = (
        f"noded-test-{tag}",
        f"{netns.CGROUP_ROOT}/noded-test-{tag}",
        f"/sys/fs/bpf/noded/test-{tag}",
    )
    try:
        env.__init__(tag)
    except BaseException:
        env.close()
        raise
    return env


class LbEnv(NetnsCgroupEnv):
    """The socket-LB loaded by the test itself, with a model and proxier to drive."""

    mode = "ebpf"

    def __init__(self, tag: str) -> None:
        super().__init__(tag)
        self.maps = sock_lb.load_and_attach(self.bpffs, self.cgroup)
        self.model = ServiceModel()
        self.terminator = SocketTerminator(self.bpffs, self.cgroup, tcp=True)
        self.collector = NatCollector(self.bpffs)
        self.proxier = EbpfProxier(self.model, self.maps, terminator=self.terminator, collector=self.collector)

    def close(self) -> None:
        if getattr(self, "terminator", None):
            self.terminator.close()
        if getattr(self, "maps", None):
            self.maps.close()
        super().close()


class NftEnv(NetnsCgroupEnv):
    """The nftables proxier programming a netns of the test's own."""

    mode = "nftables"

    def __init__(self, tag: str) -> None:
        super().__init__(tag)
        self.model = ServiceModel()
        cmd = tuple(netns.nsenter_argv(self.ns, ["nft"]))
        self.proxier = NftProxier(self.model, CLUSTER_CIDRS, cmd=cmd, conntrack=ConntrackCleaner(self.ns))
        self.proxier.sync(full=True)


class IptEnv(NftEnv):
    """The iptables proxier programming a netns of the test's own."""

    mode = "iptables"
    backend: str | None = None  # detected as kube-proxy does, unless a subclass names one

    def __init__(self, tag: str) -> None:
        NetnsCgroupEnv.__init__(self, tag)
        self.model = ServiceModel()
        prefix = tuple(netns.nsenter_argv(self.ns, []))
        self.proxier = IptablesProxier(
            self.model, CLUSTER_CIDRS, prefix=prefix, backend=self.backend, conntrack=ConntrackCleaner(self.ns)
        )
        self.proxier.sync(full=True)


def env_fixture(cls: type):
    """A pytest fixture giving a fresh env of cls, closed afterwards whatever happened."""

    @pytest.fixture
    def fixture():
        env = open_env(cls, unique_tag())
        try:
            yield env
        finally:
            env.close()

    return fixture


ebpf_lb = env_fixture(LbEnv)


@pytest.fixture(params=["ebpf", "nftables", "iptables"])
def lb(request):
    """The same behaviour, whichever backend programs it."""
    env = open_env({"ebpf": LbEnv, "nftables": NftEnv, "iptables": IptEnv}[request.param], unique_tag())
    try:
        yield env
    finally:
        env.close()
