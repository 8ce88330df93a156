"""Markers by folder: tests/unit is `unit`; tests/bpf is `bpf`; tests/e2e is `e2e` (the kernel tiers need root)."""

from __future__ import annotations

import os

import pytest

TIERS = {"unit": "unit", "bpf": "bpf", "e2e": "e2e"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = os.geteuid() == 0
    for item in items:
        tier = TIERS.get(item.path.parent.name)
        if tier:
            item.add_marker(getattr(pytest.mark, tier))
        if tier in ("bpf", "e2e") and not root:
            item.add_marker(pytest.mark.skip(reason="needs root and a real kernel"))
