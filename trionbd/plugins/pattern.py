"""pattern: a read-only disk where every 8-byte word holds its own offset.

The 8 bytes at offset N (N a multiple of 8) are N as a big-endian 64-bit number, the
same pattern as nbdkit's pattern plugin, so corruption or misplaced data is easy to
spot (``hexdump``, tests). Nothing is stored; any size is fine.

Example:
  trionbd pattern 1G
"""

from __future__ import annotations

import array
import sys
from typing import Any

from ..chain import Param, Plugin, parse_size


def pattern_bytes(count: int, offset: int) -> bytes:
    """The pattern's bytes for the range [offset, offset + count)."""
    first = offset - offset % 8
    last = offset + count
    words = array.array("Q", range(first, last + 7 - (last + 7) % 8, 8))
    if sys.byteorder == "little":
        words.byteswap()
    start = offset - first
    return words.tobytes()[start : start + count]


class PatternPlugin(Plugin):
    """Each 8-byte word holds its own offset (big-endian)."""

    name = "pattern"
    process_safe = True
    params = (Param("size", "size of the disk, e.g. 1G, 512M, 2T", parse_size, required=True),)
    magic_param = "size"
    nonblocking = True

    def __init__(self, size: int):
        self.size = size

    async def get_size(self, h: Any) -> int:
        return self.size

    async def can_multi_conn(self, h: Any) -> bool:
        return True

    async def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        return pattern_bytes(count, offset)


PLUGIN = PatternPlugin
