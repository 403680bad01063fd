"""truncate: change the size of the export: cut it short, extend it, or round it.

The export's size is the layer below's, changed by the parameters in this order:
``truncate=SIZE`` sets it, ``round-up=N`` rounds it up to a multiple of N, and
``round-down=N`` rounds it down to one (N a power of two). Each client gets the size
worked out from the layer below's size when it opened the export.

* Smaller than the layer below: the bytes beyond the new end cannot be reached.
* Larger: the bytes past the layer below's end read as zeroes and block status reports
  them as a hole. Writes there are accepted only if they write zeroes (anything else
  fails with ENOSPC, and nothing of that request is written); zeroing and trimming
  there succeed and change nothing. Fast zeroing is advertised, since zeroing past the
  end costs nothing (a fast zero request that reaches the layer below still fails if
  that layer cannot zero fast).

A common use: clients that need a size that is a multiple of 512 bytes
(``round-up=512``), or a layer that only works in whole blocks in front of this one
(``--filter=blocksize --filter=truncate ... round-up=4K``).

Examples:
  trionbd --filter=truncate file disk.img round-up=512
  trionbd --filter=truncate file disk.img truncate=10G
"""

from __future__ import annotations

import errno
from typing import NamedTuple

import trio

from ..chain import Extent, Filter, Layer, NBDError, Next, Param, parse_size
from ..chain.params import MAX_SIZE
from ..protocol.constants import UNALLOCATED


def parse_power_of_two(text: str) -> int:
    value = parse_size(text)
    if value == 0 or value & (value - 1) or value > 0xFFFFFFFF:
        raise ValueError(f"{text!r} is not a power of two from 1 to 2G")
    return value


class Sizes(NamedTuple):
    """One connection's sizes, fixed when it opened the export."""

    real: int
    """The layer below's size."""
    size: int
    """The size clients see."""


class TruncateFilter(Filter):
    """Serves the layer below at another size."""

    name = "truncate"
    process_safe = True
    params = (
        Param("truncate", "the new size (smaller or larger than the layer below)", parse_size),
        Param(
            "round-up",
            "round the size up to a multiple of N, a power of two",
            parse_power_of_two,
            metavar="N",
        ),
        Param(
            "round-down",
            "round the size down to a multiple of N, a power of two",
            parse_power_of_two,
            metavar="N",
        ),
    )

    def __init__(
        self,
        truncate: int | None = None,
        round_up: int | None = None,
        round_down: int | None = None,
    ):
        self.truncate = truncate
        self.round_up = round_up
        self.round_down = round_down

    def new_size(self, real: int) -> int:
        """The size clients see when the layer below has ``real`` bytes."""
        size = real if self.truncate is None else self.truncate
        if self.round_up is not None:
            size = -(-size // self.round_up) * self.round_up
            if size > MAX_SIZE:
                raise NBDError(
                    errno.EIO,
                    f"truncate: cannot round {real} bytes up to a multiple of {self.round_up}",
                )
        if self.round_down is not None:
            size -= size % self.round_down
        return size

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, Sizes]:
        next = await below.open(readonly, export_name, is_tls)
        try:
            real = await next.get_size()
            return next, Sizes(real, self.new_size(real))
        except BaseException:
            with trio.CancelScope(shield=True):
                await next.close()
            raise

    async def get_size(self, next: Next, h: Sizes) -> int:
        return h.size

    async def can_fast_zero(self, next: Next, h: Sizes) -> bool:
        return True

    async def can_extents(self, next: Next, h: Sizes) -> bool:
        return True  # the tail is reported as a hole even if the layer below cannot say

    async def pread(self, next: Next, h: Sizes, count: int, offset: int, flags: int) -> bytes:
        inside = max(0, min(count, h.real - offset))
        if inside == count:
            return await next.pread(count, offset, flags)
        head = await next.pread(inside, offset, flags) if inside else b""
        return head + bytes(count - inside)

    async def pwrite(self, next: Next, h: Sizes, buf: bytes, offset: int, flags: int) -> None:
        inside = max(0, min(len(buf), h.real - offset))
        beyond = bytes(buf[inside:])
        if beyond.count(0) != len(beyond):
            raise NBDError(
                errno.ENOSPC,
                f"truncate: write of non-zero bytes beyond the end of {next.name} ({h.real} bytes)",
            )
        if inside:
            await next.pwrite(buf if inside == len(buf) else buf[:inside], offset, flags)

    async def trim(self, next: Next, h: Sizes, count: int, offset: int, flags: int) -> None:
        inside = max(0, min(count, h.real - offset))
        if inside:
            await next.trim(inside, offset, flags)

    async def zero(self, next: Next, h: Sizes, count: int, offset: int, flags: int) -> None:
        inside = max(0, min(count, h.real - offset))
        if inside:
            await next.zero(inside, offset, flags)

    async def cache(self, next: Next, h: Sizes, count: int, offset: int, flags: int) -> None:
        inside = max(0, min(count, h.real - offset))
        if inside:
            await next.cache(inside, offset, flags)

    async def extents(
        self, next: Next, h: Sizes, count: int, offset: int, flags: int
    ) -> list[Extent]:
        inside = max(0, min(count, h.real - offset))
        if not inside:
            return [Extent(offset, count, UNALLOCATED)]
        return await next.extents(inside, offset, flags)


FILTER = TruncateFilter
