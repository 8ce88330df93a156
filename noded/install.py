"""`noded install` / `noded uninstall`: the systemd unit, the config and the CNI plugin put in place on a
node (under `--root`, for packaging and tests), and taken away again.

The unit is deploy/noded.service with ExecStart pointing at this installation's `noded`. An existing
config is kept (it is the operator's); uninstall removes what install wrote (the config only while it is
unchanged) and leaves the kernel state to `noded cleanup`.
"""

from __future__ import annotations

import os
import shutil
import sys
from importlib import resources

import yaml

from noded.cni.install import install_plugin
from noded.files import write_atomic

UNIT = "etc/systemd/system/noded.service"
CONFIG = "etc/noded/config.yaml"
CNI_PLUGIN = "opt/cni/bin/noded-cni"
DEFAULT_CONFIG = {
    "apiVersion": "noded.io/v1alpha1",
    "kind": "NodedConfiguration",
    # noded's own identity (group noded:nodes in deploy/daemonset.yaml's ClusterRoleBinding), never the
    # kubelet's: the Node authorizer scopes that one to the node's own pods
    "source": {"kubeconfig": "/etc/noded/kubeconfig"},
    "services": {"mode": "ebpf"},
}


def unit_text(executable: str) -> str:
    template = resources.files("noded").joinpath("deploy", "noded.service").read_text()
    return template.replace("/usr/local/bin/noded", executable)


def _executable() -> str:
    found = shutil.which("noded") or os.path.join(os.path.dirname(sys.executable), "noded")
    return os.path.abspath(found)


def install(root: str = "/", executable: str | None = None) -> list[str]:
    done = []
    unit = os.path.join(root, UNIT)
    os.makedirs(os.path.dirname(unit), exist_ok=True)
    write_atomic(unit, unit_text(executable or _executable()), mode=0o644)
    done.append(unit)
    config = os.path.join(root, CONFIG)
    if not os.path.exists(config):
        os.makedirs(os.path.dirname(config), exist_ok=True)
        write_atomic(config, yaml.safe_dump(DEFAULT_CONFIG, sort_keys=False), mode=0o644)
        done.append(config)
    done.append(install_plugin(os.path.dirname(os.path.join(root, CNI_PLUGIN))))
    return done


def uninstall(root: str = "/") -> list[str]:
    """Remove the unit and the plugin, and the config if it is still the one install wrote."""
    removed = []
    for rel in (UNIT, CNI_PLUGIN, CONFIG):
        path = os.path.join(root, rel)
        if not os.path.exists(path):
            continue
        if rel == CONFIG:
            with open(path) as f:
                if yaml.safe_load(f) != DEFAULT_CONFIG:
                    continue  # the operator's now
        os.unlink(path)
        removed.append(path)
    return removed
