"""Output made of blocks decompressed one at a time (xz blocks, zstd frames, the
intervals between deflate checkpoints): find the blocks a read covers, decompress each
once, and keep the most recent ones."""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import Any

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
        self._new_lock = lock
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._loading: dict[int, _Loading] = {}
        self.size = starts[-1] + sizes[-1] if starts else 0

    async def _block(self, i: int) -> bytes:
        data = self._cache.get(i)
        if data is not None:
            self._cache.move_to_end(i)
            return data
        loading = self._loading.get(i)
        if loading is None:
            loading = self._loading[i] = _Loading(self._new_lock())
        loading.readers += 1
        try:
            async with loading.lock:
                if loading.data is None:  # not made by a reader before us
                    loading.data = await self._load(i)
                    self._cache[i] = loading.data
                    while len(self._cache) > self._depth:
                        self._cache.popitem(last=False)
                return loading.data
        finally:
            loading.readers -= 1
            if not loading.readers:
                del self._loading[i]

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
