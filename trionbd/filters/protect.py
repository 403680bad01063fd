"""protect: write-protect byte ranges of the layer below.

The export stays writable, but a write, trim or zero request that would change bytes in
a protected range fails with EPERM ("operation not permitted") and nothing of it is
written. A request that leaves the protected bytes as they are is allowed: a write
that writes there what is already there, a trim or zero of protected bytes that are
already zero. (To check, the filter reads the protected part of each such request from
the layer below first.) Reads are never affected.

Ranges are ``START-END``, both ends included, in bytes: decimal, octal with a leading
``0`` or hexadecimal with ``0x`` (no k/M/G suffixes, as in nbdkit). A missing START
means 0 and a missing END the end of the export: ``protect=-0x1ff``,
``protect=1048576-``. ``~START-END`` protects everything except that range. Give
``protect`` as often as needed; the protected bytes are those of all the ranges.

One use: keeping clients from writing a boot sector, a partition table or a header
that would make the data look like another format (a qcow2 header on a raw image).
To make the whole export read-only use the readonly filter or ``-r``; to serve only a
part of it, the offset or partition filter.

Examples (protect the boot code, leaving the MBR partition table writable; protect
everything but one partition):
  trionbd --filter=protect file disk.img protect=0-0x1bd
  trionbd --filter=protect file disk.img protect=~1048576-6442450943
"""

from __future__ import annotations

import errno
from typing import Any, NamedTuple

from ..chain import Filter, NBDError, Next, Param

END = (1 << 63) - 1
"""The last offset a range can name (nbdkit's INT64_MAX): "to the end"."""


class Range(NamedTuple):
    """Protected bytes ``start`` to ``end``, both included."""

    start: int
    end: int


def parse_offset(text: str) -> int:
    """An offset as nbdkit reads one: decimal, ``0x`` hexadecimal or ``0`` octal."""
    low = text.strip().lower()
    try:
        if "_" in low:
            raise ValueError
        if low.startswith("0x"):
            value = int(low[2:], 16)
        elif low.startswith("0") and len(low) > 1:
            value = int(low[1:], 8)
        else:
            value = int(low, 10)
    except ValueError:
        raise ValueError(
            f"{text!r} is not an offset (decimal, 0x hexadecimal or 0 octal)"
        ) from None
    if not 0 <= value <= END:
        raise ValueError(f"{text!r} is not an offset from 0 to {END}")
    return value


def parse_range(text: str) -> tuple[Range, ...]:
    """``START-END`` as one range, ``~START-END`` as the ranges around it."""
    complement = text.startswith("~")
    start_text, dash, end_text = text.removeprefix("~").partition("-")
    if not dash:
        raise ValueError(f"{text!r} is not a range START-END (a '-' is missing)")
    start = parse_offset(start_text) if start_text else 0
    end = parse_offset(end_text) if end_text else END
    if end < start:
        raise ValueError(f"{text!r} ends before it starts")
    if not complement:
        return (Range(start, end),)
    around = []
    if start > 0:
        around.append(Range(0, start - 1))
    if end < END:
        around.append(Range(end + 1, END))
    return tuple(around)


def merge(ranges: list[Range]) -> list[Range]:
    """Sorted, with overlapping and adjacent ranges joined."""
    out: list[Range] = []
    for r in sorted(ranges):
        if out and r.start <= out[-1].end + 1:
            out[-1] = Range(out[-1].start, max(out[-1].end, r.end))
        else:
            out.append(r)
    return out


class ProtectFilter(Filter):
    """Refuses writes that would change protected bytes."""

    name = "protect"
    process_safe = True
    params = (
        Param(
            "protect",
            "protect bytes START to END, both included; ~START-END: all but those",
            parse_range,
            repeat=True,
            metavar="[~]START-END",
        ),
    )

    def __init__(self, protect: list[tuple[Range, ...]] | None = None):
        self.ranges = merge([r for given in protect or [] for r in given])

    async def _check(self, next: Next, offset: int, count: int, buf: bytes | None) -> None:
        """EPERM unless the request leaves every protected byte as it is (``buf`` is
        what it writes; ``None`` for zeroes)."""
        stop = offset + count
        for r in self.ranges:
            start, end = max(r.start, offset), min(r.end + 1, stop)
            if start >= end:
                continue
            now = await next.pread(end - start, start)
            wanted = bytes(end - start) if buf is None else buf[start - offset : end - offset]
            if now != wanted:
                raise NBDError(
                    errno.EPERM,
                    f"protect: refused a change of protected bytes {r.start}-{r.end}",
                )

    async def pwrite(self, next: Next, h: Any, buf: bytes, offset: int, flags: int) -> None:
        await self._check(next, offset, len(buf), buf)
        await next.pwrite(buf, offset, flags)

    async def trim(self, next: Next, h: Any, count: int, offset: int, flags: int) -> None:
        await self._check(next, offset, count, None)
        await next.trim(count, offset, flags)

    async def zero(self, next: Next, h: Any, count: int, offset: int, flags: int) -> None:
        await self._check(next, offset, count, None)
        await next.zero(count, offset, flags)


FILTER = ProtectFilter
