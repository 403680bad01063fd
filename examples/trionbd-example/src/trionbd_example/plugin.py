"""mem-example: a RAM disk (the example plugin of trionbd's docs/plugins.md).

Example:
  trionbd mem-example 64M
"""

from typing import Any

import trionbd


class MemExample(trionbd.Plugin):
    name = "mem-example"
    params = (trionbd.Param("size", "size of the disk (64M)", trionbd.parse_size, required=True),)
    magic_param = "size"
    nonblocking = True  # memory never waits: requests are served without a task each

    def __init__(self, size: int) -> None:
        self.disk = bytearray(size)

    async def get_size(self, h: Any) -> int:
        return len(self.disk)

    async def pread(self, h: Any, count: int, offset: int, flags: int) -> bytes:
        return bytes(self.disk[offset : offset + count])

    async def pwrite(self, h: Any, buf: bytes, offset: int, flags: int) -> None:
        self.disk[offset : offset + len(buf)] = buf

    async def can_multi_conn(self, h: Any) -> bool:
        return True  # every connection sees the same bytearray
