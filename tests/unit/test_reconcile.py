"""The one desired-vs-held reconciler (noded/reconcile.py) and the eBPF plan step that feeds it."""

from noded.model.tracker import ServiceModel
from noded.reconcile import changes, held_by_name, reconcile
from noded.services.ebpf import frontend_tables, plan_frontend
from tests.objects import endpoint, service, slice_


def test_only_new_changed_and_unknown_entries_are_written_and_unwanted_ones_deleted():
    held = {"same": 1, "changed": 1, "unknown": None, "stale": 1}
    wanted = {"same": 1, "changed": 2, "unknown": 1, "new": 1}
    todo = changes(held, wanted)
    assert todo.write == {"changed": 2, "unknown": 1, "new": 1}
    assert todo.delete == ["stale"]
    assert len(todo) == 4


def test_prune_false_keeps_what_nobody_wants_yet():
    assert changes({"theirs": 1}, {"ours": 1}, prune=False).delete == []


def test_writes_come_before_deletes():
    done: list[str] = []
    reconcile({"old": 1}, {"new": 1}, lambda k, _v: done.append(f"write {k}"), lambda k: done.append(f"delete {k}"))
    assert done == ["write new", "delete old"]


def test_a_table_whose_keys_name_their_values_rewrites_nothing_present():
    wanted = {"link-eth0-2": 2, "link-eth1-3": 3}
    held = held_by_name(["link-eth0-2", "link-gone-9"], wanted)
    todo = changes(held, wanted)
    assert todo.write == {"link-eth1-3": 3} and todo.delete == ["link-gone-9"]


def test_nothing_to_do_when_held_is_wanted():
    assert len(changes({"a": (1, 2)}, {"a": (1, 2)})) == 0


def _state(model: ServiceModel):
    return next(iter(model.frontends_of(("default", "web")).values()))


def test_the_ebpf_plan_keeps_ids_and_slots_and_a_terminating_flip_rewrites_only_that_backend():
    model = ServiceModel()
    model.upsert(service("web", "10.96.0.1"))
    model.upsert(slice_("web", [endpoint(f"10.244.0.{i}") for i in (1, 2, 3)]))
    ids = iter(range(1, 100))
    first = plan_frontend(None, _state(model), lambda: 7, lambda: next(ids))
    assert first.svc_id == 7 and first.ready == [1, 2, 3] and first.terminating == []
    model.upsert(
        slice_("web", [endpoint("10.244.0.1"), endpoint("10.244.0.2", ready=False, serving=True, terminating=True)])
    )
    second = plan_frontend(first, _state(model), lambda: 99, lambda: next(ids))
    assert second.svc_id == 7 and second.ready == [1] and second.terminating == [2]
    todo = [changes(h, w) for h, w in zip(frontend_tables(first), frontend_tables(second), strict=True)]
    backends, slots, master = todo
    assert backends.write == {2: (("10.244.0.2", 8080), True)} and backends.delete == [3]
    assert slots.write == {} and slots.delete == [3] and master.write == {0: (1, 1, 0, 0)}
