"""Test-wide fixtures: the lock-order checker is on for every test, and tests
marked `root` are skipped when not running as root."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from nwfilter.locks import CHECKER


@pytest.fixture(autouse=True)
def lock_order_checker() -> Iterator[None]:
    CHECKER.enabled = True
    CHECKER.violations.clear()
    yield
    violations = list(CHECKER.violations)
    CHECKER.violations.clear()
    assert not violations, "lock-order violations:\n" + "\n".join(violations)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)
