"""The warning budget: a burst, then a rate; what is held back is counted, not lost."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from trionbd.server.ratelimit import WarningBudget

log = logging.getLogger("tests.ratelimit")


async def test_a_burst_then_the_rate_and_a_count_of_what_was_held_back(
    mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    budget = WarningBudget(rate=2, burst=3)
    with caplog.at_level(logging.WARNING, logger="tests.ratelimit"):
        for i in range(10):
            budget.log(log, "failure %d", i)
        assert [r.getMessage() for r in caplog.records] == [f"failure {i}" for i in range(3)]
        assert budget.suppressed == 7
        mock_clock.jump(0.5)  # one token back
        budget.log(log, "failure %d", 10)
        budget.log(log, "failure %d", 11)
    assert [r.getMessage() for r in caplog.records[3:]] == [
        "7 warnings about clients not logged (more than 2 a second)",
        "failure 10",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    assert budget.suppressed == 1


async def test_the_budget_refills_only_up_to_the_burst(
    mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    budget = WarningBudget(rate=10, burst=2)
    with caplog.at_level(logging.WARNING, logger="tests.ratelimit"):
        budget.log(log, "first")
        mock_clock.jump(3600)
        for i in range(5):
            budget.log(log, "again %d", i)
    assert [r.getMessage() for r in caplog.records] == ["first", "again 0", "again 1"]
