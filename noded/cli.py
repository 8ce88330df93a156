"""The `noded` command line: run, status, services, config, preflight, completion, cleanup, cni, install,
version, lab."""

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
    from noded.memory import StartupCollection, tune_malloc

    tune_malloc()  # before any thread
    collection = StartupCollection()  # before the daemon's imports, which are the start's first objects
    from noded.daemon import Daemon
    from noded.observe import setup_logging

    setup_logging(args.log_level, args.json_logs, args.verbose)
    return Daemon(_config(args.config), collection).run()


def cmd_services(args: argparse.Namespace) -> int:
    cfg = _config(args.config)
    bpffs = args.bpffs_path or cfg.bpffsPath
    views = programmed_views(cfg.services.mode, bpffs)  # the kernel's view, in this netns
    if views is None:
        print(f"nothing programmed in {cfg.services.mode} mode", file=sys.stderr)
        return 1
    names = _frontend_names(cfg)
    if args.output == "json":
        print(
            json.dumps(
                [
                    {
                        "frontend": str(v.frontend),
                        "ip": v.frontend.ip,
                        "port": v.frontend.port,
                        "protocol": v.frontend.protocol,
                        "service": names.get(str(v.frontend)),
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
    width = max([28, *(len(n) for n in names.values())])
    print(f"{'FRONTEND':<28} {'SERVICE':<{width}} {'ID':>6} {'AFFINITY':>8}  BACKENDS")
    for v in views:
        backends = [f"{a}:{p}" for a, p in v.ready] + [f"{a}:{p}(terminating)" for a, p in v.terminating]
        shown = ", ".join(backends) or "(none: rejects)"
        name = names.get(str(v.frontend), "-")
        print(f"{v.frontend!s:<28} {name:<{width}} {v.svc_id:>6} {v.affinity_timeout or '-':>8}  {shown}")
    return 0


def _frontend_names(cfg: NodedConfiguration) -> dict[str, str]:
    """Frontend -> the Service port behind it, asked of the running daemon's metrics server ({} when it
    does not answer)."""
    import urllib.request

    from noded.config import split_hostport

    host, port = split_hostport(cfg.metricsBindAddress)
    host = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/frontends.json"
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return json.loads(reply.read())
    except (OSError, ValueError):
        return {}


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
            status.update({k: live.get(k) for k in ("synced", "dns", "tunnel", "waypoint")})
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
            f", mode {s.get('mode', '?')}" + (f", noded {s['version']}" if s.get("version") else ""),
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
                f"{fast.get('answered', 0)} answered, {fast.get('cachedAnswered', 0)} from its cache, "
                f"{fast.get('records', 0)} records; upstreams {ups or '-'}",
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
    waypoint = s.get("waypoint")
    if waypoint and (waypoint.get("waypoints") or waypoint.get("rejected") or waypoint.get("unbound")):
        rows.append(
            (
                "waypoint",
                f"{', '.join(waypoint.get('waypoints') or []) or 'none'}; {len(waypoint.get('routes') or [])} routes; "
                f"{waypoint.get('connections', 0)} connections, {waypoint.get('requests', 0)} requests, "
                f"{waypoint.get('denied', 0)} denied, {waypoint.get('refused', 0)} refused",
            )
        )
        for what, why in (waypoint.get("rejected") or {}).items():
            rows.append(("rejected", f"{what}: {why}"))
        for what, why in (waypoint.get("unbound") or {}).items():
            rows.append(("not bound", f"{what}: {why}"))
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
        if args.watch:  # SIGTERM ends the watch through the finally below (set before anything is chained)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        conflist = install.install(args.conf_dir, args.bin_dir, args.socket)
        try:
            print(f"chained noded-cni into {conflist}", flush=True)
            if args.watch:  # the DaemonSet's install container: kept in place while it runs, removed when it goes
                install.watch(args.conf_dir, args.bin_dir, args.socket)
        finally:
            if args.watch and args.uninstall_on_exit and _chain_goes(args):
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
    print(build_info())
    return 0


def build_info() -> str:
    """noded's version and what it runs on (`noded version`, `noded --version`)."""
    import platform

    return (
        f"noded {__version__} (python {platform.python_version()}, {platform.system()} {platform.release()}, "
        f"{platform.machine()})"
    )


def cmd_config(args: argparse.Namespace) -> int:
    """The effective configuration, defaults filled in (kube-proxy's --write-config-to)."""
    import yaml

    from noded.config import to_dict

    cfg = _config(args.config)
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
    if args.write_to:
        from noded.files import write_atomic

        write_atomic(args.write_to, text)
        print(f"wrote {args.write_to}")
    else:
        print(text, end="")
    return 0


def cmd_preflight(_args: argparse.Namespace) -> int:
    from noded.preflight import render, run_checks

    checks = run_checks()
    print(render(checks))
    missing = [c.name for c in checks if c.required and not c.ok]
    if missing:
        print(f"\nmissing what the default configuration needs: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


def cmd_completion(args: argparse.Namespace) -> int:
    print(completion_script(build_parser()))
    return 0


def completion_script(parser: argparse.ArgumentParser) -> str:
    """A bash completion function for every command and its flags, generated from the parser."""
    words: dict[str, list[str]] = {}

    def walk(p: argparse.ArgumentParser, path: str) -> None:
        options, commands = [], []
        for action in p._actions:
            options += [o for o in action.option_strings if o.startswith("--")]
            if isinstance(action, argparse._SubParsersAction):
                commands += list(action.choices)
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}".strip())
            elif not action.option_strings and action.choices:
                commands += [str(c) for c in action.choices]
        words[path] = sorted(set(commands)) + sorted(set(options))

    walk(parser, "")
    cases = "\n".join(f'    "{path}") echo "{" ".join(ws)}" ;;' for path, ws in sorted(words.items()))
    return BASH_COMPLETION.replace("@CASES@", cases)


def cmd_install(args: argparse.Namespace) -> int:
    from noded import install

    done = install.install(args.root) if args.command == "install" else install.uninstall(args.root)
    for path in done:
        print(f"{args.command}: {path}")
    return 0


BASH_COMPLETION = r"""# bash completion for noded: eval "$(noded completion bash)"
_noded_words() {
  case "$1" in
@CASES@
  esac
}
_noded() {
  local cur=${COMP_WORDS[COMP_CWORD]} path="" w
  for w in "${COMP_WORDS[@]:1:COMP_CWORD-1}"; do
    case $w in
      -*) ;;
      *) [[ -n "$(_noded_words "${path:+$path }$w")" ]] && path="${path:+$path }$w" ;;
    esac
  done
  COMPREPLY=($(compgen -W "$(_noded_words "$path")" -- "$cur"))
}
complete -F _noded noded"""


EXAMPLES = """examples:
  noded run -c /etc/noded/config.yaml --json-logs   the daemon (the systemd unit and the DaemonSet run this)
  noded status                                      what the running daemon is doing
  noded services -o json                            what the kernel holds, with the Service behind each frontend
  noded config -c /etc/noded/config.yaml            the effective configuration, defaults filled in
  noded preflight                                   what this host has of what each feature needs
  noded cleanup --all                               remove every kernel object noded made on this machine
  noded lab demo --mesh                             a 2-node lab in network namespaces, the ambient scenario
  eval "$(noded completion bash)"                   bash completion
"""


class Help(argparse.RawDescriptionHelpFormatter):
    """Each flag's default shown (where it has a meaningful one), and the examples kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" not in text and default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="noded",
        description="noded: one node networking daemon for Kubernetes (services, capture, DNS, tunnel)",
        epilog=EXAMPLES,
        formatter_class=Help,
    )
    p.add_argument("--version", action="version", version=build_info(), help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = f"the noded configuration file (default: {DEFAULT_CONFIG} if it exists, else the defaults)"

    def command(name: str, helptext: str, fn) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=helptext, description=helptext, formatter_class=Help)
        c.set_defaults(fn=fn)
        return c

    run = command("run", "run the daemon", cmd_run)
    run.add_argument("--config", "-c", help=config_help)
    run.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="noded's own log level"
    )
    run.add_argument("--json-logs", action="store_true", help="one JSON object per line, for every logger")
    run.add_argument(
        "-v", "--verbose", action="count", default=0, help="-v: noded's debug lines; -vv: the libraries' too"
    )

    for name, fn, helptext in (
        ("status", cmd_status, "what the daemon is doing (sources, services, programs, DNS, tunnel)"),
        ("services", cmd_services, "what is programmed, read from the kernel, with the Service behind each"),
    ):
        s = command(name, helptext, fn)
        s.add_argument("--config", "-c", help=config_help)
        s.add_argument("-o", "--output", choices=["table", "json"], default="table", help="output format")
    sub.choices["services"].add_argument("--bpffs-path", help="read these pinned maps (default: the config's)")

    cfg = command("config", "print the effective configuration, defaults filled in", cmd_config)
    cfg.add_argument("--config", "-c", help=config_help)
    cfg.add_argument("--write-to", metavar="PATH", help="write it to PATH instead (kube-proxy's --write-config-to)")

    command("preflight", "check this host's kernel and tools for what each feature needs", cmd_preflight)

    comp = command("completion", "print a shell completion script", cmd_completion)
    comp.add_argument("shell", choices=["bash"], help="the shell")

    c = command("cleanup", "remove every kernel object noded made", cmd_cleanup)
    c.add_argument("--config", "-c", help=config_help)
    c.add_argument("--all", action="store_true", help="every noded instance on this machine")

    cni = command("cni", "chain noded-cni into the node's CNI configuration, or undo it", cmd_cni)
    cni.add_argument("action", choices=["install", "uninstall"], help="chain it, or restore the original")
    cni.add_argument("--conf-dir", default="/etc/cni/net.d", help="the runtime's CNI configuration directory")
    cni.add_argument("--bin-dir", default="/opt/cni/bin", help="the runtime's CNI plugin directory")
    cni.add_argument("--socket", default="/run/noded/noded.sock", help="the daemon's API socket noded-cni calls")
    cni.add_argument("--watch", action="store_true", help="keep it chained when the primary CNI rewrites its file")
    cni.add_argument("--config", "-c", help="with NODED_DAEMONSET: the source asked whether the DaemonSet is deleted")
    cni.add_argument(
        "--uninstall-on-exit",
        action="store_true",
        help="with --watch: on SIGTERM remove noded-cni and restore the original chain (with NODED_DAEMONSET: "
        "only when that DaemonSet is gone or being deleted)",
    )

    for name, helptext in (
        ("install", "put the systemd unit, a config and noded-cni in place"),
        ("uninstall", "remove what install put in place"),
    ):
        i = command(name, helptext, cmd_install)
        i.add_argument("--root", default="/", help="install under this directory (packaging, tests)")

    command("version", "print the version and what it runs on", cmd_version)

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
