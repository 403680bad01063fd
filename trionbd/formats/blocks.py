"""Output made of blocks decompressed one at a time (xz blocks, zstd frames, the
intervals between deflate checkpoints): find the blocks a read covers, decompress each
once, and keep them: the most recent ones in memory (:class:`BlockCache`, one reader's),
or every one made so far in a file (:class:`FileCache`, shared by all readers)."""

from __future__ import annotations

import logging
import os
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from functools import partial
from typing import IO, Any

from . import Offload, run_inline

log = logging.getLogger(__name__)

LockFactory = Callable[[], AbstractAsyncContextManager[Any]]
"""Makes a lock (``trio.Lock``): readers that run in several tasks at once pass one, so
that concurrent reads of a block not yet cached wait for one decompression of it. The
default, ``contextlib.nullcontext``, does not wait: each reader decompresses for itself."""


class _Loading:
    """A block being decompressed: the lock its readers queue on, how many do, and the
    data once the first of them has made it."""

    __slots__ = ("data", "lock", "readers")

    def __init__(self, lock: AbstractAsyncContextManager[Any]) -> None:
        self.lock = lock
        self.readers = 0
        self.data: bytes | None = None


class _Once:
    """Blocks being decompressed, by index: of the tasks asking for one at the same time
    the first makes it, and the others wait for it (with real locks, see
    :data:`LockFactory`)."""

    def __init__(self, lock: LockFactory) -> None:
        self._new_lock = lock
        self._loading: dict[int, _Loading] = {}

    async def get(self, i: int, make: Callable[[], Awaitable[bytes]]) -> bytes:
        """Block ``i``: ``await make()``, or what a task asking at the same time made."""
        loading = self._loading.get(i)
        if loading is None:
            loading = self._loading[i] = _Loading(self._new_lock())
        loading.readers += 1
        try:
            async with loading.lock:
                if loading.data is None:  # not made by a reader before us
                    loading.data = await make()
                return loading.data
        finally:
            loading.readers -= 1
            if not loading.readers:
                del self._loading[i]


class BlockCache:
    """Serves reads of the concatenated output of blocks ``i`` (``sizes[i]`` bytes at
    output offset ``starts[i]``, sorted) that ``load(i)`` decompresses; keeps the
    ``depth`` most recently used blocks. A block wanted by several tasks at once is
    decompressed once when ``lock`` makes real locks (see :data:`LockFactory`)."""

    def __init__(
        self,
        starts: Sequence[int],
        sizes: Sequence[int],
        load: Callable[[int], Awaitable[bytes]],
        depth: int,
        *,
        lock: LockFactory = nullcontext,
    ) -> None:
        if depth < 1:
            raise ValueError(f"the block cache depth must be at least 1, not {depth}")
        self._starts = starts
        self._sizes = sizes
        self._load = load
        self._depth = depth
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._once = _Once(lock)
        self.size = starts[-1] + sizes[-1] if starts else 0

    async def _block(self, i: int) -> bytes:
        data = self._cache.get(i)
        if data is not None:
            self._cache.move_to_end(i)
            return data

        async def make() -> bytes:
            data = self._cache[i] = await self._load(i)
            while len(self._cache) > self._depth:
                self._cache.popitem(last=False)
            return data

        return await self._once.get(i, make)

    async def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``, clipped to the total size."""
        if offset < 0 or length < 0:
            raise ValueError(f"negative range: offset {offset}, length {length}")
        end = min(offset + length, self.size)
        parts = []
        i = bisect_right(self._starts, offset) - 1
        while offset < end:
            start = self._starts[i]
            stop = min(end, start + self._sizes[i])
            if stop > offset:
                data = await self._block(i)
                parts.append(data[offset - start : stop - start])
                offset = stop
            i += 1
        return b"".join(parts)


Load = Callable[[int], Awaitable[bytes]]
"""``await load(i)``: block ``i`` decompressed (one reader's, through its own input)."""


class BlockFile:
    """A file holding decompressed output at its own offsets (an unlinked temporary file:
    sparse, only what was written takes room). Writes may fail (a full disk): the first
    failure is logged and kept in :attr:`error`, and what could not be written is simply
    not in the file."""

    def __init__(self, file: IO[bytes], what: str) -> None:
        self.file = file
        self.what = what
        self.error: OSError | None = None

    def write(self, offset: int, data: bytes | memoryview) -> bool:
        """Write ``data`` at ``offset``; False if it could not be written."""
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self.file.fileno(), view, offset)
                view, offset = view[n:], offset + n
        except OSError as e:
            if self.error is None:
                self.error = e
                log.warning("%s: cannot keep decompressed data in %s: %s", self.what,
                            self.file.name, e)  # fmt: skip
            return False
        return True

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.file.fileno(), length, offset)

    def close(self) -> None:
        self.file.close()


class FileCache:
    """Serves reads of the concatenated output of blocks ``i`` (``sizes[i]`` bytes at
    output offset ``starts[i]``, sorted) for every reader of one input, keeping each
    block decompressed in ``file`` once it has been: a read of blocks in the file is one
    ``pread``; a block not there yet is decompressed by the reader's ``load`` (in the
    ``offload``), written to the file, and served. A block wanted by several readers at
    once is decompressed once when ``lock`` makes real locks (see :data:`LockFactory`).
    ``filled``: the file holds every block already. The file grows to at most the total
    size."""

    def __init__(
        self,
        starts: Sequence[int],
        sizes: Sequence[int],
        file: BlockFile,
        *,
        filled: bool = False,
        lock: LockFactory = nullcontext,
        offload: Offload | None = None,
    ) -> None:
        self._starts = starts
        self._sizes = sizes
        self.file = file
        self.filled = bytearray(b"\1" if filled else b"\0") * len(starts)
        """Which blocks are in the file."""
        self._run = offload or run_inline
        self._once = _Once(lock)
        self.size = starts[-1] + sizes[-1] if starts else 0

    async def _fill(self, i: int, load: Load) -> bytes:
        """Block ``i``, decompressed by ``load`` (or by another reader that was at it)
        and written to the file."""

        async def make() -> bytes:
            data = await load(i)
            if await self._run(partial(self.file.write, self._starts[i], data)):
                self.filled[i] = 1
            return data

        return await self._once.get(i, make)

    def _blocks(self, offset: int, end: int) -> range:
        first = bisect_right(self._starts, offset) - 1
        return range(first, bisect_right(self._starts, end - 1) if end > offset else first)

    async def read(self, offset: int, length: int, load: Load) -> bytes:
        """``length`` bytes at ``offset``, clipped to the total size; ``load`` decompresses
        the blocks not in the file yet."""
        if offset < 0 or length < 0:
            raise ValueError(f"negative range: offset {offset}, length {length}")
        end = min(offset + length, self.size)
        fresh: dict[int, bytes] = {}
        for i in self._blocks(offset, end):
            if not self.filled[i]:
                fresh[i] = await self._fill(i, load)
        if not fresh:
            return self.file.read(offset, max(0, end - offset))
        parts = []
        pos = run = offset  # run: where the bytes to read from the file start
        for i in self._blocks(offset, end):
            start = self._starts[i]
            stop = min(end, start + self._sizes[i])
            data = fresh.get(i)
            if data is not None:
                if run < pos:
                    parts.append(self.file.read(run, pos - run))
                parts.append(data[pos - start : stop - start])
                run = stop
            pos = stop
        if run < pos:
            parts.append(self.file.read(run, pos - run))
        return b"".join(parts)
