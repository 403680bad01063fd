"""retry-request: retry a request that failed, on the same context.

When a request to the layer below fails, the filter waits and sends the same request
again, up to ``retry-request-retries`` times, before the client gets the error.
Nothing is reopened: this suits a plugin that fails now and then for no lasting reason
(an ``http`` source behind a load balancer with an unresponsive member), where the
retry filter, which reopens the layer below on every failure, is too heavy. Opening
the export is retried the same way unless ``retry-request-open=false``.

Reads, writes, flushes, trims, zeroes, block status and cache requests are retried,
whatever the error, except fast zero requests (the client asked to hear at once when
zeroing would not be fast). Requests of one connection still run concurrently; each
waits for its own retries only.

Example:
  trionbd --filter=retry-request http https://example.com/disk.img retry-request-delay=1
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import trio

from ..chain import Extent, Filter, Layer, NBDError, Next, Param, parse_bool, parse_seconds
from ..protocol.constants import CmdFlag
from .retry import RETRIABLE, parse_count

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_RETRIES = 1000
"""nbdkit's limit on ``retry-request-retries``."""


def parse_retries(text: str) -> int:
    value = parse_count(text)
    if value > MAX_RETRIES:
        raise ValueError(f"{text!r} is more than {MAX_RETRIES} retries")
    return value


class RetryRequestFilter(Filter):
    """Sends a failed request again, after a wait."""

    name = "retry-request"
    process_safe = True  # a retry repeats one connection's request
    nonblocking = False  # retries wait
    params = (
        Param(
            "retry-request-retries",
            "how many times a request is retried before its error goes to the client",
            parse_retries,
            metavar="N",
            default="2",
        ),
        Param(
            "retry-request-delay",
            "seconds to wait before each retry",
            parse_seconds,
            metavar="SECONDS",
            default="2",
        ),
        Param(
            "retry-request-open",
            "retry opening the export too",
            parse_bool,
            default="true",
        ),
    )

    def __init__(
        self,
        retry_request_retries: int = 2,
        retry_request_delay: float = 2.0,
        retry_request_open: bool = True,
    ):
        self.retries = retry_request_retries
        self.delay = retry_request_delay
        self.retry_open = retry_request_open

    async def _retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(1, self.retries + 1):
            try:
                return await call()
            except RETRIABLE as e:
                log.info(
                    "retry-request: %s failed: %s; retry %d of %d in %gs",
                    what, e, attempt, self.retries, self.delay,
                )  # fmt: skip
            await trio.sleep(self.delay)
        return await call()

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, Any]:
        def opening() -> Awaitable[Next]:
            return below.open(readonly, export_name, is_tls)

        ctx = await (self._retrying("open", opening) if self.retry_open else opening())
        return ctx, None

    async def pread(self, next: Next, h: Any, count: int, offset: int, flags: int) -> bytes:
        return await self._retrying("pread", lambda: next.pread(count, offset, flags))

    async def pwrite(self, next: Next, h: Any, buf: bytes, offset: int, flags: int) -> None:
        await self._retrying("pwrite", lambda: next.pwrite(buf, offset, flags))

    async def flush(self, next: Next, h: Any, flags: int) -> None:
        await self._retrying("flush", lambda: next.flush(flags))

    async def trim(self, next: Next, h: Any, count: int, offset: int, flags: int) -> None:
        await self._retrying("trim", lambda: next.trim(count, offset, flags))

    async def zero(self, next: Next, h: Any, count: int, offset: int, flags: int) -> None:
        if flags & CmdFlag.FAST_ZERO:
            if not await next.can_fast_zero():
                raise NBDError(errno.ENOTSUP, "retry-request: zeroing would not be fast")
            await next.zero(count, offset, flags)
            return
        await self._retrying("zero", lambda: next.zero(count, offset, flags))

    async def extents(
        self, next: Next, h: Any, count: int, offset: int, flags: int
    ) -> Iterable[Extent]:
        return await self._retrying("extents", lambda: next.extents(count, offset, flags))

    async def cache(self, next: Next, h: Any, count: int, offset: int, flags: int) -> None:
        await self._retrying("cache", lambda: next.cache(count, offset, flags))


FILTER = RetryRequestFilter
