"""Shared fixtures. Helpers that are not fixtures live in tests/support.py."""

from __future__ import annotations

import pytest

from tests.support import have


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Interop tests need the real clients; fail loudly (not skip) when they are missing,
    so a CI machine without them cannot pass by accident."""
    needed = ["nbdinfo", "nbdcopy", "nbdsh", "qemu-img", "qemu-io", "nbdkit"]
    missing = [p for p in needed if not have(p)]
    if missing and any("interop" in item.nodeid for item in items):
        raise pytest.UsageError(
            f"interop tests need {', '.join(missing)}: run scripts/setup --test first"
        )
