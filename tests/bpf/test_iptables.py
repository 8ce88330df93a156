"""iptables mode on real rulesets in a netns of the test's own: partial syncs, tamper repair, backend
detection, cleanup."""

from noded.kernel.iptables import detect_backend
from noded.lab import netns
from noded.services import iptables, iptrules
from tests.bpf.conftest import IptEnv, env_fixture
from tests.objects import endpoint, service, slice_

ipt_lb = env_fixture(IptEnv)


def run(env, *argv):
    return netns.nsenter(env.ns, list(argv), capture_output=True, text=True, check=True).stdout


def test_partial_sync_rewrites_only_the_service_list_and_changed_chains(ipt_lb):
    objs = []
    for i in range(50):
        objs += [service(f"s{i}", f"10.96.1.{i + 1}"), slice_(f"s{i}", [endpoint(f"10.244.{i}.{j}") for j in (1, 2)])]
    ipt_lb.apply(*objs)
    before = chains_of(ipt_lb, "10.96.1.8")
    ipt_lb.apply(slice_("s7", [endpoint("10.244.7.1"), endpoint("10.244.7.9")]))
    script = ipt_lb.proxier.last_scripts[4]
    declared = {line[1:].split()[0] for line in script.split("\n") if line.startswith(":")} - {"NODED-SERVICES"}
    assert declared and declared <= before | chains_of(ipt_lb, "10.96.1.8")  # s7's chains, no other service's
    assert "DNAT --to-destination 10.244.7.9:8080" in script and "10.244.7.2" not in script  # 10.244.7.2 went
    assert "NODED-SEP-" not in script  # no endpoint chains without affinity
    views = {str(v.frontend): v for v in describe(ipt_lb)}
    assert len(views) == 50
    assert sorted(a for a, _ in views["10.96.1.8:80/TCP"].ready) == ["10.244.7.1", "10.244.7.9"]


def chains_of(env, ip):
    return {c for fe, r in env.proxier.mirror.programmed.items() if fe.ip == ip for c in r.chains}


def describe(env):
    tools = env.proxier.tools
    return iptrules.describe(tools.save(4, "nat") + tools.save(6, "nat"), tools.save(4, "filter"))


def test_full_resync_repairs_tampering(ipt_lb):
    ipt_lb.echo(9001, "a")
    ipt_lb.apply(service("web"), slice_("web", [endpoint("192.0.2.1")], ports=[{"name": "http", "port": 9001}]))
    assert ipt_lb.client("tcp", "10.96.0.10", 80, count=3)["answers"] == {"a": 3}
    backend = ipt_lb.proxier.tools.backend
    ipt = f"iptables-{backend}"
    fe_chain = next(c for r in ipt_lb.proxier.mirror.programmed.values() for c in r.chains if c.startswith("NODED-FE-"))
    run(ipt_lb, ipt, "-t", "nat", "-F", fe_chain)
    run(ipt_lb, ipt, "-t", "nat", "-N", "NODED-ROGUE")
    run(ipt_lb, ipt, "-t", "nat", "-D", "OUTPUT", *iptables.iptrules.JUMPS[1][2].split())
    assert ipt_lb.client("tcp", "10.96.0.10", 80, count=1, timeout=1)["answers"] == {}
    ipt_lb.proxier.sync(full=True)
    assert ipt_lb.client("tcp", "10.96.0.10", 80, count=3)["answers"] == {"a": 3}
    nat = run(ipt_lb, f"{ipt}-save", "-t", "nat")
    assert "NODED-ROGUE" not in nat and nat.count("-j NODED-SERVICES") == 2  # PREROUTING and OUTPUT, once each


def test_backend_detection_follows_existing_rules(ipt_lb):
    prefix = tuple(netns.nsenter_argv(ipt_lb.ns, []))
    iptables.remove_all(prefix)
    system_default = "legacy" if "legacy" in run(ipt_lb, "iptables", "--version") else "nft"
    assert detect_backend(prefix) == system_default
    for _ in range(3):
        run(ipt_lb, "iptables-legacy", "-t", "filter", "-A", "INPUT", "-s", "198.51.100.1", "-j", "ACCEPT")
    assert detect_backend(prefix) == "legacy"
    run(ipt_lb, "iptables-legacy", "-t", "filter", "-F", "INPUT")


def test_remove_all_leaves_nothing(ipt_lb):
    ipt_lb.apply(service("web"), slice_("web", [endpoint("10.244.1.2")]), service("none", "10.96.0.11"))
    removed = iptables.remove_all(tuple(netns.nsenter_argv(ipt_lb.ns, [])))
    assert any("NODED-SERVICES" in r for r in removed)
    for tool in ("iptables", "ip6tables"):
        for backend in ("nft", "legacy"):
            saved = run(ipt_lb, f"{tool}-{backend}-save")
            assert "NODED" not in saved and "noded" not in saved, f"{tool}-{backend}"
