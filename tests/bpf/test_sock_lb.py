"""Service behaviour on the real kernel, the same in every mode: translation, rejection, fallback, affinity, UDP, IPv6.

The `lb` fixture runs each test on the eBPF socket-LB and on nftables; `ebpf_lb` is for map-level checks.
"""

import json
import subprocess
import time

from noded.bpf import sock_lb
from noded.lab.workloads import follow_until
from noded.services.ebpf import EbpfProxier, describe
from tests.bpf.conftest import LINK_ADDRESS
from tests.objects import endpoint, service, slice_

VIP = "10.96.0.10"


def test_tcp_spreads_over_ready_backends_and_app_sees_vip(lb):
    for port, name in ((9001, "a"), (9002, "b"), (9003, "c")):
        lb.echo(port, name)
    lb.apply(
        service("web"),
        slice_("web", [endpoint("127.0.0.1")], ports=[{"name": "http", "port": 9001}], name="s1"),
        slice_("web", [endpoint("127.0.0.1")], ports=[{"name": "http", "port": 9002}], name="s2"),
        slice_("web", [endpoint("127.0.0.1")], ports=[{"name": "http", "port": 9003}], name="s3"),
    )
    out = lb.client("tcp", VIP, 80, count=150)
    assert out["errors"] == {}
    assert set(out["answers"]) == {"a", "b", "c"}
    assert min(out["answers"].values()) >= 20  # random choice: each of 3 gets ~50
    assert out["peers"] == [f"{VIP}:80"]


def test_no_endpoints_is_refused_at_once(lb):
    lb.apply(
        service("web", VIP, [{"name": "http", "port": 80}, {"name": "q", "port": 80, "protocol": "UDP"}]),
        slice_("web", []),
    )
    out = lb.client("tcp", VIP, 80, count=20, timeout=5)
    assert out["errors"] == {"Connection refused": 20}
    assert out["seconds"] < 2  # 20 x 5 s would be a timeout, not a reject
    udp = lb.client("udp", VIP, 80, count=1, timeout=1)
    assert udp["answers"] == {}
    if lb.mode == "ebpf":  # rejected in sendmsg; nftables answers ICMP, which unconnected UDP does not see
        assert udp["errors"] == {"Connection refused": 1}


def test_not_a_service_is_left_alone(lb):
    lb.echo(9001, "a")
    lb.apply(service("web"), slice_("web", [endpoint("127.0.0.1")], ports=[{"name": "http", "port": 9001}]))
    out = lb.client("tcp", "127.0.0.1", 9001, count=3)
    assert out["answers"] == {"a": 3} and out["peers"] == ["127.0.0.1:9001"]


def test_terminating_endpoints_only_when_none_ready(lb):
    lb.echo(9001, "ready")
    lb.echo(9002, "terminating")
    ports = [{"name": "http", "port": 9001}]
    lb.apply(
        service("web"),
        slice_("web", [endpoint("127.0.0.1")], ports=ports, name="s1"),
        slice_(
            "web",
            [endpoint("127.0.0.1", ready=False, serving=True, terminating=True)],
            ports=[{"name": "http", "port": 9002}],
            name="s2",
        ),
    )
    assert lb.client("tcp", VIP, 80, count=30)["answers"] == {"ready": 30}
    lb.apply(
        slice_("web", [endpoint("127.0.0.1", ready=False, serving=True, terminating=True)], ports=ports, name="s1")
    )
    both = lb.client("tcp", VIP, 80, count=40)["answers"]  # both terminating and serving: both used
    assert set(both) == {"ready", "terminating"}
    lb.apply(
        slice_("web", [endpoint("127.0.0.1", ready=False, serving=False, terminating=True)], ports=ports, name="s1")
    )
    assert lb.client("tcp", VIP, 80, count=30)["answers"] == {"terminating": 30}


def test_udp_unconnected_replies_come_from_the_vip(lb):
    lb.echo(9001, "a", udp=5301)
    # a UDP server answers from the address its route picks: use the netns' one address, as a pod would
    lb.apply(
        service("dns", VIP, [{"name": "dns", "port": 53, "protocol": "UDP"}]),
        slice_("dns", [endpoint(LINK_ADDRESS)], ports=[{"name": "dns", "port": 5301, "protocol": "UDP"}]),
    )
    out = lb.client("udp", VIP, 53, count=5)
    assert out["answers"] == {"a": 5}
    assert out["sources"] == [f"{VIP}:53"]


def test_ipv6_vip_and_dual_stack(lb):
    lb.echo(9001, "a")
    lb.apply(
        service("web", [VIP, "fd00:96::10"]),
        slice_("web", [endpoint("127.0.0.1")], ports=[{"name": "http", "port": 9001}], name="v4"),
        slice_("web", [endpoint("::1")], ports=[{"name": "http", "port": 9001}], name="v6", address_type="IPv6"),
    )
    out6 = lb.client("tcp", "fd00:96::10", 80, count=3)
    assert out6["answers"] == {"a": 3} and out6["peers"] == ["fd00:96::10:80"]
    assert lb.client("tcp", VIP, 80, count=3)["answers"] == {"a": 3}
    # an AF_INET6 socket connecting to the IPv4 VIP as a mapped address is translated too
    peer = lb.python(
        "import socket; s = socket.socket(socket.AF_INET6); s.connect(('::ffff:10.96.0.10', 80));"
        "print(s.getpeername()[0])"
    )
    assert peer.strip() == "::ffff:10.96.0.10"


def test_session_affinity_sticks_to_one_backend(lb):
    for port, name in ((9001, "a"), (9002, "b"), (9003, "c")):
        lb.echo(port, name)
    slices = [
        slice_("web", [endpoint("127.0.0.1")], ports=[{"name": "http", "port": p}], name=f"s{p}")
        for p in (9001, 9002, 9003)
    ]
    lb.apply(
        service("web", sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}}), *slices
    )
    first = lb.client("tcp", VIP, 80, count=40)["answers"]
    assert len(first) == 1
    chosen = next(iter(first))
    again = lb.client("tcp", VIP, 80, count=20)["answers"]  # a new process, same netns: same client
    assert again == {chosen: 20}
    # the affine backend goes away: the client moves on and sticks to the new one
    port = {"a": 9001, "b": 9002, "c": 9003}[chosen]
    lb.model.delete("EndpointSlice", "default", f"s{port}")
    lb.proxier.sync()
    moved = lb.client("tcp", VIP, 80, count=20)["answers"]
    assert len(moved) == 1 and chosen not in moved


def test_affinity_off_spreads(lb):
    for port, name in ((9001, "a"), (9002, "b")):
        lb.echo(port, name)
    lb.apply(
        service("web"),
        *[
            slice_("web", [endpoint("127.0.0.1")], ports=[{"name": "http", "port": p}], name=f"s{p}")
            for p in (9001, 9002)
        ],
    )
    assert len(lb.client("tcp", VIP, 80, count=40)["answers"]) == 2


def test_one_endpoint_change_touches_only_its_entries(ebpf_lb):
    lb = ebpf_lb
    objs = []
    for i in range(100):
        objs.append(service(f"s{i}", f"10.96.1.{i + 1}"))
        objs.append(slice_(f"s{i}", [endpoint(f"10.244.{i}.{j}") for j in range(1, 11)]))
    lb.apply(*objs)
    assert lb.proxier.map_writes == 100 * (1 + 10 + 10)  # master + slots + backends
    before = lb.proxier.map_writes
    lb.apply(slice_("s7", [endpoint(f"10.244.7.{j}") for j in range(1, 10)] + [endpoint("10.244.7.99")]))
    assert lb.proxier.map_writes - before == 3  # new backend, its slot, the old backend's removal
    before = lb.proxier.map_writes
    lb.apply(slice_("s8", [endpoint(f"10.244.8.{j}") for j in range(2, 11)]))  # one removed
    assert lb.proxier.map_writes - before == 4  # last slot moved into the hole, master, tail slot, backend
    got = {str(v.frontend): v for v in describe(lb.maps)}
    assert len(got) == 100
    assert sorted(a for a, _ in got["10.96.1.8:80/TCP"].ready) == sorted(
        [f"10.244.7.{j}" for j in range(1, 10)] + ["10.244.7.99"]
    )
    assert len(got["10.96.1.9:80/TCP"].ready) == 9


def test_restart_recovers_from_pinned_maps_and_rewrites_nothing(ebpf_lb):
    lb = ebpf_lb
    objs = [
        service("a", "10.96.0.1"),
        slice_("a", [endpoint("10.244.1.2"), endpoint("10.244.1.3")]),
        service("b", "10.96.0.2"),
        slice_("b", [endpoint("10.244.1.4")]),
        service("stale", "10.96.0.3"),
        slice_("stale", [endpoint("10.244.1.5")]),
    ]
    lb.apply(*objs)
    # "restart": programs reloaded over the pinned maps and links, a fresh model and proxier
    lb.maps.close()
    lb.maps = sock_lb.load_and_attach(lb.bpffs, lb.cgroup)
    from noded.model.tracker import ServiceModel

    model = ServiceModel()
    for obj in objs[:4]:  # "stale" was deleted while the daemon was down
        model.upsert(obj)
    proxier = EbpfProxier(model, lb.maps)
    proxier.sync(full=True)
    frontends = sorted(str(v.frontend) for v in describe(lb.maps))
    assert frontends == ["10.96.0.1:80/TCP", "10.96.0.2:80/TCP"]
    # only the stale frontend's master, slot and backend were deleted
    assert proxier.map_writes == 3
    attached = json.loads(
        subprocess.run(
            ["bpftool", "-j", "cgroup", "show", lb.cgroup], capture_output=True, text=True, check=True
        ).stdout
    )
    assert len(attached) == 8  # links updated in place, not attached twice


def test_udp_flow_follows_a_removed_endpoint_to_the_new_one(lb):
    """A UDP client keeps its source port; once its endpoint is gone its next datagram reaches the new one
    (the netfilter modes delete the stale conntrack flow, which would otherwise still DNAT to the old)."""
    dns = two_udp_backends(lb, "dns", 53)
    ask = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2);"
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 40053));"
        f"s.sendto(b'x', ('{VIP}', 53)); print(s.recv(100).decode().split()[0])"
    )
    assert lb.python(ask).strip() == "a"
    lb.apply(slice_("dns", [endpoint(LINK_ADDRESS)], ports=[{**dns[0], "port": 5302}], name="b"))
    lb.remove("EndpointSlice", "a")
    assert lb.python(ask).strip() == "b"


def two_udp_backends(lb, name, port):
    """Echo servers a (UDP 5301) and b (UDP 5302) on the link address, and service `name` on VIP:port
    whose one endpoint is a."""
    lb.echo(9001, "a", udp=5301)
    lb.echo(9002, "b", udp=5302)
    ports = [{"name": "u", "port": port, "protocol": "UDP"}]
    lb.apply(
        service(name, VIP, ports),
        slice_(name, [endpoint(LINK_ADDRESS)], ports=[{**ports[0], "port": 5301}], name="a"),
    )
    return ports


def test_connected_udp_socket_follows_its_endpoints(lb):
    """A connected UDP socket (glibc's resolver, most UDP clients) keeps the backend it got at connect() in
    eBPF mode unless noded destroys it; in the netfilter modes the stale conntrack flow is deleted. Either
    way the client's traffic reaches the remaining endpoint right after the sync that removed its own."""
    port = two_udp_backends(lb, "follow", 7000)
    proc = lb.follower(VIP, 7000)
    try:
        follow_until(proc, "a")
        lb.apply(slice_("follow", [endpoint(LINK_ADDRESS)], ports=[{**port[0], "port": 5302}], name="b"))
        lb.remove("EndpointSlice", "a")
        removed_at = time.time()
        event, before = follow_until(proc, "b")
        assert event["t"] - removed_at < 1.0, before
        if lb.mode == "ebpf":
            assert lb.terminator.stats.destroyed == 1
            assert any(e.get("error") == "Software caused connection abort" for e in before), before
    finally:
        proc.kill()
        proc.wait()


def test_only_sockets_the_socket_lb_translated_are_destroyed(ebpf_lb):
    """A socket that dialed the backend's own address is not the socket-LB's to move; TCP connections through
    the VIP are destroyed too when asked (terminateTCPConnections, on in this fixture)."""
    lb = ebpf_lb
    lb.echo(9001, "a", udp=5301)
    ports = [{"name": "u", "port": 7000, "protocol": "UDP"}, {"name": "t", "port": 80, "protocol": "TCP"}]
    target = [{**ports[0], "port": 5301}, {**ports[1], "port": 9001}]
    lb.apply(service("both", VIP, ports), slice_("both", [endpoint(LINK_ADDRESS)], ports=target, name="a"))
    direct = lb.follower(LINK_ADDRESS, 5301)
    via_vip = lb.follower(VIP, 7000)
    held = lb.follower(VIP, 80, mode="hold", seconds=3)
    try:
        follow_until(direct, "a")
        follow_until(via_vip, "a")
        time.sleep(0.3)  # the held TCP connection is up and answering
        lb.remove("EndpointSlice", "a")
        assert lb.terminator.stats.destroyed == 2  # the UDP socket through the VIP and the TCP connection
        _event, before = follow_until(direct, "a", 1.0)
        assert not any("error" in e for e in before), before
        out = json.loads(held.communicate(timeout=10)[0])
        assert out["replies"] > 0 and out["failures"], out
    finally:
        for p in (direct, via_vip, held):
            p.kill()
            p.wait()


def test_pins_removed_behind_nodeds_back_are_repaired_at_the_next_full_sync(ebpf_lb):
    lb = ebpf_lb
    lb.proxier = EbpfProxier(lb.model, lb.maps, lb.bpffs, cgroup_path=lb.cgroup)
    lb.echo(9001, "a")
    lb.apply(service("web"), slice_("web", [endpoint("127.0.0.1")], ports=[{"name": "http", "port": 9001}]))
    assert lb.client("tcp", VIP, 80, count=3)["answers"] == {"a": 3}
    # someone cleans up bpffs by hand: a map's pin and a hook's link pin (which detaches the hook)
    subprocess.run(["rm", f"{lb.bpffs}/noded_svc", f"{lb.bpffs}/{sock_lb.LINKS_DIR}/noded_connect4"], check=True)
    broken = lb.client("tcp", VIP, 80, count=1, timeout=1)
    assert broken["answers"] == {} and broken["errors"]  # the VIP is not translated any more
    lb.proxier.sync(full=True)
    assert lb.client("tcp", VIP, 80, count=3)["answers"] == {"a": 3}
    # the pin is the map the proxier holds and the programs use: what it wrote is there through the pin
    reopened = sock_lb.LbMaps.open_pinned(lb.bpffs)
    try:
        assert [str(v.frontend) for v in describe(reopened)] == [f"{VIP}:80/TCP"]
    finally:
        reopened.close()
    assert sorted(sock_lb.cgroup_links(lb.bpffs)) == sorted(lb.proxier.expected_links)
    assert len(lb.proxier.expected_links) == 8
