"""The `noded` command line: run, status, services, cleanup, version, lab."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from noded import __version__
from noded.config import ConfigError, NodedConfiguration, load, parse
from noded.services.view import programmed_views

DEFAULT_CONFIG = "/etc/noded/config.yaml"


def _config(path: str | None) -> NodedConfiguration:
    if path:
        return load(path)
    if os.path.exists(DEFAULT_CONFIG):
        return load(DEFAULT_CONFIG)
    return parse({})


def cmd_run(args: argparse.Namespace) -> int:
    from noded.daemon import Daemon
    from noded.observe import setup_logging

    setup_logging(args.log_level, args.json_logs, args.verbose)
    return Daemon(_config(args.config)).run()


def cmd_services(args: argparse.Namespace) -> int:
    cfg = _config(args.config)
    bpffs = args.bpffs_path or cfg.bpffsPath
    views = programmed_views(cfg.services.mode, bpffs)  # the kernel's view, in this netns
    if views is None:
        print(f"nothing programmed in {cfg.services.mode} mode", file=sys.stderr)
        return 1
    if args.output == "json":
        print(
            json.dumps(
                [
                    {
                        "frontend": str(v.frontend),
                        "ip": v.frontend.ip,
                        "port": v.frontend.port,
                        "protocol": v.frontend.protocol,
                        "svcId": v.svc_id,
                        "affinityTimeout": v.affinity_timeout,
                        "ready": [f"{a}:{p}" for a, p in v.ready],
                        "terminating": [f"{a}:{p}" for a, p in v.terminating],
                    }
                    for v in views
                ],
                indent=2,
            )
        )
        return 0
    print(f"{'FRONTEND':<28} {'ID':>6} {'AFFINITY':>8}  BACKENDS")
    for v in views:
        backends = [f"{a}:{p}" for a, p in v.ready] + [f"{a}:{p}(terminating)" for a, p in v.terminating]
        shown = ", ".join(backends) or "(none: rejects)"
        print(f"{v.frontend!s:<28} {v.svc_id:>6} {v.affinity_timeout or '-':>8}  {shown}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from noded.bpf.sock_lb import attached_programs

    cfg = _config(args.config)
    status_path = os.path.join(os.path.dirname(cfg.api.socket), "status.json")
    status: dict = {}
    if os.path.exists(status_path):
        with open(status_path) as f:
            status = json.load(f)
    running = bool(status.get("pid")) and os.path.exists(f"/proc/{status['pid']}")
    status.update(
        {"running": running, "bpffsPath": cfg.bpffsPath, "attachedPrograms": attached_programs(cfg.bpffsPath)}
    )
    if running and os.path.exists(cfg.api.socket):  # the live side: DNS, tunnel, certificates
        from noded.api import h2client

        try:
            live = h2client.call(cfg.api.socket, "/noded.v1.Noded/Status", {})
            status.update({k: live.get(k) for k in ("synced", "dns", "tunnel")})
        except OSError as e:
            status["apiError"] = str(e)
    if args.output == "json":
        print(json.dumps(status, indent=2))
    else:
        print(render_status(status))
    return 0 if running else 3


def render_status(s: dict) -> str:
    """`noded status` as a short table of what matters, one subject per line."""
    rows = [
        (
            "node",
            f"{s.get('node', '?')}: {'running, pid ' + str(s.get('pid')) if s.get('running') else 'NOT RUNNING'}"
            f", mode {s.get('mode', '?')}",
        ),
        (
            "sources",
            ", ".join(
                f"{name} {'synced' if v.get('synced') else 'SYNCING'}"
                + (f" (last error: {v['lastError']})" if v.get("lastError") else "")
                for name, v in (s.get("sources") or {}).items()
            )
            or "-",
        ),
        (
            "services",
            f"{s.get('services', 0)} services, {s.get('endpointSlices', 0)} slices, "
            f"{s.get('rejectedObjects', 0)} rejected; {s.get('syncs', 0)} syncs, last "
            f"{(s.get('lastSyncSeconds') or 0) * 1000:.1f} ms"
            + (f", error: {s['lastSyncError']}" if s.get("lastSyncError") else "")
            + (
                f"; until the first sync: {s.get('restoredFrontends', 0)} frontends restored from the last run"
                if s.get("running") and not s.get("syncs")
                else ""
            ),
        ),
        ("programs", ", ".join(s.get("attachedPrograms") or []) or "-"),
    ]
    by_kind = s.get("rejectedByKind") or {}
    if by_kind:
        rows.append(("rejected", ", ".join(f"{n} {kind}" for kind, n in sorted(by_kind.items()))))
    term = s.get("socketTermination")
    if term:
        rows.append(
            (
                "socket term.",
                f"on ({'/'.join(term.get('protocols') or [])}): {term.get('destroyed', 0)} sockets destroyed in "
                f"{term.get('runs', 0)} runs, last {term.get('lastSeconds', 0) * 1000:.1f} ms over "
                f"{term.get('namespaces', 0)} netns"
                if term.get("enabled")
                else f"OFF: {term.get('reason')}",
            )
        )
    dns = s.get("dns")
    if dns:
        fast = dns.get("fastPath") or {}
        ups = ", ".join(f"{u['address']} {'up' if u['healthy'] else 'DOWN'}" for u in dns.get("upstreams", []))
        rows.append(
            (
                "dns",
                f"{dns.get('queries', 0)} queries: {dns.get('local', 0)} local, {dns.get('cached', 0)} "
                f"cached, {dns.get('forwarded', 0)} forwarded, {dns.get('refused', 0)} refused; fast path "
                f"{fast.get('answered', 0)} answered, {fast.get('records', 0)} records; upstreams {ups or '-'}",
            )
        )
    tunnel = s.get("tunnel")
    if tunnel:
        rows.append(
            (
                "tunnel",
                f"issuer {tunnel.get('issuer') or 'NONE'}; HBONE {tunnel.get('hbone_out', 0)} out, "
                f"{tunnel.get('hbone_in', 0)} in; plain {tunnel.get('plain_out', 0)} out, "
                f"{tunnel.get('plain_in', 0)} in; {tunnel.get('denied', 0)} denied; "
                f"{len(tunnel.get('policies') or [])} policies ({len(tunnel.get('rejected') or {})} failing closed); "
                f"refused: {tunnel.get('refusedPeers', 0)} peers, {tunnel.get('selfCalls', 0)} self-calls, "
                f"{sum((tunnel.get('endedConnections') or {}).values())} HBONE connections ended",
            )
        )
        for cert in tunnel.get("certificates") or []:
            rows.append(("certificate", f"{cert['identity']} until {cert['notAfter'][:19]}Z"))
        for what, error in (tunnel.get("errors") or {}).items():
            rows.append(("tunnel error", f"{what}: {error}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def cmd_cleanup(args: argparse.Namespace) -> int:
    from noded.cleanup import cleanup

    cfg = _config(args.config)
    configs = [cfg]
    if args.all and os.path.isdir("/sys/fs/bpf/noded"):
        configs = [parse({"nodeName": d}) for d in sorted(os.listdir("/sys/fs/bpf/noded"))]
    for c in configs:
        for path in cleanup(c):
            print(f"removed {path}")
    return 0


def cmd_cni(args: argparse.Namespace) -> int:
    from noded.cni import install

    try:
        if args.action == "uninstall":
            print(f"restored: {', '.join(install.uninstall(args.conf_dir, args.bin_dir)) or 'nothing'}")
            return 0
        if args.watch:  # SIGTERM from here on ends the watch through the finally below, never half-way
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        print(f"chained noded-cni into {install.install(args.conf_dir, args.bin_dir, args.socket)}", flush=True)
        if args.watch:  # the DaemonSet's install container: kept in place while it runs, removed when it goes
            try:
                install.watch(args.conf_dir, args.bin_dir, args.socket)
            finally:
                if args.uninstall_on_exit and _chain_goes(args):
                    print(f"noded cni: removed, restored {', '.join(install.uninstall(args.conf_dir, args.bin_dir))}")
    except install.InstallError as e:
        print(f"noded cni: {e}", file=sys.stderr)
        return 1
    return 0


def _chain_goes(args: argparse.Namespace) -> bool:
    """On exit with --uninstall-on-exit: without NODED_DAEMONSET, always; with it, only when that DaemonSet
    is gone or being deleted (read from --config's source), so a restart or an upgrade of the DaemonSet never
    lets a pod start unchained in between (istio-cni's rule)."""
    from noded.config import load_source
    from noded.sources.owner import daemonset_ref, uninstalling

    if daemonset_ref() is None:
        return True
    try:
        source = load_source(args.config or DEFAULT_CONFIG)
    except ConfigError as e:  # cannot tell: kept, as with no answer (a pod must never start unchained)
        print(f"noded cni: kept chained: {e}", file=sys.stderr)
        return False
    goes = uninstalling(source)
    if not goes:
        print("noded cni: kept chained (noded's DaemonSet is still there: a restart or an upgrade)")
    return goes


def cmd_version(_args: argparse.Namespace) -> int:
    print(f"noded {__version__}")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from noded import install

    done = install.install(args.root) if args.command == "install" else install.uninstall(args.root)
    for path in done:
        print(f"{args.command}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="noded", description="node networking daemon for Kubernetes")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", "-c")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument(
        "-v", "--verbose", action="count", default=0, help="-v: noded's debug lines; -vv: the libraries' too"
    )
    run.add_argument("--json-logs", action="store_true")
    run.set_defaults(fn=cmd_run)

    for name, fn, helptext in (
        ("status", cmd_status, "what the daemon is doing"),
        ("services", cmd_services, "what is programmed, read from the kernel's maps"),
    ):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--config", "-c")
        s.add_argument("-o", "--output", choices=["table", "json"], default="table")
        s.set_defaults(fn=fn)
    sub.choices["services"].add_argument("--bpffs-path")

    c = sub.add_parser("cleanup", help="remove every kernel object noded made")
    c.add_argument("--config", "-c")
    c.add_argument("--all", action="store_true", help="every noded instance on this machine")
    c.set_defaults(fn=cmd_cleanup)

    cni = sub.add_parser("cni", help="chain noded-cni into the node's CNI configuration, or undo it")
    cni.add_argument("action", choices=["install", "uninstall"])
    cni.add_argument("--conf-dir", default="/etc/cni/net.d")
    cni.add_argument("--bin-dir", default="/opt/cni/bin")
    cni.add_argument("--socket", default="/run/noded/noded.sock")
    cni.add_argument("--watch", action="store_true", help="keep it chained when the primary CNI rewrites its file")
    cni.add_argument("--config", "-c", help="with NODED_DAEMONSET: the source asked whether the DaemonSet is deleted")
    cni.add_argument(
        "--uninstall-on-exit",
        action="store_true",
        help="with --watch: on SIGTERM remove noded-cni and restore the original chain (with NODED_DAEMONSET: "
        "only when that DaemonSet is gone or being deleted)",
    )
    cni.set_defaults(fn=cmd_cni)

    for name, helptext in (
        ("install", "put the systemd unit, a config and noded-cni in place"),
        ("uninstall", "remove what install put in place"),
    ):
        i = sub.add_parser(name, help=helptext)
        i.add_argument("--root", default="/", help="install under this directory (packaging, tests)")
        i.set_defaults(fn=cmd_install)

    v = sub.add_parser("version")
    v.set_defaults(fn=cmd_version)

    from noded.lab.cli import add_lab_parser

    add_lab_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except ConfigError as e:
        print(f"noded: config: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"noded: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
