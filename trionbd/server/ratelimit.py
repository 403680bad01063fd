"""A budget for the warnings clients cause, so that none can flood the log.

Why a client's option or request failed is worth a warning (an operator wants to know
that ``partition=3`` does not exist), but a client can fail requests as fast as it can
send them. Each connection logs its first few (``Connection.warn``); all connections
together share one :class:`WarningBudget`.
"""

from __future__ import annotations

import logging

import trio

RATE = 10.0
"""Warnings per second the server logs for its clients, in the long run."""
BURST = 100
"""Warnings logged at once before the rate applies."""


class WarningBudget:
    """A token bucket of warnings: ``burst`` at once, then ``rate`` a second. A warning
    over the budget is counted instead of logged; the count is logged with the next
    warning that is."""

    def __init__(self, rate: float = RATE, burst: int = BURST):
        self.rate = rate
        self.burst = burst
        self.suppressed = 0
        """Warnings held back since the last one logged."""
        self._tokens = float(burst)
        self._last: float | None = None

    def log(self, logger: logging.Logger, msg: str, *args: object) -> None:
        """Log ``msg % args`` as a warning on ``logger`` if the budget allows."""
        now = trio.current_time()
        if self._last is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens < 1:
            self.suppressed += 1
            return
        self._tokens -= 1
        if self.suppressed:
            logger.warning(
                "%d warnings about clients not logged (more than %g a second)",
                self.suppressed,
                self.rate,
            )
            self.suppressed = 0
        logger.warning(msg, *args)
