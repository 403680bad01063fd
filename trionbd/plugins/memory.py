"""memory: a sparse RAM disk.

Serves a writable disk of ``size`` bytes held in memory. Only pages that were written
take memory, so sizes up to 2^63-1 bytes are fine. Data is lost when the server exits.
All clients see the same disk (multi-conn is safe). CACHE requests succeed at once:
the data is in memory already.

Example:
  trionbd memory 1G
"""

from __future__ import annotations

from bisect import bisect_left, insort
from typing import Any

from ..chain import Extent, Param, Plugin, Sparse, parse_size
from ..chain.types import FuaMode
from ..protocol.constants import UNALLOCATED

PAGE = 32 * 1024
"""Allocation unit (bytes)."""
MAX_EXTENTS = 4096
"""Extents returned per block status call (clients ask again for the rest)."""


class MemoryPlugin(Plugin):
    """A sparse RAM disk."""

    name = "memory"
    process_safe = False  # the disk is this process's memory
    params = (Param("size", "size of the disk, e.g. 1G, 512M, 2T", parse_size, required=True),)
    magic_param = "size"
    nonblocking = True

    def __init__(self, size: int):
        self.size = size
        self.pages: dict[int, bytearray] = {}
        self.allocated: list[int] = []
        """Sorted indexes of ``pages``: block status skips holes of any size at once."""

    async def get_size(self, h: Any) -> int:
        return self.size

    async def can_multi_conn(self, h: Any) -> bool:
        return True

    async def can_fua(self, h: Any) -> FuaMode:
        return FuaMode.NATIVE  # nothing is more durable than it already is

    async def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        pages = self.pages
        first = offset // PAGE
        if (offset + count - 1) // PAGE == first:
            page = pages.get(first)
            if page is None:
                return Sparse(bytes(count), ((0, count),))
            start = offset - first * PAGE
            return bytes(page[start : start + count])
        out = bytearray()
        holes: list[tuple[int, int]] = []
        pos = offset
        end = offset + count
        while pos < end:
            index, start = divmod(pos, PAGE)
            n = min(PAGE - start, end - pos)
            page = pages.get(index)
            if page is None:
                rel = pos - offset
                if holes and holes[-1][0] + holes[-1][1] == rel:
                    holes[-1] = (holes[-1][0], holes[-1][1] + n)
                else:
                    holes.append((rel, n))
                out += bytes(n)
            else:
                out += page[start : start + n]
            pos += n
        return Sparse(bytes(out), tuple(holes)) if holes else bytes(out)

    async def pwrite(self, h: Any, buf: bytes, offset: int, flags: int) -> None:
        pages = self.pages
        pos = 0
        count = len(buf)
        view = memoryview(buf)
        while pos < count:
            index, start = divmod(offset + pos, PAGE)
            n = min(PAGE - start, count - pos)
            page = pages.get(index)
            if page is None:
                page = pages[index] = bytearray(PAGE)
                insort(self.allocated, index)
            page[start : start + n] = view[pos : pos + n]
            pos += n

    async def flush(self, h: Any, flags: int) -> None:
        pass

    async def trim(self, h: Any, count: int, offset: int, flags: int) -> None:
        await self.zero(h, count, offset, flags)

    async def zero(self, h: Any, count: int, offset: int, flags: int) -> None:
        """Pages wholly inside the range are dropped, found through ``allocated`` (a
        zero of terabytes costs what the pages in it cost); the pages at its ends that
        it covers in part are zeroed in place."""
        end = offset + count
        first = -(-offset // PAGE)  # the first page starting inside the range
        stop = end // PAGE  # the page after the last one ending inside it
        if first >= stop:
            self._zero_in_pages(offset, end)
            return
        self._zero_in_pages(offset, first * PAGE)
        self._zero_in_pages(stop * PAGE, end)
        allocated = self.allocated
        lo, hi = bisect_left(allocated, first), bisect_left(allocated, stop)
        for index in allocated[lo:hi]:
            del self.pages[index]
        del allocated[lo:hi]

    def _zero_in_pages(self, start: int, end: int) -> None:
        """Zero ``[start, end)``, which covers no page whole, in the pages it touches."""
        pos = start
        while pos < end:
            index, at = divmod(pos, PAGE)
            n = min(PAGE - at, end - pos)
            page = self.pages.get(index)
            if page is not None:
                page[at : at + n] = bytes(n)
            pos += n

    async def can_fast_zero(self, h: Any) -> bool:
        return True

    async def cache(self, h: Any, count: int, offset: int, flags: int) -> None:
        """The data is in memory already: nothing to do, at once (CACHE is offered)."""

    async def extents(self, h: Any, count: int, offset: int, flags: int) -> list[Extent]:
        """Runs of allocated pages are data; everything between them is one hole."""
        allocated = self.allocated
        out: list[Extent] = []
        pos = offset
        end = offset + count
        i = bisect_left(allocated, pos // PAGE)
        while pos < end and len(out) < MAX_EXTENTS:
            if i < len(allocated) and allocated[i] == pos // PAGE:
                last = allocated[i]
                i += 1
                while i < len(allocated) and allocated[i] == last + 1 and last * PAGE < end:
                    last = allocated[i]
                    i += 1
                stop = min(end, (last + 1) * PAGE)
                out.append(Extent(pos, stop - pos, 0))
            else:
                stop = end if i == len(allocated) else min(end, allocated[i] * PAGE)
                out.append(Extent(pos, stop - pos, UNALLOCATED))
            pos = stop
        return out


PLUGIN = MemoryPlugin
