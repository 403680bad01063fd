"""Shared fixtures. Helpers that are not fixtures live in tests/support.py."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.support import MARK, have, stop_marked


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Interop tests need the real clients; fail loudly (not skip) when they are missing,
    so a CI machine without them cannot pass by accident."""
    needed = ["nbdinfo", "nbdcopy", "nbdsh", "qemu-img", "qemu-io", "nbdkit"]
    missing = [p for p in needed if not have(p)]
    if missing and any("interop" in item.nodeid for item in items):
        raise pytest.UsageError(
            f"interop tests need {', '.join(missing)}: run scripts/setup --test first"
        )


@pytest.fixture(autouse=True)
def no_process_outlives_its_test() -> Iterator[None]:
    """Every process a test starts carries a mark of that test in its environment
    (inherited through forks, so a server gone to the background has it too). When the
    test ends, none may still run: any that does is killed and the test fails, naming
    it. (Processes of module- and session-scoped fixtures are started unmarked.)"""
    mark = f"{os.getpid()}-{uuid.uuid4().hex}"
    os.environ[MARK] = mark
    try:
        yield
    finally:
        del os.environ[MARK]
    leftover = stop_marked(mark)
    if leftover:
        pytest.fail("processes outlived the test (killed now):\n" + "\n".join(leftover))
