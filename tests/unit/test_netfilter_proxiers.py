"""The nftables and iptables proxiers against recording fakes (noded/services/fakes.py), no root: what a full
sync, a partial sync and a refused transaction send, and how a full sync repairs what it finds. The same
proxiers program real kernels in tests/bpf and the lab; these pin down their transactions."""

import pytest

from noded.kernel.iptables import IptablesError
from noded.kernel.nft import NftError
from noded.model.tracker import ServiceModel
from noded.services.fakes import RecordingConntrack, RecordingIptables, RecordingNft
from noded.services.iptables import IptablesProxier
from noded.services.nftables import NftProxier
from tests.objects import endpoint, service, slice_
from tests.unit.test_ebpf_proxier import cluster  # 3 services x 3 endpoints

CIDRS = ["10.244.0.0/16"]


def nft_proxier(model):
    nft, conntrack = RecordingNft(), RecordingConntrack()
    return NftProxier(model, CIDRS, conntrack=conntrack, tool=nft), nft


def test_nftables_full_sync_then_an_endpoint_replaced_is_two_elements():
    model = cluster()
    proxier, nft = nft_proxier(model)
    assert proxier.sync(full=True) == 3
    (full,) = nft.scripts
    assert full.count("add chain inet noded pick-tcp-3-offcluster\n") == 1
    assert full.count(": goto pick-tcp-3-offcluster,") + full.count(": goto pick-tcp-3-offcluster }") == 3  # shared
    assert "add chain inet noded service-" not in full  # no chain of their own
    assert "10.96.0.2 . 80 . 1 : 10.244.1.2 . 8080" in full
    # the new endpoint sorts last, yet takes the slot of the one it replaces (plan_slots, as in eBPF)
    model.upsert(slice_("s1", [endpoint("10.244.1.1"), endpoint("10.244.1.99"), endpoint("10.244.1.3")]))
    assert proxier.sync() == 1
    assert nft.scripts[-1].splitlines() == [
        "delete element inet noded hairpin { 10.244.1.2 . 10.244.1.2 }",
        "delete element inet noded endpoints-tcp { 10.96.0.2 . 80 . 1 }",
        "add element inet noded hairpin { 10.244.1.99 . 10.244.1.99 }",
        "add element inet noded endpoints-tcp { 10.96.0.2 . 80 . 1 : 10.244.1.99 . 8080 }",
    ]
    assert proxier.sync() == 0 and len(nft.scripts) == 2  # nothing pending: no transaction
    proxier.sync(full=True)  # a full resync keeps the slots as they are
    assert "10.96.0.2 . 80 . 1 : 10.244.1.99 . 8080" in nft.scripts[-1]


def test_nftables_a_new_endpoint_count_makes_its_pick_chain_once():
    model = cluster()
    proxier, nft = nft_proxier(model)
    proxier.sync(full=True)
    four = [endpoint(f"10.244.9.{j}") for j in range(1, 5)]
    model.upsert(slice_("s0", four))
    proxier.sync()
    assert nft.scripts[-1].count("add chain inet noded pick-tcp-4-offcluster") == 1
    assert "10.96.0.1 . tcp . 80 : goto pick-tcp-4-offcluster" in nft.scripts[-1]
    model.upsert(slice_("s2", [endpoint(f"10.244.8.{j}") for j in range(1, 5)]))
    proxier.sync()
    assert "10.96.0.3 . tcp . 80 : goto pick-tcp-4-offcluster" in nft.scripts[-1]
    assert "add chain" not in nft.scripts[-1]


def test_nftables_a_refused_transaction_changes_nothing_and_the_full_retry_converges():
    model = cluster()
    proxier, nft = nft_proxier(model)
    proxier.sync(full=True)
    before = dict(proxier.mirror.programmed)
    model.upsert(slice_("s1", [endpoint("10.244.1.7")]))
    nft.fail_next = 1
    with pytest.raises(NftError):
        proxier.sync()
    assert proxier.mirror.programmed == before  # the mirror follows only what the kernel took
    nft.chains.add("service-deadbeef-default/gone/tcp/http")  # left behind (another run, or tampering)
    assert proxier.sync(full=True) == 3  # what the runner does after a failure
    full = nft.scripts[-1]
    assert "10.96.0.2 . 80 . 0 : 10.244.1.7 . 8080" in full and "add chain inet noded pick-tcp-1-offcluster" in full
    assert "delete chain inet noded service-deadbeef-default/gone/tcp/http" in full
    assert "flush map inet noded endpoints-tcp" in full  # a full sync rewrites the shared maps whole


def test_nftables_udp_frontends_that_changed_have_their_stale_flows_cleared():
    model = ServiceModel()
    model.upsert(service("dns", "10.96.0.10", ports=[{"name": "dns", "port": 53, "protocol": "UDP"}]))
    ports = [{"name": "dns", "port": 53, "protocol": "UDP"}]
    model.upsert(slice_("dns", [endpoint("10.244.1.2")], ports=ports))
    nft, conntrack = RecordingNft(), RecordingConntrack()
    proxier = NftProxier(model, CIDRS, conntrack=conntrack, tool=nft)
    proxier.sync(full=True)
    model.upsert(slice_("dns", [endpoint("10.244.1.3")], ports=ports))
    proxier.sync()
    assert conntrack.cleared[-1] == {("10.96.0.10", 53): frozenset({("10.244.1.3", 53)})}


def test_iptables_partial_sync_sends_the_service_list_and_the_changed_chain_only():
    model = cluster()
    ipt = RecordingIptables()
    proxier = IptablesProxier(model, CIDRS, conntrack=RecordingConntrack(), tools=ipt)
    proxier.sync(full=True)
    v4 = [s for v, s in ipt.scripts if v == 4]
    assert len(v4) == 1 and "-A NODED-POSTROUTING -m conntrack --ctstate DNAT -m bpf" in v4[0]
    assert "-I PREROUTING 1 -m comment --comment noded-services -j NODED-SERVICES" in v4[0]  # jumps restored
    model.upsert(slice_("s1", [endpoint("10.244.1.1"), endpoint("10.244.1.9")]))
    proxier.sync()
    version, script = ipt.scripts[-1]
    assert version == 4
    nat = script.split("*filter")[0]
    declared = [line for line in nat.splitlines() if line.startswith(":")]
    assert declared[0] == ":NODED-SERVICES - [0:0]" and len(declared) == 2  # the list and s1's chain
    assert "--to-destination 10.244.1.9:8080" in script
    assert "10.244.0.1:8080" not in script and "10.244.2.1:8080" not in script  # other services' chains untouched
    assert script.count("-A NODED-SERVICES -d 10.96.0.") == 3  # the whole linear list, as kube-proxy


def test_iptables_a_refused_restore_is_retried_whole():
    model = cluster()
    ipt = RecordingIptables()
    proxier = IptablesProxier(model, CIDRS, conntrack=RecordingConntrack(), tools=ipt)
    proxier.sync(full=True)
    model.upsert(service("s3", "10.96.0.4"))
    model.upsert(slice_("s3", [endpoint("10.244.3.1")]))
    ipt.fail_next = 1
    with pytest.raises(IptablesError):
        proxier.sync()
    assert all("10.96.0.4" not in r.nat_service_rule for r in proxier.mirror.programmed.values())
    ipt.saved[(4, "nat")] = "*nat\n:NODED-SEP-STALE - [0:0]\nCOMMIT\n"  # a chain nobody wants any more
    proxier.sync(full=True)
    script = next(s for v, s in reversed(ipt.scripts) if v == 4)
    assert "-d 10.96.0.4/32" in script and "-X NODED-SEP-STALE" in script


@pytest.mark.parametrize("mode", ["nftables", "iptables"])
def test_a_change_wakes_the_proxier_s_own_tracker_and_its_next_sync_takes_just_that(mode):
    model = cluster()
    if mode == "nftables":
        proxier, _nft = nft_proxier(model)
    else:
        proxier = IptablesProxier(model, CIDRS, conntrack=RecordingConntrack(), tools=RecordingIptables())
    proxier.sync(full=True)
    woken: list[int] = []
    proxier.tracker.wake = lambda: woken.append(1)  # as the daemon sets it: the runner's run()
    model.upsert(slice_("s1", [endpoint("10.244.1.9")]))
    assert woken == [1] and proxier.tracker.pending() == 1
    assert proxier.sync() == 1 and proxier.tracker.pending() == 0
