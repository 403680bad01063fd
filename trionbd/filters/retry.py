"""retry: on an error from the layer below, reopen it and try again.

When a request (or opening the export) fails, the filter waits, closes its context of
the layer below, opens a new one for the same export, and repeats the request there,
until it succeeds or the retries are used up; the client then gets the last error. A
long copy from a plugin whose connection can drop (``nbd``, ``http``, ``s3``) survives a
short outage this way, with no change to the client or the plugin. By default a
request is tried 6 times (5 retries), waiting 2, 4, 8, 16 and 32 seconds in between:
about a minute before giving up.

Reads, writes, flushes, trims, zeroes, block status and cache requests are retried,
whatever the error. Fast zero requests are not: the client asked to hear at once when
zeroing would not be fast. After a reopen the new context's capabilities and size are
what count: a request past its end fails (EIO for reads, ENOSPC for writes), a write
to a context that can no longer write fails with EROFS, and so on, each retried like
any other error.

``retry-readonly=true``: once anything has failed, the layer below is reopened
read-only for the rest of the connection, and writes, trims and zeroes fail with EROFS
from then on without being tried (a new client opens it as before).

The requests of one connection go to the layer below one at a time (as with nbdkit's
filter): a reopen must not pull the context from under another request.

See also the retry-request filter, which retries single requests without reopening.

Examples:
  trionbd --filter=retry nbd hostname=server.example.com
  trionbd --filter=retry http https://example.com/disk.img retries=10 retry-delay=1
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import trio

from ..chain import (
    Concurrency,
    Extent,
    Filter,
    Layer,
    NBDError,
    Next,
    Param,
    parse_bool,
    parse_int,
    parse_seconds,
)
from ..protocol.constants import CmdFlag

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRIABLE = (NBDError, OSError)
"""What counts as a failure of the layer below (other exceptions are bugs: not retried)."""


def parse_count(text: str) -> int:
    value = parse_int(text)
    if value < 0:
        raise ValueError(f"{text!r} is not a number of retries (0 or more)")
    return value


@dataclass(eq=False)
class Handle:
    """One connection's way to the layer below, which a retry replaces."""

    below: Layer
    readonly: bool
    export_name: str
    is_tls: bool
    ctx: Next | None
    """The context requests go to; ``None`` after a reopen that failed."""
    reopens: int = 0


class RetryFilter(Filter):
    """Reopens the layer below and repeats what failed."""

    name = "retry"
    process_safe = True  # a retry reopens one connection's context
    concurrency = Concurrency.SERIALIZE_REQUESTS
    nonblocking = False  # retries wait
    params = (
        Param(
            "retries",
            "how many times a request is retried before its error goes to the client",
            parse_count,
            metavar="N",
            default="5",
        ),
        Param(
            "retry-delay",
            "seconds to wait before the first retry",
            parse_seconds,
            metavar="SECONDS",
            default="2",
        ),
        Param(
            "retry-exponential",
            "double the wait before each further retry",
            parse_bool,
            default="true",
        ),
        Param(
            "retry-readonly",
            "after a failure, reopen the layer below read-only for the rest of the connection",
            parse_bool,
            default="false",
        ),
    )

    def __init__(
        self,
        retries: int = 5,
        retry_delay: float = 2.0,
        retry_exponential: bool = True,
        retry_readonly: bool = False,
    ):
        self.retries = retries
        self.delay = retry_delay
        self.exponential = retry_exponential
        self.force_readonly = retry_readonly

    async def _retrying(
        self,
        h: Handle,
        what: str,
        call: Callable[[Next], Awaitable[T]],
        end: int | None = None,
        failed: Exception | None = None,
    ) -> T:
        """``call`` on the current context, retried (reopening first) while it fails.
        ``end``: where the request ends, checked against the current context's size (a
        write past it fails with ENOSPC, anything else with EIO). ``failed``: the first
        attempt has been made already, and failed so."""
        delay = self.delay
        error = failed
        for attempt in range(self.retries + 1):
            if attempt:
                log.info(
                    "retry: %s failed: %s; retry %d of %d in %gs",
                    what, error, attempt, self.retries, delay,
                )  # fmt: skip
                await trio.sleep(delay)
                if self.exponential:
                    delay *= 2
                try:
                    await self._reopen(h)
                except RETRIABLE as e:
                    error = e
                    continue
            elif failed is not None:
                continue
            ctx = h.ctx
            if ctx is None:
                error = NBDError(errno.ESHUTDOWN, "retry: the layer below could not be reopened")
                continue
            if end is not None and end > await ctx.get_size():
                writing = what in ("pwrite", "trim", "zero")
                error = NBDError(
                    errno.ENOSPC if writing else errno.EIO,
                    f"retry: {what} beyond the end of the reopened export",
                )
                continue
            try:
                return await call(ctx)
            except RETRIABLE as e:
                error = e
        assert error is not None
        log.info("retry: %s failed after %d retries: %s", what, self.retries, error)
        raise error

    async def _reopen(self, h: Handle) -> None:
        """Close the current context of the layer below and open a new one."""
        h.reopens += 1
        old, h.ctx = h.ctx, None
        if old is not None:
            try:
                await old.close()
            except RETRIABLE as e:  # the old context may have lost data: a failure too
                message = f"retry: closing the layer below failed: {e}"
                raise NBDError(errno.ESHUTDOWN, message) from e
        h.ctx = await h.below.open(h.readonly or self.force_readonly, h.export_name, h.is_tls)

    def _no_writes(self, h: Handle, what: str) -> None:
        if h.reopens and self.force_readonly:
            raise NBDError(errno.EROFS, f"retry: {what} refused: read-only since a failure")

    # --- open, close ---------------------------------------------------------------------

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, Handle]:
        h = Handle(below, readonly, export_name, is_tls, None)
        try:
            h.ctx = await below.open(readonly, export_name, is_tls)
        except RETRIABLE as e:
            await self._retrying(h, "open", _nothing, failed=e)
        assert h.ctx is not None
        return h.ctx, h

    async def close(self, next: Next, h: Handle) -> None:
        log.debug("retry: %d reopens of %s", h.reopens, next)
        if h.ctx is not None and h.ctx is not next:
            await h.ctx.close()  # the chain closes ``next``, the context open returned

    # --- data ----------------------------------------------------------------------------

    async def pread(self, next: Next, h: Handle, count: int, offset: int, flags: int) -> bytes:
        return await self._retrying(
            h, "pread", lambda ctx: ctx.pread(count, offset, flags), offset + count
        )

    async def pwrite(self, next: Next, h: Handle, buf: bytes, offset: int, flags: int) -> None:
        self._no_writes(h, "pwrite")
        await self._retrying(
            h, "pwrite", lambda ctx: ctx.pwrite(buf, offset, flags), offset + len(buf)
        )

    async def flush(self, next: Next, h: Handle, flags: int) -> None:
        await self._retrying(h, "flush", lambda ctx: ctx.flush(flags))

    async def trim(self, next: Next, h: Handle, count: int, offset: int, flags: int) -> None:
        self._no_writes(h, "trim")
        await self._retrying(h, "trim", lambda ctx: ctx.trim(count, offset, flags), offset + count)

    async def zero(self, next: Next, h: Handle, count: int, offset: int, flags: int) -> None:
        self._no_writes(h, "zero")
        if flags & CmdFlag.FAST_ZERO:
            # The client asked to hear at once if zeroing would not be fast: no waiting.
            if h.ctx is None or not await h.ctx.can_fast_zero():
                raise NBDError(errno.ENOTSUP, "retry: zeroing would not be fast")
            await h.ctx.zero(count, offset, flags)
            return
        await self._retrying(h, "zero", lambda ctx: ctx.zero(count, offset, flags), offset + count)

    async def extents(
        self, next: Next, h: Handle, count: int, offset: int, flags: int
    ) -> Iterable[Extent]:
        return await self._retrying(
            h, "extents", lambda ctx: ctx.extents(count, offset, flags), offset + count
        )

    async def cache(self, next: Next, h: Handle, count: int, offset: int, flags: int) -> None:
        await self._retrying(
            h, "cache", lambda ctx: ctx.cache(count, offset, flags), offset + count
        )

    async def export_description(self, next: Next, h: Handle) -> str | None:
        return await h.ctx.export_description() if h.ctx is not None else None


async def _nothing(ctx: Next) -> None:
    """Opening was what failed: once a reopen succeeds, there is nothing left to do."""


FILTER = RetryFilter
