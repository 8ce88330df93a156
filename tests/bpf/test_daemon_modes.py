"""Switching services.mode across `noded run` restarts leaves nothing of the previous mode; cleanup leaves nothing."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import yaml

from noded.cleanup import DNS_PINS
from noded.lab import netns
from noded.services import nftables
from tests.bpf.conftest import LINK_ADDRESS, NetnsCgroupEnv, env_fixture
from tests.objects import endpoint, service, slice_


class ModeEnv(NetnsCgroupEnv):
    def __init__(self, tag: str) -> None:
        super().__init__(tag)
        self.dir = tempfile.mkdtemp(prefix="noded-test-")
        os.makedirs(f"{self.dir}/manifests")
        with open(f"{self.dir}/manifests/web.yaml", "w") as f:
            yaml.safe_dump_all(
                [service("web"), slice_("web", [endpoint(LINK_ADDRESS)], ports=[{"name": "http", "port": 9001}])], f
            )
        self.proc = None

    def config(self, mode: str) -> str:
        path = f"{self.dir}/config.yaml"
        with open(path, "w") as f:
            yaml.safe_dump(
                {
                    "apiVersion": "noded.io/v1alpha1",
                    "kind": "NodedConfiguration",
                    "nodeName": "m",
                    "source": {"directory": f"{self.dir}/manifests"},
                    "clusterCIDRs": ["192.0.2.0/24"],
                    "services": {"mode": mode, "cgroupPath": self.cgroup},
                    "api": {"socket": f"{self.dir}/noded.sock"},
                    "bpffsPath": self.bpffs,
                },
                f,
            )
        return path

    def run(self, mode: str) -> None:
        self.stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self.dir}/status.json")
        notify_path = f"{self.dir}/notify.sock"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(notify_path)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # what systemd gives a Type=notify unit
        notify.bind(notify_path)
        notify.settimeout(20)
        with open(f"{self.dir}/noded.log", "ab") as log:
            self.proc = subprocess.Popen(
                netns.nsenter_argv(self.ns, [sys.executable, "-m", "noded", "run", "-c", self.config(mode)]),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "NOTIFY_SOCKET": notify_path},
            )
        try:
            assert notify.recv(1024).startswith(b"READY=1"), mode
        finally:
            notify.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with open(f"{self.dir}/status.json") as f:
                    if json.load(f).get("syncs", 0) >= 1:
                        return
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            if self.proc.poll() is not None:
                with open(f"{self.dir}/noded.log") as log:
                    raise AssertionError(log.read())
            time.sleep(0.05)
        raise AssertionError("noded did not sync")

    def stop(self) -> None:
        if getattr(self, "proc", None):
            self.proc.terminate()
            self.proc.wait()
            self.proc = None

    def state(self) -> dict:
        attached = subprocess.run(["bpftool", "cgroup", "show", self.cgroup], capture_output=True, text=True).stdout
        saved = "".join(
            netns.nsenter(self.ns, [f"{tool}-{backend}-save"], capture_output=True, text=True).stdout
            for tool in ("iptables", "ip6tables")
            for backend in ("nft", "legacy")
        )
        pins = [p for _d, _s, files in os.walk(self.bpffs) for p in files]
        dns_pins = [p for p in pins if p.startswith(DNS_PINS)]
        addresses = netns.nsenter(self.ns, ["ip", "-4", "addr"], capture_output=True, text=True).stdout
        return {
            "bpf_links": "noded_connect4" in attached,
            "bpf_pins": len(pins) > len(dns_pins),  # the services mode's own
            "dns": bool(dns_pins) or "169.254.20.10" in addresses,  # every mode: the node-local DNS side
            "nft_table": nftables.table_exists(tuple(netns.nsenter_argv(self.ns, ["nft"]))),
            "iptables": "NODED-" in saved,
        }

    def close(self) -> None:
        self.stop()
        if getattr(self, "dir", None):
            netns.nsenter(
                self.ns, [sys.executable, "-m", "noded", "cleanup", "-c", self.config("none")], capture_output=True
            )
        super().close()


env = env_fixture(ModeEnv)


def test_switching_modes_leaves_nothing_of_the_previous_one(env):
    env.echo(9001, "a")
    nothing = {"bpf_links": False, "bpf_pins": False, "nft_table": False, "iptables": False, "dns": False}
    running = {**nothing, "dns": True}
    for mode, expected in (
        ("ebpf", {**running, "bpf_links": True, "bpf_pins": True}),
        ("nftables", {**running, "nft_table": True}),
        ("iptables", {**running, "iptables": True}),
        ("ebpf", {**running, "bpf_links": True, "bpf_pins": True}),
        ("iptables", {**running, "iptables": True}),
    ):
        env.run(mode)
        assert env.state() == expected, mode
        deadline = time.monotonic() + 5
        while env.client("tcp", "10.96.0.10", 80, count=1, timeout=1)["answers"] != {"a": 1}:
            assert time.monotonic() < deadline, f"VIP not served in {mode} mode"
            time.sleep(0.1)
    env.stop()
    netns.nsenter(
        env.ns, [sys.executable, "-m", "noded", "cleanup", "-c", env.config("ebpf")], check=True, capture_output=True
    )
    assert env.state() == nothing
