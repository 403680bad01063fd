"""xor-example: XOR every byte with a key (the example filter of trionbd's docs/plugins.md).

The layer below stores the data XORed with the key; clients see it plain. Zeroing is
emulated by writing zeroes through the filter, and extents never promise zeroes (a hole
below reads as the key here).

Example:
  trionbd --filter=xor-example file disk.img xor-key=0xff
"""

from typing import Any

import trionbd
from trionbd import Next


class XorExample(trionbd.Filter):
    name = "xor-example"
    params = (trionbd.Param("xor-key", "the key, a byte", trionbd.parse_int, default="0x5a"),)

    def __init__(self, xor_key: int = 0x5A) -> None:
        if not 0 <= xor_key <= 255:
            raise trionbd.ConfigError(f"xor-example: xor-key={xor_key} is not a byte")
        self.table = bytes(b ^ xor_key for b in range(256))

    async def pread(self, next: Next, h: Any, count: int, offset: int, flags: int) -> bytes:
        return (await next.pread(count, offset, flags)).translate(self.table)

    async def pwrite(self, next: Next, h: Any, buf: bytes, offset: int, flags: int) -> None:
        await next.pwrite(bytes(buf).translate(self.table), offset, flags)

    async def can_zero(self, next: Next, h: Any) -> trionbd.ZeroMode:
        return trionbd.ZeroMode.EMULATE  # zeroes are written through pwrite, XORed

    async def extents(
        self, next: Next, h: Any, count: int, offset: int, flags: int
    ) -> list[trionbd.Extent]:
        below = await next.extents(count, offset, flags)
        return [e._replace(flags=e.flags & ~trionbd.State.ZERO) for e in below]
