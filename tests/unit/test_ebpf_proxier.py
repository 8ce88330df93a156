"""The eBPF proxier against dict-backed maps (noded/bpf/fakes.py), no root: full, partial and failure paths,
and a restart adopting what the maps hold."""

import pytest

from noded.bpf.fakes import fake_lb_maps
from noded.bpf.libbpf import BpfError
from noded.model.tracker import ServiceModel
from noded.services.ebpf import EbpfProxier, describe, read_maps
from tests.objects import endpoint, service, slice_


def cluster(n: int = 3) -> ServiceModel:
    model = ServiceModel()
    for i in range(n):
        model.upsert(service(f"s{i}", f"10.96.0.{i + 1}"))
        model.upsert(slice_(f"s{i}", [endpoint(f"10.244.{i}.{j}") for j in range(1, 4)]))
    return model


def programmed(maps) -> dict[str, list]:
    return {f"{v.frontend.ip}:{v.frontend.port}": sorted(v.ready) for v in describe(maps)}


def expected(n: int = 3) -> dict[str, list]:
    return {f"10.96.0.{i + 1}:80": [(f"10.244.{i}.{j}", 8080) for j in range(1, 4)] for i in range(n)}


def no_orphans(maps) -> bool:
    """Every backend entry is named by a slot, and every slot names a backend entry."""
    frontends, _s, _b = read_maps(maps)
    named = {abs(code) for p in frontends.values() for code in p.backends.values()}
    held = {int(k.value) for k in maps.backends.keys()}  # noqa: SIM118 (a map, not a dict)
    slots = {bid for p in frontends.values() for bid in p.ready + p.terminating}
    return named == held == slots


def test_a_full_sync_programs_every_frontend_with_its_backends():
    maps = fake_lb_maps()
    proxier = EbpfProxier(cluster(), maps)
    assert proxier.sync(full=True) == 3
    assert programmed(maps) == expected() and no_orphans(maps)
    assert len(maps.svc.entries) == 3 * 4 and len(maps.backends.entries) == 9  # a master and 3 slots each


def test_one_endpoint_change_rewrites_only_its_entries():
    model, maps = cluster(), fake_lb_maps()
    proxier = EbpfProxier(model, maps)
    proxier.sync(full=True)
    others = {k: v for k, v in maps.svc.entries.items() if b"\x0a\x60\x00\x02" not in k}  # not 10.96.0.2's
    writes = maps.svc.writes + maps.backends.writes
    model.upsert(slice_("s1", [endpoint("10.244.1.1"), endpoint("10.244.1.9"), endpoint("10.244.1.3")]))
    assert proxier.sync() == 1
    # the new backend, the slot that named the old one, the old backend's removal: nothing else
    assert maps.svc.writes + maps.backends.writes - writes == 3
    assert {k: v for k, v in maps.svc.entries.items() if k in others} == others
    assert programmed(maps)["10.96.0.2:80"] == [("10.244.1.1", 8080), ("10.244.1.3", 8080), ("10.244.1.9", 8080)]
    assert no_orphans(maps)


def test_a_deleted_service_leaves_nothing_behind():
    model, maps = cluster(), fake_lb_maps()
    proxier = EbpfProxier(model, maps)
    proxier.sync(full=True)
    model.delete("Service", "default", "s0")
    proxier.sync()
    assert "10.96.0.1:80" not in programmed(maps)
    assert len(maps.svc.entries) == 2 * 4 and len(maps.backends.entries) == 6 and no_orphans(maps)


@pytest.mark.parametrize("which", ["svc", "backends"])
@pytest.mark.parametrize("after", [0, 1, 2, 5])
def test_a_sync_the_kernel_refuses_midway_is_made_whole_by_the_full_sync_that_follows(which, after):
    """Whatever write fails (a batch cut short, a slot never written), the runner's retry — a full sync —
    compares against what the maps hold, not what noded believed it wrote."""
    model, maps = cluster(), fake_lb_maps()
    proxier = EbpfProxier(model, maps)
    proxier.sync(full=True)
    for i in range(3):
        model.upsert(slice_(f"s{i}", [endpoint(f"10.244.{i}.{j}") for j in (2, 3, 7, 8)]))
    model.upsert(service("s3", "10.96.0.4"))
    model.upsert(slice_("s3", [endpoint("10.244.3.1")]))
    target = getattr(maps, which)
    target.fail_from = target.writes + after
    with pytest.raises(BpfError):
        proxier.sync()
    target.fail_from = None
    proxier.sync(full=True)
    want = {f"10.96.0.{i + 1}:80": [(f"10.244.{i}.{j}", 8080) for j in (2, 3, 7, 8)] for i in range(3)}
    want["10.96.0.4:80"] = [("10.244.3.1", 8080)]
    assert programmed(maps) == want and no_orphans(maps)


def test_full_maps_fail_the_sync_and_room_lets_the_next_full_sync_finish():
    model, maps = cluster(), fake_lb_maps(max_entries=10)
    proxier = EbpfProxier(model, maps)
    with pytest.raises(BpfError, match="full"):
        proxier.sync(full=True)
    for m in (maps.svc, maps.backends):
        m.max_entries = 100
    proxier.sync(full=True)
    assert programmed(maps) == expected() and no_orphans(maps)


def test_a_restarted_proxier_adopts_the_maps_and_rewrites_nothing_that_is_right():
    model, maps = cluster(), fake_lb_maps()
    EbpfProxier(model, maps).sync(full=True)
    writes = maps.svc.writes + maps.backends.writes
    again = EbpfProxier(model, maps)
    again.sync(full=True)
    assert maps.svc.writes + maps.backends.writes == writes
    assert programmed(maps) == expected()


def test_writes_a_refused_sync_never_made_are_not_replayed_later():
    """A service whose entries the kernel refused, deleted before the retry: the retry must not bring it
    back from writes still queued (it compares against the maps, and queues nothing from the failed sync)."""
    model, maps = cluster(), fake_lb_maps()
    proxier = EbpfProxier(model, maps)
    proxier.sync(full=True)
    model.upsert(service("s3", "10.96.0.4"))
    model.upsert(slice_("s3", [endpoint("10.244.3.1")]))
    maps.svc.fail_from = maps.svc.writes  # the slots and the master of s3 are refused
    with pytest.raises(BpfError):
        proxier.sync()
    maps.svc.fail_from = None
    model.delete("Service", "default", "s3")
    proxier.sync(full=True)
    assert programmed(maps) == expected() and no_orphans(maps)
