"""null: a disk that reads as zeroes and throws writes away.

Every byte reads as zero and block status reports one big hole. Writes, trims and
zeroes succeed and change nothing. Useful as a sink (``nbdcopy SRC nbd://...``) and
for benchmarking the server itself.

Example:
  trionbd null 1G
"""

from __future__ import annotations

from typing import Any

from ..chain import Extent, Param, Plugin, Sparse, parse_size
from ..chain.types import FuaMode
from ..protocol.constants import UNALLOCATED


class NullPlugin(Plugin):
    """Reads zeroes, discards writes."""

    name = "null"
    process_safe = True
    params = (Param("size", "size of the disk, e.g. 1G, 512M, 2T", parse_size, default="0"),)
    magic_param = "size"
    nonblocking = True

    def __init__(self, size: int = 0):
        self.size = size

    async def get_size(self, h: Any) -> int:
        return self.size

    async def can_multi_conn(self, h: Any) -> bool:
        return True

    async def can_fua(self, h: Any) -> FuaMode:
        return FuaMode.NATIVE

    async def can_fast_zero(self, h: Any) -> bool:
        return True

    async def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        return Sparse(bytes(count), ((0, count),))

    async def pwrite(self, h: Any, buf: bytes, offset: int, flags: int) -> None:
        pass

    async def flush(self, h: Any, flags: int) -> None:
        pass

    async def trim(self, h: Any, count: int, offset: int, flags: int) -> None:
        pass

    async def zero(self, h: Any, count: int, offset: int, flags: int) -> None:
        pass

    async def extents(self, h: Any, count: int, offset: int, flags: int) -> list[Extent]:
        return [Extent(offset, count, UNALLOCATED)]


PLUGIN = NullPlugin
