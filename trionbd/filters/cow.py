"""cow: a writable copy-on-write overlay; the layer below is never written.

The layer below is opened read-only (so read-only plugins become writable). Writes,
trims and zeroes go to an overlay: a sparse temporary file, unlinked as soon as it is
created, divided into blocks of ``cow-block-size`` bytes, with one state byte per block
in memory (not yet written / holds data / zeroed). A read takes written blocks from the
overlay, zeroed blocks as zeroes, and everything else from the layer below. Everything
written is thrown away when the server exits; copy the export out (``nbdcopy``) to keep
it.

Details:

* Partial blocks: the first write to part of a block reads the whole block from the
  layer below, patches it and stores it in the overlay. Whole blocks are stored as they
  come. Two clients writing different bytes of one block at the same time never lose
  each other's data (see ``Overlay`` for why no locks are needed).
* Trim and zero: a whole block trimmed or zeroed becomes a zeroed block (its space in
  the overlay is punched out); it reads as zeroes and block status reports it as a hole
  that reads as zeroes. Partial blocks get zeroes written. A zero request with
  ``NO_HOLE`` stores real zeroes instead (reported as data). Zeroing is never slower
  than writing zeroes, so fast zero is supported.
* Block status merges the overlay (data, or hole+zero) with the layer below's own answer
  for the blocks not written.
* All clients of one export share its overlay, so they see each other's writes and
  multi-conn is advertised. Each export name gets its own overlay, made when a client
  first opens that export; the underlying export must not change size meanwhile.
* Flush and FUA succeed at once without syncing anything: the overlay is a temporary
  file that dies with the server, so there is no durability to give.
* Memory: one byte per block (16 MiB for 1 TiB with 64 KiB blocks).

The overlay lives in ``$TMPDIR`` (``/var/tmp`` when unset, since it can grow as large as
the disk). Start-up fails if no temporary file can be created there.

Example (writable view of a read-only disk image; the image is never modified):
  trionbd --filter=cow file disk.img
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import trio

from ..chain import (
    ConfigError,
    Extent,
    Filter,
    Layer,
    NBDError,
    Next,
    Param,
    parse_bool,
    parse_size,
)
from ..chain.types import BlockSize, CacheMode, FuaMode, ZeroMode
from ..osutil import punch_hole
from ..protocol.constants import UNALLOCATED, CmdFlag

DEFAULT_BLOCK_SIZE = 64 * 1024
MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 1 << 31
DEFAULT_TMPDIR = "/var/tmp"

UNWRITTEN = 0
"""Block state: not in the overlay; read from the layer below."""
DATA = 1
"""Block state: the overlay holds the block."""
ZEROED = 2
"""Block state: trimmed or zeroed; reads as zeroes."""


def parse_block_size(text: str) -> int:
    value = parse_size(text)
    if not MIN_BLOCK_SIZE <= value <= MAX_BLOCK_SIZE or value & (value - 1):
        raise ValueError(f"{text!r} is not a power of two from 4096 to 2G")
    return value


def parse_cow_on_read(text: str) -> bool | str:
    """``true``/``false``, or an absolute path whose existence switches it on."""
    return text if text.startswith("/") else parse_bool(text)


class Overlay:
    """The overlay of one export: an unlinked sparse file and a state byte per block.

    Concurrency without locks: a block's state and its bytes in the overlay always change
    together, synchronously (overlay I/O runs inline in the Trio thread on purpose, never
    in a worker thread), so no other task sees one without the other. The only await in
    a change is reading a block's old bytes from the layer below for a partial write;
    afterwards the state is looked at afresh. The layer below never changes, so the old
    bytes are still right if the block is still unwritten; if another request wrote or
    zeroed the block meanwhile, the piece is put onto that instead. Concurrent writes to
    one block, from any number of clients, therefore never lose data; the worst case is
    two reads of the same old block.
    """

    def __init__(self, size: int, block_size: int, directory: str):
        self.size = size
        self.block_size = block_size
        self.file = tempfile.TemporaryFile(prefix="trionbd-cow-", dir=directory)
        self.fd = self.file.fileno()
        os.ftruncate(self.fd, size)
        self.states = bytearray(-(-size // block_size))
        self.can_punch = True

    def close(self) -> None:
        self.file.close()

    def span(self, block: int) -> tuple[int, int]:
        """``(offset, length)`` of ``block`` (the last block may be short)."""
        start = block * self.block_size
        return start, min(self.block_size, self.size - start)

    def runs(self, offset: int, count: int) -> Iterator[tuple[int, int, int]]:
        """``(state, start, stop)``: ``[offset, offset + count)`` cut where the state of
        its blocks changes. Each run is found when it is asked for, so a caller that
        awaits between runs sees the states as they are then."""
        states, size = self.states, self.block_size
        pos, end = offset, offset + count
        last = (end - 1) // size + 1  # the block after the last one touched
        while pos < end:
            block = pos // size
            state = states[block]
            stop = last  # the first block after ``block`` in another state, or ``last``
            for other in (UNWRITTEN, DATA, ZEROED):
                if other != state and (found := states.find(other, block + 1, stop)) != -1:
                    stop = found
            stop = min(end, stop * size)
            yield state, pos, stop
            pos = stop

    def blocks(self, start: int, stop: int) -> range:
        """The blocks that ``[start, stop)`` touches."""
        return range(start // self.block_size, (stop - 1) // self.block_size + 1)

    def pieces(self, offset: int, count: int) -> list[tuple[int, int, int, int]]:
        """``(block, offset_in_block, start, stop)`` for each block a request touches;
        ``start:stop`` are positions in the request's buffer."""
        out = []
        pos, end = offset, offset + count
        while pos < end:
            block, within = divmod(pos, self.block_size)
            stop = min(end, pos - within + self.block_size)
            out.append((block, within, pos - offset, stop - offset))
            pos = stop
        return out

    def read_data(self, count: int, offset: int) -> bytes:
        return os.pread(self.fd, count, offset)

    def _write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def _punch(self, offset: int, length: int) -> None:
        if self.can_punch:
            # where holes cannot be punched only space is lost; the state says "zeroed"
            self.can_punch = punch_hole(self.fd, offset, length)

    def _apply(
        self,
        block: int,
        within: int,
        length: int,
        data: memoryview | None,
        hole: bool,
        old: bytes | None = None,
    ) -> bool:
        """Put ``data`` (``None``: zeroes) at ``within`` of ``block``. ``hole``: a whole
        zeroed block becomes a hole. False if the block's ``old`` bytes from the layer
        below are needed first."""
        start, size = self.span(block)
        state = self.states[block]
        if data is None and hole and length == size:
            if state != ZEROED:
                self._punch(start, size)
                self.states[block] = ZEROED
            return True
        if data is None and state == ZEROED:
            return True
        piece = bytes(length) if data is None else data
        if state == DATA or length == size:
            self._write(piece, start + within)
            self.states[block] = DATA
            return True
        if state == ZEROED:
            whole = bytearray(size)
        elif old is not None:
            whole = bytearray(old)
        else:
            return False
        whole[within : within + length] = piece
        self._write(whole, start)
        self.states[block] = DATA
        return True

    async def update(
        self,
        next: Next,
        block: int,
        within: int,
        length: int,
        data: memoryview | None,
        hole: bool,
    ) -> None:
        """Change part of a block (see ``_apply``), reading the layer below if needed."""
        if self._apply(block, within, length, data, hole):
            return
        start, size = self.span(block)
        old = await next.pread(size, start)
        done = self._apply(block, within, length, data, hole, old)  # looks at the state again
        assert done

    async def copy_up(self, next: Next, block: int) -> bytes:
        """The bytes of ``block``, first copying them from the layer below if unwritten."""
        start, size = self.span(block)
        if self.states[block] == UNWRITTEN:
            data = await next.pread(size, start)
            if self.states[block] == UNWRITTEN:  # not written while we read
                self._write(data, start)
                self.states[block] = DATA
                return data
        if self.states[block] == ZEROED:
            return bytes(size)
        return self.read_data(size, start)


class CowFilter(Filter):
    """A writable copy-on-write overlay over a layer that is never written."""

    name = "cow"
    process_safe = False  # the overlay of written blocks lives in this process
    params = (
        Param(
            "cow-block-size",
            "overlay block size: a power of two from 4096 to 2G",
            parse_block_size,
            metavar="SIZE",
            default="64K",
        ),
        Param(
            "cow-on-read",
            "true: also copy blocks read from the layer below into the overlay (useful when "
            "the layer below is slow); /PATH: do so while the file /PATH exists",
            parse_cow_on_read,
            metavar="BOOL|/PATH",
            default="false",
        ),
        Param(
            "cow-on-cache",
            "true: copy blocks into the overlay on cache (prefetch) requests; false: pass "
            "cache requests of unwritten blocks down",
            parse_bool,
            default="false",
        ),
    )
    # nonblocking stays True: no locks, and the overlay's I/O is page-cache I/O done inline.

    def __init__(
        self,
        cow_block_size: int = DEFAULT_BLOCK_SIZE,
        cow_on_read: bool | str = False,
        cow_on_cache: bool = False,
    ):
        self.blksize = cow_block_size
        self.on_read = cow_on_read
        self.on_cache = cow_on_cache
        self.directory = os.environ.get("TMPDIR") or DEFAULT_TMPDIR
        self.overlays: dict[str, Overlay] = {}

    def get_ready(self) -> None:
        try:
            tempfile.TemporaryFile(prefix="trionbd-cow-", dir=self.directory).close()
        except OSError as e:
            raise ConfigError(
                f"cow: cannot create the overlay file in {self.directory} (set TMPDIR to "
                f"change it): {e.strerror}"
            ) from None

    def unload(self) -> None:
        for overlay in self.overlays.values():
            overlay.close()
        self.overlays.clear()

    def copy_on_read(self) -> bool:
        if isinstance(self.on_read, str):
            return os.path.exists(self.on_read)
        return self.on_read

    # --- per connection ------------------------------------------------------------------

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, Overlay]:
        next = await below.open(True, export_name, is_tls)
        try:
            return next, self._overlay(export_name, await next.get_size())
        except BaseException:
            with trio.CancelScope(shield=True):
                await next.close()
            raise

    def _overlay(self, export_name: str, size: int) -> Overlay:
        overlay = self.overlays.get(export_name)
        if overlay is None:
            try:
                overlay = Overlay(size, self.blksize, self.directory)
            except OSError as e:
                raise NBDError(
                    errno.EIO, f"cow: cannot create the overlay in {self.directory}: {e.strerror}"
                ) from None
            self.overlays[export_name] = overlay
        elif overlay.size != size:
            raise NBDError(
                errno.EIO,
                f"cow: export {export_name!r} changed size from {overlay.size} to {size} "
                "bytes under its overlay",
            )
        return overlay

    async def block_size(self, next: Next, h: Overlay) -> BlockSize:
        minimum, preferred, maximum = await next.block_size()
        if maximum >= self.blksize:
            preferred = max(preferred, self.blksize)
        return BlockSize(minimum, preferred, maximum)

    async def can_write(self, next: Next, h: Any) -> bool:
        return True

    async def can_flush(self, next: Next, h: Any) -> bool:
        return True

    async def can_fua(self, next: Next, h: Any) -> FuaMode:
        return FuaMode.NATIVE

    async def can_trim(self, next: Next, h: Any) -> bool:
        return True

    async def can_zero(self, next: Next, h: Any) -> ZeroMode:
        return ZeroMode.NATIVE

    async def can_fast_zero(self, next: Next, h: Any) -> bool:
        return True

    async def can_extents(self, next: Next, h: Any) -> bool:
        return True

    async def can_multi_conn(self, next: Next, h: Any) -> bool:
        return True

    async def can_cache(self, next: Next, h: Any) -> CacheMode:
        return CacheMode.NATIVE

    # --- data ----------------------------------------------------------------------------

    async def pread(self, next: Next, h: Overlay, count: int, offset: int, flags: int) -> bytes:
        copy_up = self.copy_on_read()
        parts: list[bytes] = []
        for state, start, stop in h.runs(offset, count):
            if state == DATA:
                parts.append(h.read_data(stop - start, start))
            elif state == ZEROED:
                parts.append(bytes(stop - start))
            elif not copy_up:
                parts.append(await next.pread(stop - start, start, flags))
            else:
                for block in h.blocks(start, stop):
                    first = block * h.block_size
                    data = await h.copy_up(next, block)
                    parts.append(data[max(start - first, 0) : stop - first])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def pwrite(self, next: Next, h: Overlay, buf: bytes, offset: int, flags: int) -> None:
        view = memoryview(buf)
        for block, within, start, stop in h.pieces(offset, len(buf)):
            await h.update(next, block, within, stop - start, view[start:stop], hole=False)

    async def _zero(self, next: Next, h: Overlay, count: int, offset: int, hole: bool) -> None:
        for block, within, start, stop in h.pieces(offset, count):
            await h.update(next, block, within, stop - start, None, hole)

    async def trim(self, next: Next, h: Overlay, count: int, offset: int, flags: int) -> None:
        await self._zero(next, h, count, offset, hole=True)

    async def zero(self, next: Next, h: Overlay, count: int, offset: int, flags: int) -> None:
        await self._zero(next, h, count, offset, hole=not flags & CmdFlag.NO_HOLE)

    async def flush(self, next: Next, h: Overlay, flags: int) -> None:
        pass  # the overlay is temporary: nothing to make durable

    async def extents(
        self, next: Next, h: Overlay, count: int, offset: int, flags: int
    ) -> list[Extent]:
        out: list[Extent] = []
        for state, start, stop in h.runs(offset, count):
            if state == UNWRITTEN:
                below = await next.extents(stop - start, start, flags)
                out += below
                if below[-1].offset + below[-1].length < stop:
                    break  # the layer below answered for less; the client asks again
            else:
                out.append(Extent(start, stop - start, 0 if state == DATA else UNALLOCATED))
            if flags & CmdFlag.REQ_ONE:
                break
        return out

    async def cache(self, next: Next, h: Overlay, count: int, offset: int, flags: int) -> None:
        for state, start, stop in h.runs(offset, count):
            if state != UNWRITTEN:
                continue
            if self.on_cache:
                for block in h.blocks(start, stop):
                    await h.copy_up(next, block)
            else:
                await next.cache(stop - start, start, flags)


FILTER = CowFilter
