"""readahead: read ahead of sequential readers, in growing windows.

Each connection has a readahead buffer. A read the buffer cannot serve reads a window
from the layer below, starting at the read's offset and at least as long as the read,
and keeps it; following reads inside the window are served from the buffer without
asking the layer below. A read that starts exactly where the buffer ends is sequential:
the next window is twice as large (64 KiB doubling up to 64 MiB). Any other miss resets
the window to 64 KiB. This turns many small sequential reads into few large ones,
which pays off when each request to the layer below is expensive (a remote or
decompressing plugin, a slow disk). Over a local file the kernel reads ahead already
and the filter only adds copying. A random read costs one read of the layer below:
64 KiB, or the read's own size if that is larger.

Consistency:

* A write, trim or zero passed through this filter, by any connection, drops every
  buffer that overlaps it when it finishes, and a window that was being read from the
  layer below meanwhile serves the read that asked for it but is not kept. So a read
  issued after a write's reply always sees that write.
* Flush drops the flushing connection's buffer, so a client can pick up changes made to
  the data behind the server's back.
* Reads of one connection that its buffer cannot serve go to the layer below one at a
  time (in arrival order), so a client with many reads in flight still reads each
  window once; a read the buffer holds is answered at once.

Cache requests are served by reading through the buffer (a prefetch into it).

Memory: one buffer per connection, at most 64 MiB.

Example (sequential copies from a slow read-only source, writable through cow):
  trionbd --filter=readahead --filter=cow file disk.img
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio

from ..chain import Filter, Layer, Next
from ..chain.types import CacheMode
from ..protocol.constants import MAX_REQUEST

MIN_WINDOW = 64 * 1024
"""The first window, and the window after a non-sequential read."""
MAX_WINDOW = MAX_REQUEST
"""The window stops doubling here (64 MiB)."""


@dataclass(eq=False)
class Buffer:
    """One connection's readahead state."""

    lock: trio.Lock = field(default_factory=trio.Lock)
    window: int = MIN_WINDOW
    start: int = 0
    data: bytes = b""
    fetching: tuple[int, int] | None = None
    """``(start, end)`` of the window being read from the layer below."""
    stale: bool = False
    """Set when a write overlapped the window being read: do not keep it."""

    def forget(self, start: int = 0, end: int | None = None) -> None:
        """Drop what overlaps ``[start, end)`` (everything by default)."""
        if end is None or (self.start < end and start < self.start + len(self.data)):
            self.data = b""
        if self.fetching is not None:
            if end is None or (self.fetching[0] < end and start < self.fetching[1]):
                self.stale = True


class ReadaheadFilter(Filter):
    """Serve sequential reads from per-connection windows that grow."""

    name = "readahead"
    # a write drops the overlapping windows of this process's
    # connections only
    process_safe = False
    # nonblocking stays True: the only wait besides the layer below is a connection's
    # own buffer lock, held only across calls to the layer below.

    def __init__(self) -> None:
        self.buffers: set[Buffer] = set()

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, Buffer]:
        buffer = Buffer()
        self.buffers.add(buffer)
        return await below.open(readonly, export_name, is_tls), buffer

    async def close(self, next: Next, h: Buffer) -> None:
        self.buffers.discard(h)

    async def can_cache(self, next: Next, h: Any) -> CacheMode:
        return CacheMode.EMULATE

    def _written(self, offset: int, count: int) -> None:
        # Every connection's buffer, whatever its export: names may alias the same data.
        for buffer in self.buffers:
            buffer.forget(offset, offset + count)

    # --- data ----------------------------------------------------------------------------

    async def pread(self, next: Next, h: Buffer, count: int, offset: int, flags: int) -> bytes:
        data, start = h.data, h.start
        if start <= offset and offset + count <= start + len(data):
            # A hit needs no lock: it does not wait, and a window being fetched is not
            # in ``data`` yet.
            return data[offset - start : offset - start + count]
        async with h.lock:
            parts: list[bytes] = []
            while True:
                data, start = h.data, h.start
                if data and start <= offset < start + len(data):
                    n = min(count, start + len(data) - offset)
                    parts.append(data[offset - start : offset - start + n])
                    offset += n
                    count -= n
                    if not count:
                        break
                    continue
                sequential = data and offset == start + len(data)
                h.window = min(h.window * 2, MAX_WINDOW) if sequential else MIN_WINDOW
                length = min(max(count, h.window), await next.get_size() - offset)
                fetched = await self._fetch(next, h, length, offset, flags)
                parts.append(fetched if length == count else fetched[:count])
                break
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _fetch(self, next: Next, h: Buffer, length: int, offset: int, flags: int) -> bytes:
        h.data = b""
        h.fetching = (offset, offset + length)
        h.stale = False
        try:
            data = await next.pread(length, offset, flags)
        finally:
            h.fetching = None
        if not h.stale:
            h.data, h.start = data, offset
        return data

    async def pwrite(self, next: Next, h: Buffer, buf: bytes, offset: int, flags: int) -> None:
        try:
            await next.pwrite(buf, offset, flags)
        finally:
            self._written(offset, len(buf))

    async def trim(self, next: Next, h: Buffer, count: int, offset: int, flags: int) -> None:
        try:
            await next.trim(count, offset, flags)
        finally:
            self._written(offset, count)

    async def zero(self, next: Next, h: Buffer, count: int, offset: int, flags: int) -> None:
        try:
            await next.zero(count, offset, flags)
        finally:
            self._written(offset, count)

    async def flush(self, next: Next, h: Buffer, flags: int) -> None:
        try:
            await next.flush(flags)
        finally:
            h.forget()


FILTER = ReadaheadFilter
