"""Runs a CNI plugin chain exactly as a container runtime does (the libcni contract).

One exec per plugin, the netconf on stdin, prevResult chained from plugin to plugin.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass

from noded.lab import netns


class CniError(RuntimeError):
    pass


@dataclass
class Invocation:
    container_id: str
    netns_path: str
    ifname: str = "eth0"
    args: str = ""


def _exec(plugin_type: str, command: str, conf: dict, inv: Invocation, cni_path: list[str], run_in: str | None) -> dict:
    binary = next(
        (os.path.join(d, plugin_type) for d in cni_path if os.path.isfile(os.path.join(d, plugin_type))), None
    )
    if binary is None:
        raise CniError(f"CNI plugin {plugin_type!r} not found in {':'.join(cni_path)}")
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": inv.container_id,
        "CNI_NETNS": inv.netns_path,
        "CNI_IFNAME": inv.ifname,
        "CNI_ARGS": inv.args,
        "CNI_PATH": ":".join(cni_path),
    }
    argv = netns.nsenter_argv(run_in, [binary]) if run_in else [binary]  # run_in None: this namespace (a real node)
    proc = subprocess.run(argv, input=json.dumps(conf).encode(), env=env, capture_output=True, timeout=60)
    out = proc.stdout.decode(errors="replace").strip()
    if proc.returncode != 0:
        raise CniError(
            f"{plugin_type} {command} failed ({proc.returncode}): {out or proc.stderr.decode(errors='replace')}"
        )
    return json.loads(out) if out else {}


def _plugin_conf(conflist: dict, plugin: dict, prev: dict | None) -> dict:
    conf = dict(plugin)
    conf["name"] = conflist["name"]
    conf["cniVersion"] = conflist["cniVersion"]
    if prev is not None:
        conf["prevResult"] = prev
    return conf


def add(conflist: dict, inv: Invocation, cni_path: list[str], run_in: str | None) -> dict:
    result: dict | None = None
    for plugin in conflist["plugins"]:
        result = _exec(plugin["type"], "ADD", _plugin_conf(conflist, plugin, result), inv, cni_path, run_in)
    return result or {}


def delete(conflist: dict, inv: Invocation, cni_path: list[str], run_in: str | None, prev: dict | None = None) -> None:
    """DEL runs the chain in reverse, as the runtime does; every plugin is tried."""
    errors = []
    for plugin in reversed(conflist["plugins"]):
        try:
            _exec(plugin["type"], "DEL", _plugin_conf(conflist, plugin, prev), inv, cni_path, run_in)
        except CniError as e:
            errors.append(str(e))
    if errors:
        raise CniError("; ".join(errors))


def result_ips(result: dict) -> list[str]:
    return [ip["address"].split("/")[0] for ip in result.get("ips", [])]
