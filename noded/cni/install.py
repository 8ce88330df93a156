"""`noded cni install|uninstall`: chain noded-cni last in the node's primary CNI configuration.

The primary configuration is the file libcni would load: the first `.conflist`, `.conf` or `.json` of
the conf dir by name. Its original is kept under `<conf dir>/.noded-original/` (libcni ignores dot
directories); a lone `.conf` becomes a `.conflist` of one plugin plus noded-cni. `--watch` keeps
noded-cni in place when the primary CNI rewrites its file; uninstall restores the original.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

from noded.files import write_atomic

BACKUP_DIR = ".noded-original"
EXTENSIONS = (".conflist", ".conf", ".json")


class InstallError(RuntimeError):
    pass


def primary_config(conf_dir: str) -> str | None:
    names = sorted(n for n in os.listdir(conf_dir) if n.endswith(EXTENSIONS) and not n.startswith("."))
    return os.path.join(conf_dir, names[0]) if names else None


def chained(doc: dict, plugin: dict) -> dict:
    """The conflist with noded-cni last (a single-plugin .conf becomes a conflist). Pure."""
    if not isinstance(doc, dict):
        raise InstallError("the CNI configuration is not a JSON object")
    if "plugins" in doc:
        if not isinstance(doc["plugins"], list):
            raise InstallError("plugins: expected a list")
        conflist = dict(doc)
        plugins = [p for p in doc["plugins"] if not (isinstance(p, dict) and p.get("type") == plugin["type"])]
    else:
        single = {k: v for k, v in doc.items() if k not in ("name", "cniVersion")}
        conflist = {"cniVersion": doc.get("cniVersion", "1.0.0"), "name": doc.get("name", "k8s-pod-network")}
        plugins = [single]
    conflist["plugins"] = [*plugins, plugin]
    return conflist


def is_chained(doc: dict, plugin_type: str = "noded-cni") -> bool:
    plugins = doc.get("plugins") if isinstance(doc, dict) else None
    return (
        isinstance(plugins, list)
        and bool(plugins)
        and isinstance(plugins[-1], dict)
        and plugins[-1].get("type") == plugin_type
    )


def launcher() -> str:
    """The noded-cni executable: this interpreter in isolated mode without site (-IS), importing noded from
    where it is installed. It starts in ~16 ms, where the pip entry point script takes ~22 (site and the
    package finders); the plugin itself needs only the standard library."""
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return (
        f"#!{sys.executable} -IS\n"
        "import sys\n"
        f"sys.path.insert(0, {package_root!r})\n"
        "from noded.cni.plugin import main\n"
        "sys.exit(main())\n"
    )


def static_plugin() -> str | None:
    """The static noded-cni built from cni/noded-cni.c (`make bpf` builds it), if this package has it: it
    runs on any host, without this interpreter (what a DaemonSet's install container must put there)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bin", "noded-cni")
    return path if os.path.isfile(path) and os.access(path, os.X_OK) else None


def install_plugin(bin_dir: str, executable: str | None = None) -> str:
    """Put noded-cni in bin_dir: a copy of `executable`, else the static plugin, else the launcher (which
    needs this interpreter on the host: the systemd install). Returns its path."""
    os.makedirs(bin_dir, exist_ok=True)
    target = os.path.join(bin_dir, "noded-cni")
    executable = executable or static_plugin()
    if executable:
        tmp = os.path.join(bin_dir, ".noded-cni.tmp")
        shutil.copy2(executable, tmp)
        os.replace(tmp, target)
    else:
        write_atomic(target, launcher(), mode=0o755)
    return target


def install(conf_dir: str, bin_dir: str, socket_path: str, executable: str | None = None) -> str:
    """Put the plugin in place and chain it; returns the conflist path written."""
    install_plugin(bin_dir, executable)
    path = primary_config(conf_dir)
    if path is None:
        raise InstallError(f"no CNI configuration in {conf_dir}: install the primary CNI first")
    with open(path) as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            raise InstallError(f"{path}: not JSON: {e}") from None
    if is_chained(doc):
        return path
    backup = os.path.join(conf_dir, BACKUP_DIR)
    os.makedirs(backup, exist_ok=True)
    shutil.copy2(path, os.path.join(backup, os.path.basename(path)))
    target = path if path.endswith(".conflist") else os.path.splitext(path)[0] + ".conflist"
    write_atomic(target, json.dumps(chained(doc, {"type": "noded-cni", "socket": socket_path}), indent=2))
    if target != path:
        os.unlink(path)
    return target


def uninstall(conf_dir: str, bin_dir: str) -> list[str]:
    restored = []
    backup = os.path.join(conf_dir, BACKUP_DIR)
    for name in sorted(os.listdir(backup)) if os.path.isdir(backup) else []:
        ours = os.path.join(conf_dir, os.path.splitext(name)[0] + ".conflist")
        if os.path.exists(ours) and not name.endswith(".conflist"):
            os.unlink(ours)
        shutil.move(os.path.join(backup, name), os.path.join(conf_dir, name))
        restored.append(name)
    if os.path.isdir(backup):
        os.rmdir(backup)
    plugin = os.path.join(bin_dir, "noded-cni")
    if os.path.exists(plugin):
        os.unlink(plugin)
    return restored


def watch(conf_dir: str, bin_dir: str, socket_path: str, interval: float = 1.0, rounds: int | None = None) -> None:
    """Re-chain whenever the primary configuration loses noded-cni (until interrupted, or `rounds` checks).
    A configuration caught half written (the primary CNI is writing it), or one that cannot be chained
    yet, is looked at again next round: the watch itself never stops on it."""
    done = 0
    while rounds is None or done < rounds:
        done += 1
        try:
            path = primary_config(conf_dir)
            try:
                with open(path or "") as f:
                    ok = is_chained(json.load(f))
            except (OSError, ValueError):
                ok = path is None  # nothing to chain into yet
            if not ok:
                print(f"noded cni: re-chained {install(conf_dir, bin_dir, socket_path)}", flush=True)
        except (InstallError, OSError) as e:
            print(f"noded cni: not chained yet, trying again: {e}", file=sys.stderr, flush=True)
        time.sleep(interval)
