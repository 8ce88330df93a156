import json

import yaml

from noded.sources.directory import DirectorySource
from tests.objects import endpoint, service, slice_


class Recorder:
    def __init__(self):
        self.objects = {}
        self.log = []

    def upsert(self, obj):
        key = (obj["kind"], obj["metadata"].get("namespace", "default"), obj["metadata"]["name"])
        self.objects[key] = obj
        self.log.append(("upsert", key))
        return True

    def delete(self, kind, namespace, name):
        self.objects.pop((kind, namespace, name), None)
        self.log.append(("delete", (kind, namespace, name)))

    def synced(self, source):
        self.log.append(("synced", source))


def test_multi_document_files_changes_and_deletes(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump_all([service("web"), slice_("web", [endpoint("10.244.1.2")])]))
    sink = Recorder()
    src = DirectorySource(str(tmp_path), sink)
    assert src.scan()
    assert set(sink.objects) == {("Service", "default", "web"), ("EndpointSlice", "default", "web-abc")}
    sink.log.clear()
    (tmp_path / "a.yaml").write_text(yaml.safe_dump_all([service("web", "10.96.0.99")]))
    assert src.scan()
    assert sink.log == [("delete", ("EndpointSlice", "default", "web-abc")), ("upsert", ("Service", "default", "web"))]
    assert not src.scan()  # nothing changed, nothing re-read
    (tmp_path / "a.yaml").unlink()
    src.scan()
    assert sink.objects == {}


def test_broken_file_keeps_its_last_good_objects_and_others_load(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(service("web")))
    sink = Recorder()
    src = DirectorySource(str(tmp_path), sink)
    src.scan()
    (tmp_path / "a.yaml").write_text("kind: Service\nmetadata: {name: web\n")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(service("other", "10.96.0.2")))
    src.scan()
    assert ("Service", "default", "web") in sink.objects
    assert ("Service", "default", "other") in sink.objects
    assert "a.yaml" in src.last_error


def test_unkeyable_documents_and_other_kinds_are_skipped(tmp_path):
    (tmp_path / "a.yaml").write_text(
        yaml.safe_dump_all(
            [{"kind": "Service"}, "just a string", {"kind": "ConfigMap", "metadata": {"name": "x"}}, service("web")]
        )
    )
    (tmp_path / "notes.txt").write_text("ignored")
    sink = Recorder()
    DirectorySource(str(tmp_path), sink).scan()
    assert list(sink.objects) == [("Service", "default", "web")]


def test_a_missing_directory_keeps_every_object_until_it_is_back(tmp_path):
    d = tmp_path / "manifests"
    d.mkdir()
    (d / "a.yaml").write_text(yaml.safe_dump(service("web")))
    sink = Recorder()
    src = DirectorySource(str(d), sink)
    src.scan()
    d.rename(tmp_path / "away")  # the source is gone (an unmounted volume, a botched deploy): not "no objects"
    assert not src.scan()
    assert ("Service", "default", "web") in sink.objects and "missing" in src.last_error
    (tmp_path / "away").rename(d)
    (d / "a.yaml").write_text(yaml.safe_dump(service("web", "10.96.0.42")))
    assert src.scan() and src.last_error is None
    assert sink.objects[("Service", "default", "web")]["spec"]["clusterIP"] == "10.96.0.42"
    for f in d.iterdir():  # an empty directory that exists does mean no objects
        f.unlink()
    src.scan()
    assert sink.objects == {}


class Fussy(Recorder):
    """A sink whose parser raises on one object (a bug in it, or a hostile object)."""

    def upsert(self, obj):
        if obj["kind"] == "Pod":
            raise TypeError("'int' object is not subscriptable")
        return super().upsert(obj)


def test_an_object_the_sink_raises_on_is_rejected_alone_and_later_files_still_apply(tmp_path):
    """Issue 17, item 7: a malformed Pod stopped the Services and a DENY policy in later files."""
    bad_pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": 3}}
    deny = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny", "namespace": "default"},
        "spec": {"action": "DENY", "rules": [{}]},
    }
    (tmp_path / "a.yaml").write_text(yaml.safe_dump_all([bad_pod, service("web")]))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump_all([deny, service("other", "10.96.0.2")]))
    sink = Fussy()
    src = DirectorySource(str(tmp_path), sink)
    src.scan()
    assert set(sink.objects) == {
        ("Service", "default", "web"),
        ("AuthorizationPolicy", "default", "deny"),
        ("Service", "default", "other"),
    }
    assert src.rejected == 1 and "Pod default/p" in src.last_error


def test_a_directory_missing_at_start_is_not_synced(tmp_path):
    sink = Recorder()
    src = DirectorySource(str(tmp_path / "nowhere"), sink, interval=0.02)
    src.start()
    try:
        import time

        time.sleep(0.2)
        assert not src.synced and ("synced", "directory") not in sink.log
        (tmp_path / "nowhere").mkdir()
        deadline = time.monotonic() + 5
        while not src.synced and time.monotonic() < deadline:
            time.sleep(0.02)
        assert src.synced and ("synced", "directory") in sink.log
    finally:
        src.stop()


def test_any_file_content_is_rejected_alone(tmp_path):
    """Hypothesis over what a manifest file may hold (YAML-ish text, JSON values, huge and odd documents):
    the source never raises, and the objects of the other files stay exactly as they were."""
    import json as jsonlib

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    good = [service("web"), slice_("web", [endpoint("10.244.1.2")])]
    values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
        max_leaves=10,
    )
    contents = st.one_of(
        st.text(max_size=300),
        values.map(jsonlib.dumps),
        values.map(lambda v: yaml.safe_dump({"kind": "Service", "metadata": {"name": "x"}, "spec": v})),
        st.lists(values, max_size=4).map(lambda docs: yaml.safe_dump_all(docs)),
        st.just("kind: List\nitems: [1, {kind: Pod}, {kind: Service, metadata: {name: 7}}]\n"),
        st.just("a: &a [*a]\n"),
    )

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(contents)
    def check(text):
        d = tmp_path / "d"
        d.mkdir(exist_ok=True)
        (d / "a.yaml").write_text(yaml.safe_dump_all(good))
        (d / "m.yaml").write_text(text)
        sink = Recorder()
        DirectorySource(str(d), sink).scan()
        assert sink.objects[("Service", "default", "web")] == good[0]
        assert sink.objects[("EndpointSlice", "default", "web-abc")] == good[1]

    check()


def test_json_manifests_are_read_by_the_json_module_and_yaml_streams_still_parse():
    from noded.sources.directory import parse_manifests

    listed = '{"apiVersion": "v1", "kind": "List", "items": [{"kind": "Service", "metadata": {"name": "a"}}]}'
    assert parse_manifests(listed, "x/all.json") == [{"kind": "Service", "metadata": {"name": "a"}}]
    two_docs = '{"kind": "Service", "metadata": {"name": "a"}}\n---\n{"kind": "Service", "metadata": {"name": "b"}}\n'
    assert [d["metadata"]["name"] for d in parse_manifests(two_docs, "x/two.json")] == ["a", "b"]


def test_json_lists_are_read_one_item_at_a_time_in_either_field_order():
    """kubectl writes `items` before `kind`; a List is streamed either way, and a `kind` that changes after
    its items were handed out is refused (the whole file), never half-read as a List."""
    import pytest

    from noded.sources.directory import iter_manifests

    items = [service("a"), service("b", "10.96.0.2")]
    for doc in (
        {"apiVersion": "v1", "kind": "List", "items": items},
        {"apiVersion": "v1", "items": items, "kind": "List", "metadata": {}},
    ):
        assert list(iter_manifests(json.dumps(doc, indent=1), "all.json")) == items
    not_a_list = {"kind": "Service", "metadata": {"name": "x"}, "items": [1, 2]}
    assert list(iter_manifests(json.dumps(not_a_list), "x.json")) == [not_a_list]
    assert list(iter_manifests("null", "x.json")) == [] and list(iter_manifests("{}", "x.json")) == [{}]
    stream = iter_manifests('{"kind": "List", "items": [{"kind": "Service"}], "kind": "Service"}', "x.json")
    assert next(stream) == {"kind": "Service"}
    with pytest.raises(ValueError):
        next(stream)
    truncated = iter_manifests(json.dumps({"kind": "List", "items": items})[:-30], "x.json")
    with pytest.raises(ValueError):
        list(truncated)


def test_a_file_broken_part_way_on_the_first_read_takes_back_what_it_handed(tmp_path):
    """The first read hands objects over as they are parsed; a file that then fails leaves the sink as if
    it had never been read: its objects deleted, or an earlier file's object for the same key again."""
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(service("web")))
    broken = yaml.safe_dump_all([service("web", "10.96.0.99"), service("only-b", "10.96.0.3")])
    (tmp_path / "b.yaml").write_text(broken + "---\nkind: Service\nmetadata: {name: x\n")
    (tmp_path / "c.json").write_text('{"kind": "List", "items": [' + json.dumps(service("c")) + ", {")
    sink = Recorder()
    src = DirectorySource(str(tmp_path), sink)
    assert src.scan()
    assert sink.objects == {("Service", "default", "web"): service("web")}
    assert ("upsert", ("Service", "default", "only-b")) in sink.log  # handed, then taken back
    assert sink.log[-1] == ("delete", ("Service", "default", "c"))
    assert "c.json" in src.last_error
    # fixed files are read whole on the next scan
    (tmp_path / "b.yaml").write_text(broken)
    src.scan()
    assert sink.objects[("Service", "default", "web")] == service("web", "10.96.0.99")
    assert ("Service", "default", "only-b") in sink.objects


def test_the_first_read_digests_nothing_its_file_s_first_change_hands_every_object_again_then_only_changes(
    tmp_path,
):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump_all([service("one"), service("two", "10.96.0.2")]))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump_all([service("three", "10.96.0.3")]))
    sink = Recorder()
    src = DirectorySource(str(tmp_path), sink)
    src.scan()
    sink.log.clear()
    (tmp_path / "a.yaml").write_text(yaml.safe_dump_all([service("one"), service("two", "10.96.0.22")]))
    src.scan()  # not digested at the first read: both handed again (the model finds "one" unchanged)
    assert sink.log == [("upsert", ("Service", "default", "one")), ("upsert", ("Service", "default", "two"))]
    sink.log.clear()
    (tmp_path / "a.yaml").write_text(yaml.safe_dump_all([service("one"), service("two", "10.96.0.23")]))
    src.scan()
    assert sink.log == [("upsert", ("Service", "default", "two"))]
    sink.log.clear()
    # a later file takes a key from a first-read one, then gives it back
    (tmp_path / "c.yaml").write_text(yaml.safe_dump_all([service("three", "10.96.0.33")]))
    src.scan()
    assert sink.log == [("upsert", ("Service", "default", "three"))]
    assert sink.objects[("Service", "default", "three")]["spec"]["clusterIP"] == "10.96.0.33"
    sink.log.clear()
    (tmp_path / "c.yaml").unlink()  # b.yaml's object (as first read, never digested) wins the key again
    src.scan()
    assert sink.log == [("upsert", ("Service", "default", "three"))]
    assert sink.objects[("Service", "default", "three")]["spec"]["clusterIP"] == "10.96.0.3"
