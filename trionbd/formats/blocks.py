"""Output made of blocks decompressed one at a time (xz blocks, zstd frames): find the
blocks a read covers, decompress each once, and keep the most recent ones."""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence


class BlockCache:
    """Serves reads of the concatenated output of blocks ``i`` (``sizes[i]`` bytes at
    output offset ``starts[i]``, sorted) that ``load(i)`` decompresses; keeps the
    ``depth`` most recently used blocks."""

    def __init__(
        self,
        starts: Sequence[int],
        sizes: Sequence[int],
        load: Callable[[int], Awaitable[bytes]],
        depth: int,
    ) -> None:
        if depth < 1:
            raise ValueError(f"the block cache depth must be at least 1, not {depth}")
        self._starts = starts
        self._sizes = sizes
        self._load = load
        self._depth = depth
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self.size = starts[-1] + sizes[-1] if starts else 0

    async def _block(self, i: int) -> bytes:
        data = self._cache.get(i)
        if data is None:
            data = await self._load(i)
            self._cache[i] = data
            while len(self._cache) > self._depth:
                self._cache.popitem(last=False)
        self._cache.move_to_end(i)
        return data

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
