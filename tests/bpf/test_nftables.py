"""nftables mode on a real ruleset in a netns of the test's own: partial syncs, tamper repair, cleanup."""

from noded.kernel.nft import nft, nft_json
from noded.lab import netns
from noded.services import nftables, nftrules
from tests.bpf.conftest import NftEnv, env_fixture
from tests.objects import endpoint, service, slice_

nft_lb = env_fixture(NftEnv)


def cmd(env):
    return tuple(netns.nsenter_argv(env.ns, ["nft"]))


def test_partial_sync_touches_only_the_changed_frontend(nft_lb):
    objs = []
    for i in range(50):
        objs += [service(f"s{i}", f"10.96.1.{i + 1}"), slice_(f"s{i}", [endpoint(f"10.244.{i}.{j}") for j in (1, 2)])]
    nft_lb.apply(*objs)
    # an endpoint replaced: its elements in the shared endpoint map (and the hairpin set), no rule
    nft_lb.apply(slice_("s7", [endpoint("10.244.7.1"), endpoint("10.244.7.9")]))
    script = nft_lb.proxier.last_script
    assert script.split("\n")[:-1] == [
        "delete element inet noded hairpin { 10.244.7.2 . 10.244.7.2 }",
        "delete element inet noded endpoints-tcp { 10.96.1.8 . 80 . 1 }",
        "add element inet noded hairpin { 10.244.7.9 . 10.244.7.9 }",
        "add element inet noded endpoints-tcp { 10.96.1.8 . 80 . 1 : 10.244.7.9 . 8080 }",
    ]

    def views():
        doc = nft_json("list", "table", "inet", "noded", cmd=cmd(nft_lb))
        return {str(v.frontend): v for v in nftrules.describe(doc)}

    assert len(views()) == 50
    assert sorted(a for a, _ in views()["10.96.1.8:80/TCP"].ready) == ["10.244.7.1", "10.244.7.9"]
    # a third endpoint: the frontend's element goes to the pick chain for three (made now), no rule of its own
    nft_lb.apply(slice_("s7", [endpoint(f"10.244.7.{j}") for j in (1, 9, 5)]))
    script = nft_lb.proxier.last_script
    assert "add element inet noded service-ips { 10.96.1.8 . tcp . 80 : goto pick-tcp-3-offcluster }" in script
    assert "add chain inet noded pick-tcp-3-offcluster" in script
    assert not any(f"10.96.1.{i + 1} " in script for i in range(50) if i != 7)
    assert "flush map" not in script  # not a full sync
    assert sorted(a for a, _ in views()["10.96.1.8:80/TCP"].ready) == ["10.244.7.1", "10.244.7.5", "10.244.7.9"]


def test_full_resync_repairs_tampering(nft_lb):
    nft_lb.echo(9001, "a")
    nft_lb.apply(service("web"), slice_("web", [endpoint("192.0.2.1")], ports=[{"name": "http", "port": 9001}]))
    assert nft_lb.client("tcp", "10.96.0.10", 80, count=3)["answers"] == {"a": 3}
    rules = next(iter(nft_lb.proxier.mirror.programmed.values()))
    ((pick_chain, _rules),) = rules.picks
    nft(
        f"flush chain inet noded {pick_chain}\nadd chain inet noded rogue\nflush map inet noded service-ips\n",
        cmd(nft_lb),
    )
    assert nft_lb.client("tcp", "10.96.0.10", 80, count=1, timeout=1)["answers"] == {}
    nft_lb.proxier.sync(full=True)
    assert nft_lb.client("tcp", "10.96.0.10", 80, count=3)["answers"] == {"a": 3}
    chains = [
        i["chain"]["name"]
        for i in nft_json("list", "table", "inet", "noded", cmd=cmd(nft_lb))["nftables"]
        if "chain" in i
    ]
    assert "rogue" not in chains
    # even the whole table deleted behind noded's back comes back
    nftables.delete_table(cmd(nft_lb))
    nft_lb.proxier.sync(full=True)
    assert nft_lb.client("tcp", "10.96.0.10", 80, count=3)["answers"] == {"a": 3}


def test_delete_table_removes_everything(nft_lb):
    nft_lb.apply(service("web"), slice_("web", [endpoint("10.244.1.2")]))
    assert nftables.table_exists(cmd(nft_lb))
    assert nftables.delete_table(cmd(nft_lb))
    assert not nftables.table_exists(cmd(nft_lb))
    assert not nftables.delete_table(cmd(nft_lb))
