"""Uninstall or restart: noded's own DaemonSet read from the manifest-directory source (noded/sources/owner.py)."""

from __future__ import annotations

import yaml

from noded.config import SourceConfig
from noded.sources.owner import daemonset_ref, removed, uninstalling

REF = ("kube-system", "noded")


def daemonset(**meta: object) -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "noded", "namespace": "kube-system", **meta},
    }


def test_the_reference_comes_from_the_environment_and_a_malformed_one_is_ignored():
    assert daemonset_ref({"NODED_DAEMONSET": "kube-system/noded"}) == REF
    for bad in ("", "noded", "/noded", "kube-system/", "a/b/c"):
        assert daemonset_ref({"NODED_DAEMONSET": bad}) is None, bad
    assert daemonset_ref({}) is None


def test_present_is_a_restart_deleted_or_absent_is_an_uninstall(tmp_path):
    source = SourceConfig(directory=str(tmp_path))
    (tmp_path / "other.yaml").write_text(
        yaml.safe_dump({**daemonset(), "metadata": {"name": "noded", "namespace": "x"}})
    )
    (tmp_path / "broken.yaml").write_text("{not yaml")  # skipped, the others still read
    assert removed(source, REF) is True  # only a namesake in another namespace: gone
    (tmp_path / "ds.yaml").write_text(yaml.safe_dump(daemonset()))
    assert removed(source, REF) is False
    (tmp_path / "ds.yaml").write_text(yaml.safe_dump(daemonset(deletionTimestamp="2026-12-06T16:00:00Z")))
    assert removed(source, REF) is True
    assert removed(SourceConfig(directory=str(tmp_path / "missing")), REF) is None  # cannot tell


def test_only_a_daemonset_noded_asks(tmp_path):
    source = SourceConfig(directory=str(tmp_path))  # empty: the DaemonSet would be gone
    assert uninstalling(source, {}) is False  # the systemd unit: no NODED_DAEMONSET, never an uninstall
    assert uninstalling(source, {"NODED_DAEMONSET": "kube-system/noded"}) is True
    assert uninstalling(SourceConfig(directory=str(tmp_path / "missing")), {"NODED_DAEMONSET": "a/b"}) is False
