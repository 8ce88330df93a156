"""A real `noded run` on the Kubernetes API source (a local server speaking list/watch), with real hooks.

The daemon runs in the root namespace but listens only on loopback and attaches
only to a cgroup this test made; clients run in a netns of the test's own.
"""

import json
import subprocess
import sys
import tempfile
import time

import yaml

from noded.bpf.libbpf import BpfError
from noded.lab import netns
from noded.services.view import programmed_views
from tests.bpf.conftest import NetnsCgroupEnv, env_fixture
from tests.fakeapi import FakeApiServer
from tests.objects import endpoint, service, slice_


class DaemonEnv(NetnsCgroupEnv):
    def __init__(self, tag: str) -> None:
        super().__init__(tag)
        self.dir = tempfile.mkdtemp(prefix="noded-test-")
        self.api = FakeApiServer(self.ns)  # the daemon runs in the test's netns, never in the machine's
        self.api.start()
        self.proc: subprocess.Popen | None = None
        with open(f"{self.dir}/kubeconfig", "w") as f:
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "t",
                    "clusters": [{"name": "t", "cluster": {"server": self.api.url}}],
                    "contexts": [{"name": "t", "context": {"cluster": "t", "user": "u"}}],
                    "users": [{"name": "u", "user": {}}],
                },
                f,
            )
        self.config = f"{self.dir}/config.yaml"
        with open(self.config, "w") as f:
            yaml.safe_dump(
                {
                    "apiVersion": "noded.io/v1alpha1",
                    "kind": "NodedConfiguration",
                    "nodeName": f"test-{tag}",
                    "source": {"kubeconfig": f"{self.dir}/kubeconfig"},
                    "services": {"cgroupPath": self.cgroup},
                    "api": {"socket": f"{self.dir}/noded.sock"},
                    "metricsBindAddress": "127.0.0.1:10249",  # in the test's own netns
                    "healthzBindAddress": "127.0.0.1:10256",
                    "bpffsPath": self.bpffs,
                },
                f,
            )

    def start(self) -> None:
        with open(f"{self.dir}/noded.log", "ab") as log:
            self.proc = subprocess.Popen(
                netns.nsenter_argv(self.ns, [sys.executable, "-m", "noded", "run", "-c", self.config]),
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        if getattr(self, "proc", None):
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def log(self) -> str:
        with open(f"{self.dir}/noded.log") as f:
            return f.read()

    def programmed(self) -> dict:
        try:
            views = programmed_views("ebpf", self.bpffs) or []
        except BpfError:  # pinned only in part: the daemon is still starting
            return {}
        return {str(v.frontend): sorted(f"{a}:{p}" for a, p in v.ready) for v in views}

    def wait(self, cond, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if self.proc and self.proc.poll() is not None:
                raise AssertionError(f"noded exited:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; programmed={self.programmed()}\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def close(self) -> None:
        self.kill()
        if getattr(self, "api", None):
            self.api.stop()
        if getattr(self, "config", None):
            netns.nsenter(self.ns, [sys.executable, "-m", "noded", "cleanup", "-c", self.config], capture_output=True)
        super().close()


env = env_fixture(DaemonEnv)


def ports(p):
    return [{"name": "http", "port": p, "protocol": "TCP"}]


def test_daemon_on_api_source_programs_and_follows_watch(env):
    env.echo(9001, "a")
    env.echo(9002, "b")
    env.api.put(service("web", "10.96.0.10"))
    env.api.put(slice_("web", [endpoint("127.0.0.1")], ports=ports(9001)))
    bad = service("bad", "10.96.0.11")
    bad["spec"]["ports"][0]["protocol"] = "QUIC"
    env.api.put(bad)
    env.start()
    env.wait(lambda: env.programmed().get("10.96.0.10:80/TCP") == ["127.0.0.1:9001"])
    assert env.client("tcp", "10.96.0.10", 80, count=5)["answers"] == {"a": 5}
    env.api.put(slice_("web", [endpoint("127.0.0.1")], ports=ports(9002)))
    env.wait(lambda: env.programmed().get("10.96.0.10:80/TCP") == ["127.0.0.1:9002"])
    assert env.client("tcp", "10.96.0.10", 80, count=5)["answers"] == {"b": 5}
    assert "10.96.0.11:80/TCP" not in env.programmed()
    assert "Service default/bad" in env.log() and "protocol" in env.log()
    # what kube-proxy users scrape and probe
    metrics = env.python(
        "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:10249/metrics').read().decode())"
    )
    for name in (
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
        "kubeproxy_network_programming_duration_seconds_bucket",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
    ):
        assert name in metrics, name
    programming = next(
        line for line in metrics.split("\n") if line.startswith("kubeproxy_network_programming_duration_seconds_count")
    )
    assert int(programming.split()[1]) >= 1
    health = json.loads(
        env.python(
            "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:10256/healthz').read().decode())"
        )
    )
    assert health["nodeEligible"] is True and health["lastUpdated"].endswith("Z")


def test_no_write_before_sync_and_lost_api_keeps_serving(env):
    env.echo(9001, "a")
    env.api.put(service("web", "10.96.0.10"))
    env.api.put(slice_("web", [endpoint("127.0.0.1")], ports=ports(9001)))
    env.start()
    env.wait(lambda: "10.96.0.10:80/TCP" in env.programmed())
    # The daemon dies and the API server goes away; meanwhile the service is deleted in the API.
    env.kill()
    env.api.stop()
    env.api.remove("Service", "default", "web")
    env.start()
    time.sleep(2)  # the daemon is up but its source cannot sync: nothing may be written
    assert "all sources synced" not in env.log().split("noded starting")[-1]
    assert env.programmed() == {"10.96.0.10:80/TCP": ["127.0.0.1:9001"]}
    assert env.client("tcp", "10.96.0.10", 80, count=5)["answers"] == {"a": 5}  # still served from the pinned maps
    env.api.start(env.api.port)  # the API returns: the deletion is reconciled
    env.wait(lambda: env.programmed() == {})
