"""The retry-request filter: a failed request is sent again on the same context, after
a wait; nothing is reopened. Failures come from the error filter, what reaches the
layer below shows in the log filter beneath it; each case runs on trionbd and on
nbdkit 1.32 (which has the filter) alike."""

from __future__ import annotations

import errno
import itertools
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tests.filters.test_retry import READ, SERVERS, through_a_failure
from tests.support import HANG_GUARD, Running, trionbd_exit
from trionbd.chain import Chain, NBDError
from trionbd.filters.error import ErrorFilter
from trionbd.filters.retry_request import RetryRequestFilter
from trionbd.plugins.memory import MemoryPlugin
from trionbd.protocol.constants import CmdFlag

Start = Callable[..., AbstractContextManager[Running]]
FILTER = ["--filter=retry-request"]


@pytest.mark.parametrize("start", SERVERS, ids=["ours", "nbdkit"])
def test_a_temporary_failure_is_retried_on_the_same_context(start: Start, tmp_path: Path) -> None:
    seen = through_a_failure(start, FILTER, ["retry-request-delay=1"], tmp_path, True)
    assert seen.out == ["read ok 4096"]
    assert seen.failures >= 1
    assert seen.events == [*READ, "Disconnect transactions=1"]  # one context all along


@pytest.mark.parametrize("start", SERVERS, ids=["ours", "nbdkit"])
def test_a_lasting_failure_reaches_the_client_after_the_retries(
    start: Start, tmp_path: Path
) -> None:
    params = ["retry-request-retries=3", "retry-request-delay=1"]
    seen = through_a_failure(start, FILTER, params, tmp_path, False)
    assert seen.out == ["read errno EIO"]
    assert seen.failures == 4
    assert seen.events == ["Connect", "Disconnect transactions=0"]


class FlakyOpen(MemoryPlugin):
    """Opening fails with EIO the first ``failures`` times, noting when (Trio's clock)."""

    def __init__(self, failures: int):
        super().__init__(1 << 20)
        self.failures = failures
        self.opens: list[float] = []

    async def open(self, readonly: bool, export_name: str, is_tls: bool) -> Any:
        self.opens.append(trio.current_time())
        if len(self.opens) <= self.failures:
            raise NBDError(errno.EIO, "flaky-open: not this time")
        return None


@pytest.mark.parametrize(("retry_open", "opens"), [(True, 3), (False, 1)])
def test_opening_is_retried_unless_told_not_to(retry_open: bool, opens: int) -> None:
    plugin = FlakyOpen(failures=2)
    retry = RetryRequestFilter(retry_request_delay=0.5, retry_request_open=retry_open)
    chain = Chain(plugin, [retry])

    async def main() -> None:
        if retry_open:
            ctx = await chain.top.open(False, "")
            await ctx.close()
        else:
            with pytest.raises(NBDError):
                await chain.top.open(False, "")

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(plugin.opens) == opens
    assert [b - a for a, b in itertools.pairwise(plugin.opens)] == [0.5] * (opens - 1)


def test_fast_zero_is_not_retried() -> None:
    """A client probing fast zero hears the error at once (a retry would wait 1000 s)."""
    retry = RetryRequestFilter(retry_request_delay=1000)
    chain = Chain(MemoryPlugin(1 << 20), [retry, ErrorFilter(error_zero_rate=1.0)])

    async def main() -> None:
        ctx = await chain.top.open(False, "")
        try:
            with trio.fail_after(HANG_GUARD), pytest.raises(NBDError):
                await ctx.zero(4096, 0, CmdFlag.FAST_ZERO)
        finally:
            await ctx.close()

    trio.run(main)


def test_more_than_1000_retries_are_refused() -> None:
    result = trionbd_exit("--filter=retry-request", "memory", "1M", "retry-request-retries=1001")
    assert result.returncode == 2
    assert "'1001' is more than 1000 retries" in result.stderr
