"""cache: keep what passed through in a local file, so a slow layer below is asked less.

Data is cached in blocks, in a sparse temporary file in ``$TMPDIR`` (``/var/tmp`` when
unset) that is unlinked as soon as it is made and so disappears with the server. Each
export name has its own cache, shared by all its clients and kept while the server
runs. A read is served from the cache where it holds the blocks, else from the layer
below. Over a remote or decompressing layer (nbd, http, xz) re-reads then cost a local
read. Clients that cache themselves need this less; put the readahead filter above
this one to speed up sequential reads too.

``cache`` chooses what happens to writes:

* ``writeback`` (the default): writes (and zeroing) go to the cache only; the blocks
  they touch are *dirty* until written back to the layer below: on a flush (then the
  layer below is flushed as well), when evicted, and when the last client of the export
  disconnects (within the server's shutdown timeout, ``--shutdown-timeout``). A write
  with FUA goes through to the layer below at once. Safe for clients that flush, as
  every current one does. Flush is offered even when a writable layer below has none
  (the layer below is then written, not flushed).
* ``writethrough``: every write goes to the layer below before its reply, and into the
  cache where that holds the blocks. For clients that do not flush.
* ``unsafe``: like writeback, but flushes and FUA succeed at once and write nothing;
  dirty blocks reach the layer below only when evicted, otherwise never. Writes are
  lost when the server exits. For throw-away data only.

Writing part of a block that is not cached reads the whole block from the layer below
first (in writeback and unsafe mode). Zeroing is done in the cache like a write of
zeroes (a zeroed block takes no space there); fast zero requests fail at once with
ENOTSUP, since zeroing here is never faster than writing. Trim passes to the layer
below unchanged. Block status reports dirty blocks as data and asks the layer below
about the rest. Cache requests (``NBD_CMD_CACHE``) load blocks into the cache. Except in
writethrough mode, multi-conn is offered: all clients of an export share one cache and a
flush on any connection writes back every dirty block.

``cache-on-read=true`` also keeps the blocks of reads that had to go to the layer
below (whole blocks are read for that); with ``false`` (the default) only writes and
cache requests fill the cache. ``cache-on-read=/PATH`` does so while the file /PATH
exists. The cache then serves stale data if the data below changes behind the server's
back.

``cache-max-size=SIZE`` (at least 1M) bounds the cache: once the blocks it holds
reach ``cache-high-threshold`` percent of SIZE (default 95), the least recently used
ones are evicted (dirty ones written back first) until they are under
``cache-low-threshold`` percent (default 80). Without it the cache grows up to the size
of the export.

The block size is ``cache-min-block-size`` (a power of two, at least 4096; default
64K) or the file system block size of ``$TMPDIR`` if larger. Memory: one byte per block
(16 MiB for 1 TiB with 64K blocks), plus a little per cached block with
``cache-max-size``.

Examples:
  trionbd --filter=cache nbd uri=nbd://slow.example.com/disk cache-on-read=true
  trionbd --filter=cache file disk.img cache=writethrough cache-max-size=1G
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import trio

from ..chain import (
    BlockSize,
    CacheMode,
    ConfigError,
    Extent,
    Filter,
    FuaMode,
    Layer,
    NBDError,
    Next,
    Param,
    ZeroMode,
    parse_choice,
    parse_int,
    parse_size,
)
from ..osutil import punch_hole
from ..protocol.constants import CmdFlag
from .cow import DEFAULT_TMPDIR, parse_block_size, parse_cow_on_read

log = logging.getLogger(__name__)

WRITE_BACK_BLOCKS = 32
"""Dirty blocks written back to the layer below in one request (2 MiB of 64K blocks)."""
LOAD_BYTES = 32 << 20
"""A cache request loads at most this much from the layer below per step."""

NOT_CACHED = 0
CLEAN = 1
"""Block state: cached, the same as the layer below."""
DIRTY = 2
"""Block state: cached, written here and not yet to the layer below."""


def parse_max_size(text: str) -> int:
    value = parse_size(text)
    if value < 1 << 20:
        raise ValueError(f"{text!r} is less than 1M")
    return value


def parse_percent(text: str) -> int:
    value = parse_int(text)
    if value <= 0:
        raise ValueError(f"{text!r} is not a percentage above 0")
    return value


class RangeLock:
    """Exclusive holds on ranges of blocks: a hold waits while it overlaps another."""

    def __init__(self) -> None:
        self.held: list[tuple[int, int]] = []
        self._released = trio.Event()

    def free(self, first: int, stop: int) -> bool:
        return not any(a < stop and first < b for a, b in self.held)

    @asynccontextmanager
    async def hold(self, first: int, stop: int) -> AsyncIterator[None]:
        """Hold blocks ``[first, stop)``; at once, without a checkpoint, when free."""
        while not self.free(first, stop):
            await self._released.wait()
        span = (first, stop)
        self.held.append(span)
        try:
            yield
        finally:
            self.held.remove(span)
            self._released.set()
            self._released = trio.Event()


class Cache:
    """The cache of one export: an unlinked sparse file and a state byte per block.

    Every change of a block's state, and of its bytes in the file, is made holding the
    block in :attr:`lock`, in the same synchronous step (the file is read and written
    inline: page-cache I/O). A read that finds blocks cached reads them without the
    lock, in one step with looking at their states; a read that finds them not cached
    reads the layer below, which already has whatever was written back before.
    """

    def __init__(self, size: int, block_size: int, directory: str, lru: bool):
        self.size = size
        self.block_size = block_size
        self.blocks = -(-size // block_size)
        self.file = tempfile.TemporaryFile(prefix="trionbd-cache-", dir=directory)
        self.fd = self.file.fileno()
        os.ftruncate(self.fd, self.blocks * block_size)
        self.states = bytearray(self.blocks)
        self.cached = 0
        """Blocks held (clean or dirty)."""
        self.lru: collections.OrderedDict[int, None] | None = (
            collections.OrderedDict() if lru else None
        )
        """Cached blocks, least recently used first (kept only with a maximum size)."""
        self.lock = RangeLock()
        self.users = 0
        """Open contexts of this export."""
        self.reclaiming = False
        self.can_punch = True

    def close(self) -> None:
        self.file.close()

    def span(self, offset: int, count: int) -> tuple[int, int]:
        """The blocks ``[first, stop)`` that bytes ``[offset, offset + count)`` touch."""
        return offset // self.block_size, (offset + count - 1) // self.block_size + 1

    def runs(self, offset: int, count: int, states: bytes) -> Iterator[tuple[bool, int, int]]:
        """``(inside, start, stop)``: ``[offset, offset + count)`` cut where its blocks go
        from being in one of ``states`` to not, or back. Each run is found when asked
        for, so a caller that awaits between runs sees the states as they are then."""
        size, found = self.block_size, self.states
        pos, end = offset, offset + count
        last = (end - 1) // size + 1
        while pos < end:
            block = pos // size
            inside = found[block] in states
            stop = last
            for other in (NOT_CACHED, CLEAN, DIRTY):
                if (other in states) != inside:
                    at = found.find(other, block + 1, stop)
                    if at != -1:
                        stop = at
            stop = min(end, stop * size)
            yield inside, pos, stop
            pos = stop

    def partial(self, offset: int, count: int) -> list[int]:
        """The (at most two) blocks that ``[offset, offset + count)`` covers only part of
        (the export's end counts as the end of the last block)."""
        first, stop = self.span(offset, count)
        end = offset + count
        size = self.block_size
        out = []
        if offset % size or (first == stop - 1 and end < min(stop * size, self.size)):
            out.append(first)
        if stop - 1 != first and end % size and end < self.size:
            out.append(stop - 1)
        return out

    # --- synchronous steps: the file and the states change together ----------------------

    def read(self, offset: int, count: int) -> bytes:
        """Cached bytes (the blocks must be cached)."""
        if self.lru is not None:
            for block in range(*self.span(offset, count)):
                self.lru.move_to_end(block)
        return os.pread(self.fd, count, offset)

    def mark(self, first: int, stop: int, state: int) -> None:
        """Blocks ``[first, stop)`` are now cached, in ``state`` (CLEAN or DIRTY)."""
        self.cached += self.states.count(NOT_CACHED, first, stop)
        self.states[first:stop] = bytes((state,)) * (stop - first)
        if self.lru is not None:
            for block in range(first, stop):
                self.lru[block] = None
                self.lru.move_to_end(block)

    def evict(self, block: int) -> None:
        """Drop a block (punched out of the file, where the file system can)."""
        if self.can_punch:
            self.can_punch = punch_hole(self.fd, block * self.block_size, self.block_size)
        self.states[block] = NOT_CACHED
        self.cached -= 1
        if self.lru is not None:
            del self.lru[block]

    def _write(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def _write_zeroes(self, offset: int, length: int) -> None:
        if not (self.can_punch and punch_hole(self.fd, offset, length)):
            self.can_punch = False
            self._write(bytes(length), offset)

    def store(self, offset: int, data: bytes) -> None:
        """Keep whole blocks read from the layer below at ``offset`` (a block boundary),
        clean; the last may be short, at the export's end."""
        self._write(data, offset)
        first = offset // self.block_size
        self.mark(first, first + -(-len(data) // self.block_size), CLEAN)

    def put(self, offset: int, count: int, data: bytes | None, dirty: bool) -> None:
        """Write ``data`` (``None``: zeroes) at ``offset``: whole blocks whatever their
        state, parts of blocks only where cached. With ``dirty`` every block written
        becomes dirty; else whole blocks become clean and the rest keep their state."""
        size = self.block_size
        end = offset + count
        whole_first = -(-offset // size)
        whole_stop = end // size if end < self.size else self.blocks
        if whole_first < whole_stop:
            start = whole_first * size
            if data is None:
                self._write_zeroes(start, whole_stop * size - start)
            else:
                stop = min(whole_stop * size, self.size)
                self._write(memoryview(data)[start - offset : stop - offset], start)
            self.mark(whole_first, whole_stop, DIRTY if dirty else CLEAN)
        for block in self.partial(offset, count):
            if self.states[block] == NOT_CACHED:
                continue
            start, stop = max(offset, block * size), min(end, (block + 1) * size)
            if data is None:
                self._write(bytes(stop - start), start)
            else:
                self._write(memoryview(data)[start - offset : stop - offset], start)
            self.mark(block, block + 1, DIRTY if dirty else self.states[block])

    # --- steps that go to the layer below (callers hold the blocks) ----------------------

    async def load(self, next: Next, first: int, stop: int) -> None:
        """Read the blocks of ``[first, stop)`` that are not cached from the layer below
        and keep them, clean."""
        start = first * self.block_size
        end = min(stop * self.block_size, self.size)
        for missing, a, b in self.runs(start, end - start, bytes((NOT_CACHED,))):
            if missing:
                self.store(a, await next.pread(b - a, a))
            elif self.lru is not None:
                for block in range(*self.span(a, b - a)):
                    self.lru.move_to_end(block)

    async def write_back_held(self, next: Next, first: int, stop: int) -> None:
        """Write the dirty blocks of ``[first, stop)`` to the layer below; they become
        clean. (Runs of zeroes are zeroed there, keeping it sparse.)"""
        start = first * self.block_size
        end = min(stop * self.block_size, self.size)
        for dirty, a, b in self.runs(start, end - start, bytes((DIRTY,))):
            if not dirty:
                continue
            data = os.pread(self.fd, b - a, a)
            if data.count(0) == len(data) and await next.can_zero() is not ZeroMode.NONE:
                await next.zero(b - a, a)
            else:
                await next.pwrite(data, a)
            self.mark(*self.span(a, b - a), CLEAN)

    async def write_back(self, next: Next) -> None:
        """Write every dirty block to the layer below, a run of blocks at a time."""
        block = self.states.find(DIRTY)
        while block != -1:
            stop = min(self.blocks, block + WRITE_BACK_BLOCKS)
            async with self.lock.hold(block, stop):
                await self.write_back_held(next, block, stop)
            block = self.states.find(DIRTY, stop)

    async def reclaim(self, next: Next, high: int, low: int) -> None:
        """Past ``high`` bytes cached, evict least recently used blocks (writing dirty
        ones back first) until under ``low``. One task reclaims at a time; blocks held
        by requests are passed over."""
        if self.lru is None or self.reclaiming or self.cached * self.block_size < high:
            return
        self.reclaiming = True
        try:
            writable = await next.can_write()
            for block in list(self.lru):
                if self.cached * self.block_size < low:
                    break
                if not self.lock.free(block, block + 1):
                    continue
                async with self.lock.hold(block, block + 1):
                    if self.states[block] == DIRTY:
                        if not writable:
                            continue
                        await self.write_back_held(next, block, block + 1)
                    if self.states[block] != NOT_CACHED:
                        self.evict(block)
        except (NBDError, OSError) as e:
            log.error("cache: cannot evict a dirty block, the cache grows: %s", e)
        finally:
            self.reclaiming = False


class CacheFilter(Filter):
    """Caches blocks of the layer below in a local file."""

    name = "cache"
    # each process would keep its own cache: a write in one leaves
    # stale blocks in the others, and writeback blocks would be held apart
    process_safe = False
    nonblocking = False  # requests hold block ranges while they wait for the layer below
    params = (
        Param(
            "cache",
            "writeback: writes stay in the cache until a flush; writethrough: writes also go "
            "to the layer below at once; unsafe: flushes are ignored",
            parse_choice("writeback", "writethrough", "unsafe"),
            default="writeback",
        ),
        Param(
            "cache-min-block-size",
            "cache block size: a power of two from 4096 to 2G (the file system's block size "
            "if that is larger)",
            parse_block_size,
            metavar="SIZE",
            default="64K",
        ),
        Param(
            "cache-max-size",
            "evict blocks to keep the cache about this size (at least 1M)",
            parse_max_size,
            metavar="SIZE",
        ),
        Param(
            "cache-high-threshold",
            "percentage of cache-max-size where eviction starts",
            parse_percent,
            default="95",
        ),
        Param(
            "cache-low-threshold",
            "percentage of cache-max-size where eviction stops",
            parse_percent,
            default="80",
        ),
        Param(
            "cache-on-read",
            "true: also cache what reads fetch from the layer below; /PATH: do so while the "
            "file /PATH exists",
            parse_cow_on_read,
            metavar="BOOL|/PATH",
            default="false",
        ),
    )

    def __init__(
        self,
        cache: str = "writeback",
        cache_min_block_size: int = 64 * 1024,
        cache_max_size: int | None = None,
        cache_high_threshold: int = 95,
        cache_low_threshold: int = 80,
        cache_on_read: bool | str = False,
    ):
        if cache_max_size is not None and cache_low_threshold >= cache_high_threshold:
            raise ConfigError("cache: cache-low-threshold must be below cache-high-threshold")
        self.mode = cache
        self.blksize = cache_min_block_size
        self.max_size = cache_max_size
        self.high = (cache_max_size or 0) * cache_high_threshold // 100
        self.low = (cache_max_size or 0) * cache_low_threshold // 100
        self.on_read = cache_on_read
        self.directory = os.environ.get("TMPDIR") or DEFAULT_TMPDIR
        self.caches: dict[str, Cache] = {}

    def get_ready(self) -> None:
        try:
            with tempfile.TemporaryFile(prefix="trionbd-cache-", dir=self.directory) as f:
                fs_block = os.fstatvfs(f.fileno()).f_bsize
        except OSError as e:
            raise ConfigError(
                f"cache: cannot create the cache file in {self.directory} (set TMPDIR to "
                f"change it): {e.strerror}"
            ) from None
        self.blksize = max(self.blksize, fs_block)

    def unload(self) -> None:
        for cache in self.caches.values():
            cache.close()
        self.caches.clear()

    def cache_on_read(self) -> bool:
        if isinstance(self.on_read, str):
            return os.path.exists(self.on_read)
        return self.on_read

    # --- per connection ------------------------------------------------------------------

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, Cache]:
        next = await below.open(readonly, export_name, is_tls)
        try:
            cache = self._cache(export_name, await next.get_size())
        except BaseException:
            with trio.CancelScope(shield=True):
                await next.close()
            raise
        cache.users += 1
        return next, cache

    def _cache(self, export_name: str, size: int) -> Cache:
        cache = self.caches.get(export_name)
        if cache is None:
            try:
                cache = Cache(size, self.blksize, self.directory, self.max_size is not None)
            except OSError as e:
                raise NBDError(
                    errno.EIO, f"cache: cannot create the cache in {self.directory}: {e.strerror}"
                ) from None
            self.caches[export_name] = cache
        elif cache.size != size:
            raise NBDError(
                errno.EIO,
                f"cache: export {export_name!r} changed size from {cache.size} to {size} "
                "bytes under its cache",
            )
        return cache

    async def close(self, next: Next, h: Cache) -> None:
        h.users -= 1
        if h.users or self.mode == "unsafe" or DIRTY not in h.states:
            return
        # The last client left without flushing everything: write it back now, so that
        # nothing acknowledged is lost when the server exits.
        try:
            await h.write_back(next)
            if await next.can_flush():
                await next.flush()
        except (NBDError, OSError) as e:
            log.error("cache: writing back the dirty blocks of %r failed: %s", next.export_name, e)

    async def block_size(self, next: Next, h: Cache) -> BlockSize:
        minimum, preferred, maximum = await next.block_size()
        if maximum >= h.block_size:
            preferred = max(preferred, h.block_size)
        return BlockSize(minimum, preferred, maximum)

    async def can_cache(self, next: Next, h: Cache) -> CacheMode:
        return CacheMode.NATIVE

    async def can_fast_zero(self, next: Next, h: Cache) -> bool:
        return True  # and every fast zero request fails at once: zeroing here is not fast

    async def can_flush(self, next: Next, h: Cache) -> bool:
        if self.mode == "unsafe" or await next.can_flush():
            return True  # (unsafe: flushes succeed at once, as in nbdkit)
        # Writeback: a flush writes the dirty blocks back, which a writable layer below
        # needs even when it cannot flush itself.
        return self.mode == "writeback" and await next.can_write()

    async def can_fua(self, next: Next, h: Cache) -> FuaMode:
        return FuaMode.NATIVE if self.mode == "unsafe" else await next.can_fua()

    async def can_multi_conn(self, next: Next, h: Cache) -> bool:
        # One cache for all clients of an export, and a flush writes back all of it;
        # written through, consistency is the layer below's.
        return self.mode != "writethrough" or await next.can_multi_conn()

    async def can_zero(self, next: Next, h: Cache) -> ZeroMode:
        if self.mode == "writethrough" and await next.can_zero() is ZeroMode.NONE:
            return ZeroMode.EMULATE  # written through as zeroes, by this filter's pwrite
        return ZeroMode.NATIVE

    # --- data ----------------------------------------------------------------------------

    async def _reclaim(self, next: Next, h: Cache) -> None:
        if self.max_size is not None:
            await h.reclaim(next, self.high, self.low)

    async def pread(self, next: Next, h: Cache, count: int, offset: int, flags: int) -> bytes:
        first, stop = h.span(offset, count)
        if h.states.find(NOT_CACHED, first, stop) == -1:
            return h.read(offset, count)
        if self.cache_on_read():
            async with h.lock.hold(first, stop):
                await h.load(next, first, stop)
                data = h.read(offset, count)
            await self._reclaim(next, h)
            return data
        parts = []
        for cached, start, end in h.runs(offset, count, bytes((CLEAN, DIRTY))):
            if cached:
                parts.append(h.read(start, end - start))
            else:
                parts.append(await next.pread(end - start, start, flags))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def pwrite(self, next: Next, h: Cache, buf: bytes, offset: int, flags: int) -> None:
        await self._write(next, h, offset, len(buf), buf, flags)

    async def zero(self, next: Next, h: Cache, count: int, offset: int, flags: int) -> None:
        if flags & CmdFlag.FAST_ZERO:
            raise NBDError(errno.ENOTSUP, "cache: zeroing is not faster than writing here")
        await self._write(next, h, offset, count, None, flags)

    async def _write(
        self, next: Next, h: Cache, offset: int, count: int, data: bytes | None, flags: int
    ) -> None:
        """A write (``data``) or zeroing (``None``) in the cache, and through to the layer
        below in writethrough mode or with FUA."""
        if self.mode == "unsafe":
            flags &= ~CmdFlag.FUA
        through = self.mode == "writethrough" or flags & CmdFlag.FUA
        async with h.lock.hold(*h.span(offset, count)):
            if through:
                if data is None:
                    await next.zero(count, offset, flags)
                else:
                    await next.pwrite(data, offset, flags)
            else:
                for block in h.partial(offset, count):
                    if h.states[block] == NOT_CACHED:
                        await h.load(next, block, block + 1)
            h.put(offset, count, data, dirty=not through)
        await self._reclaim(next, h)

    async def flush(self, next: Next, h: Cache, flags: int) -> None:
        if self.mode == "unsafe":
            return
        await h.write_back(next)
        if await next.can_flush():
            await next.flush(flags)

    async def cache(self, next: Next, h: Cache, count: int, offset: int, flags: int) -> None:
        first, stop = h.span(offset, count)
        step = max(1, LOAD_BYTES // h.block_size)
        for chunk in range(first, stop, step):
            async with h.lock.hold(chunk, min(stop, chunk + step)):
                await h.load(next, chunk, min(stop, chunk + step))
            await self._reclaim(next, h)

    async def extents(
        self, next: Next, h: Cache, count: int, offset: int, flags: int
    ) -> list[Extent]:
        out: list[Extent] = []
        for dirty, start, end in h.runs(offset, count, bytes((DIRTY,))):
            if dirty:
                out.append(Extent(start, end - start, 0))
            else:
                below = await next.extents(end - start, start, flags)
                out += below
                if below[-1].offset + below[-1].length < end:
                    break  # the layer below answered for less; the client asks again
            if flags & CmdFlag.REQ_ONE:
                break
        return out


FILTER = CacheFilter
