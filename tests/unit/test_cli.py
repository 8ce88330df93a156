"""The command line explains itself: help on every flag, --version, the effective config, preflight's
lines, and a bash completion script that bash accepts and that completes commands and flags."""

from __future__ import annotations

import argparse
import subprocess

import yaml

from noded import __version__
from noded.cli import build_parser, completion_script, main


def _parsers(p: argparse.ArgumentParser, path: str = "noded"):
    yield path, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_command_and_flag_has_help():
    missing = []
    for path, p in _parsers(build_parser()):
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{path} {name}" for name, sub in action.choices.items() if not sub.description]
            elif not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


def test_help_shows_defaults_and_examples():
    text = build_parser().format_help()
    assert "examples:" in text and "noded completion bash" in text
    cni = next(p for path, p in _parsers(build_parser()) if path == "noded cni")
    assert "(default: /etc/cni/net.d)" in " ".join(cni.format_help().split())  # wrapped at any width


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert capsys.readouterr().out.startswith(f"noded {__version__} (python ")


def test_config_prints_the_effective_configuration_with_defaults(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    header = {"apiVersion": "noded.io/v1alpha1", "kind": "NodedConfiguration"}
    path.write_text(yaml.safe_dump({**header, "nodeName": "n1", "services": {"mode": "nftables", "cgroupPath": "/x"}}))
    assert main(["config", "-c", str(path)]) == 0
    effective = yaml.safe_load(capsys.readouterr().out)
    assert effective["nodeName"] == "n1" and effective["services"]["mode"] == "nftables"
    assert effective["services"]["syncPeriod"] == "30s" and effective["services"]["minSyncPeriod"] == "1s"
    assert effective["dns"]["listen"] == ["169.254.20.10:53"] and effective["kind"] == "NodedConfiguration"
    out = tmp_path / "written.yaml"
    assert main(["config", "-c", str(path), "--write-to", str(out)]) == 0
    assert yaml.safe_load(out.read_text()) == effective
    assert capsys.readouterr().out == f"wrote {out}\n"
    out.write_text(out.read_text())  # what it wrote loads back as the same configuration
    assert main(["config", "-c", str(out)]) == 0 and yaml.safe_load(capsys.readouterr().out) == effective


def test_preflight_names_each_piece_and_what_needs_it():
    from noded.preflight import kernel_version, render, run_checks

    assert kernel_version("6.1.0-13-amd64") == (6, 1) and kernel_version("6.18.44-fc") == (6, 18)
    old = {c.name: c for c in run_checks(release="6.1.0-13-amd64")}
    assert not old["kernel ≥ 6.6 (tcx)"].ok and old["kernel ≥ 6.6 (tcx)"].required
    lines = render(list(old.values())).splitlines()
    assert len(lines) == len(old) and all("needed by:" in line for line in lines)
    assert any("MISSING" in line and "tcx" in line for line in lines)


def test_the_bash_completion_script_completes_commands_and_flags(tmp_path):
    script = tmp_path / "noded.bash"
    script.write_text(completion_script(build_parser()))

    def complete(*words: str) -> list[str]:
        line = " ".join(["noded", *words])
        prog = (
            f'source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words)}; _noded; printf "%s\\n" "${{COMPREPLY[@]}}"'
        )
        res = subprocess.run(["bash", "-c", prog], capture_output=True, text=True, check=True)
        return res.stdout.split()

    assert {"run", "status", "services", "config", "preflight", "lab"} <= set(complete("''"))
    assert complete("ser") == ["services"]
    assert "--json-logs" in complete("run", "--js")
    assert set(complete("lab", "''")) >= {"up", "down", "demo", "pod"}
    assert complete("cni", "ins") == ["install"]


def test_services_table_names_the_service_behind_each_frontend():
    from noded.model.tracker import ServiceModel
    from tests.objects import service

    m = ServiceModel(node_ips=("192.0.2.1",))
    svc = service("web", "10.96.0.10", [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}])
    svc["spec"]["type"] = "NodePort"
    m.upsert(svc)
    assert m.frontend_names() == {
        "10.96.0.10:80/TCP": "default/web:http/TCP",
        "192.0.2.1:30080/TCP": "default/web:http/TCP",
    }
    m.set_served_locally(frozenset({("10.96.0.10", 80)}))
    assert "10.96.0.10:80/TCP" not in m.frontend_names()
