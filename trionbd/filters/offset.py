"""offset: serve a byte range (a window) of the layer below.

The export is the bytes ``[offset, offset+range)`` of the layer below. Every request is
shifted by ``offset``: reads, writes, trim, zero and cache land at the shifted position,
and block status is asked of the layer below at the shifted position and reported back
relative to the window. Nothing outside the window can be read or written.

The window is checked when a client opens the export, against the size of the layer
below for that export: an offset beyond the end, or an offset+range beyond the end, is
refused for that client with an error naming both numbers (the server keeps serving).
Capabilities (writability, trim, zero, FUA, multi-conn, ...) are those of the layer below.

Example (serve 100 MiB starting 1 MiB into disk.img):
  trionbd --filter=offset file disk.img offset=1M range=100M
"""

from __future__ import annotations

import errno
from typing import NamedTuple

import trio

from ..chain import Extent, Filter, Layer, NBDError, Next, Param, parse_size


class Window(NamedTuple):
    """The part of the layer below that a client sees: ``[start, start+length)``."""

    start: int
    length: int


class WindowFilter(Filter):
    """Base of filters that serve one window of the layer below (offset, partition).

    A subclass says where the window is with :meth:`window`, asked once per open; the
    handle of each connection is its :class:`Window` and every request is shifted here.
    """

    async def window(self, next: Next) -> Window:
        """The window of the export ``next`` is open on; ``NBDError`` refuses the open."""
        raise NotImplementedError

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, Window]:
        next = await below.open(readonly, export_name, is_tls)
        try:
            return next, await self.window(next)
        except BaseException:
            with trio.CancelScope(shield=True):
                await next.close()
            raise

    async def get_size(self, next: Next, h: Window) -> int:
        return h.length

    async def pread(self, next: Next, h: Window, count: int, offset: int, flags: int) -> bytes:
        return await next.pread(count, h.start + offset, flags)

    async def pwrite(self, next: Next, h: Window, buf: bytes, offset: int, flags: int) -> None:
        await next.pwrite(buf, h.start + offset, flags)

    async def trim(self, next: Next, h: Window, count: int, offset: int, flags: int) -> None:
        await next.trim(count, h.start + offset, flags)

    async def zero(self, next: Next, h: Window, count: int, offset: int, flags: int) -> None:
        await next.zero(count, h.start + offset, flags)

    async def cache(self, next: Next, h: Window, count: int, offset: int, flags: int) -> None:
        await next.cache(count, h.start + offset, flags)

    async def extents(
        self, next: Next, h: Window, count: int, offset: int, flags: int
    ) -> list[Extent]:
        # The layer below answers in its own offsets, clipped to the asked range (which
        # lies inside the window): shift them back.
        below = await next.extents(count, h.start + offset, flags)
        return [Extent(e.offset - h.start, e.length, e.flags) for e in below]


class OffsetFilter(WindowFilter):
    """Serve ``[offset, offset+range)`` of the layer below."""

    name = "offset"
    process_safe = True
    params = (
        Param("offset", "first byte of the window, k/M/G allowed", parse_size, default="0"),
        Param(
            "range",
            "length of the window (default: from offset to the end of the layer below)",
            parse_size,
        ),
    )

    def __init__(self, offset: int = 0, range: int | None = None):
        self.offset = offset
        self.range = range

    async def window(self, next: Next) -> Window:
        size = await next.get_size()
        where = f"{next.name} export {next.export_name!r} has {size} bytes"
        if self.offset > size:
            raise NBDError(
                errno.EIO, f"offset: offset={self.offset} is beyond the end of the data ({where})"
            )
        if self.range is None:
            return Window(self.offset, size - self.offset)
        if self.offset + self.range > size:
            raise NBDError(
                errno.EIO,
                f"offset: offset+range={self.offset}+{self.range}={self.offset + self.range} "
                f"is beyond the end of the data ({where})",
            )
        return Window(self.offset, self.range)


FILTER = OffsetFilter
