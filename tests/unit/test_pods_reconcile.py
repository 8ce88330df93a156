"""The pods' capture follows enrollment through the runner: a pod whose capture cannot be changed makes
reconcile() raise after every other pod was done, and stays due (the runner retries it)."""

from __future__ import annotations

import pytest

from noded.kernel import podns
from noded.model.pods import LABEL, Enrollment
from noded.redirect.manager import PodManager


class Proxy:
    def open_pod(self, *_args, **_kwargs) -> None:
        pass

    def close_pod(self, _key: str) -> bool:
        return True


def pod(name: str, labels: dict | None = None) -> dict:
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": labels or {}},
        "spec": {"nodeName": "node1"},
    }


def test_a_pod_whose_capture_fails_is_reported_and_retried_while_the_others_follow(tmp_path, monkeypatch):
    installed: list[tuple[str, bool]] = []
    broken: set[str] = set()

    def install(netns, enrolled, *_args) -> None:
        if netns in broken:
            raise podns.CaptureError(f"nft in {netns}: no such netns")
        installed.append((netns, enrolled))

    monkeypatch.setattr(podns, "install", install)
    enrollment = Enrollment("node1")
    manager = PodManager(str(tmp_path / "state"), enrollment, Proxy())
    a, b = str(tmp_path / "netns-a"), str(tmp_path / "netns-b")
    for name, netns in (("a", a), ("b", b)):
        (tmp_path / f"netns-{name}").touch()
        enrollment.upsert(pod(name))
        assert manager.add({"containerId": f"c{name}", "netns": netns, "namespace": "shop", "name": name})["ok"]
    installed.clear()
    broken.add(b)  # its netns cannot be entered any more
    for name in ("a", "b"):
        enrollment.upsert(pod(name, {LABEL: "ambient"}))
    with pytest.raises(RuntimeError, match="capture update failed for 1 pods: cb"):
        manager.reconcile()
    assert installed == [(a, True)]  # the other pod followed
    broken.clear()
    manager.reconcile()  # the retry: only the one still due
    assert installed == [(a, True), (b, True)]
    manager.reconcile()  # nothing due any more
    assert len(installed) == 2
