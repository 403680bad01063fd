"""fua: change how Forced Unit Access (FUA) and flush are handled.

A write, trim or zero request with the FUA flag must be on stable storage when its
reply is sent; a flush makes everything written before it stable. ``fuamode`` chooses
what this filter makes of them:

* ``none`` (the default): FUA is not advertised; clients send flushes instead (flush
  is advertised if the layer below can flush).
* ``emulate``: FUA is advertised and done here as the request without the flag followed
  by a flush of the layer below, however the layer below would handle FUA. Needs a
  layer below that can flush.
* ``native``: FUA is advertised as native and the flag is passed down (where a layer
  below emulates it, it is still emulated there). Needs a layer below that offers FUA.
* ``force``: every write, trim and zero is sent down with FUA, whether the client asked
  for it or not (write-through); flushes then succeed at once, as there is nothing left
  to flush. Needs a layer below that offers FUA.
* ``pass``: FUA and flush pass through unchanged (the filter does nothing).
* ``discard``: FUA flags are dropped and flushes succeed at once without reaching the
  layer below. Fast, and **unsafe**: a crash loses what clients believed stable. Only
  for data that can be recreated (caches, build trees, tests).

A requirement the layer below does not meet refuses clients when they open the export,
with an error naming it. On a read-only export the filter changes nothing. FUA on one
connection is only promised to be visible on others when multi-conn is advertised; see
the multi-conn filter.

Examples:
  trionbd --filter=fua file disk.img                  # clients must flush
  trionbd --filter=fua file disk.img fuamode=force    # write-through
  trionbd --filter=fua file scratch.img fuamode=discard
"""

from __future__ import annotations

import errno
from typing import Any

import trio

from ..chain import Filter, FuaMode, Layer, NBDError, Next, Param, parse_choice
from ..protocol.constants import CmdFlag

FUAMODES = ("none", "emulate", "native", "force", "pass", "discard")


class FuaFilter(Filter):
    """Advertises, emulates, forces or drops FUA and flush as configured."""

    name = "fua"
    process_safe = True
    params = (
        Param(
            "fuamode",
            "none: FUA not advertised; emulate: FUA as a flush after the request; native: FUA "
            "passed down; force: FUA on every write, flush does nothing; pass: unchanged; "
            "discard: FUA and flush dropped (unsafe)",
            parse_choice(*FUAMODES),
            default="none",
        ),
    )

    def __init__(self, fuamode: str = "none"):
        self.mode = fuamode

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, Any]:
        next = await below.open(readonly, export_name, is_tls)
        try:
            if await next.can_write():
                await self._check(next)
        except BaseException:
            with trio.CancelScope(shield=True):
                await next.close()
            raise
        return next, None

    async def _check(self, next: Next) -> None:
        """Refuse the open if the layer below cannot do what this mode needs."""
        below = next.name
        if self.mode == "emulate" and not await next.can_flush():
            raise NBDError(errno.EINVAL, f"fua: fuamode=emulate needs flush, which {below} lacks")
        if self.mode in ("native", "force") and await next.can_fua() is FuaMode.NONE:
            raise NBDError(errno.EINVAL, f"fua: fuamode={self.mode} needs FUA, which {below} lacks")

    async def can_flush(self, next: Next, h: Any) -> bool:
        if self.mode in ("force", "discard"):
            return True  # flush does nothing here, whatever the layer below can do
        return await next.can_flush()

    async def can_fua(self, next: Next, h: Any) -> FuaMode:
        if self.mode == "none":
            return FuaMode.NONE
        if self.mode == "emulate":
            return FuaMode.EMULATE  # the server then sends FUA requests as request + flush
        if self.mode == "pass":
            return await next.can_fua()
        return FuaMode.NATIVE

    def _flags(self, flags: int) -> int:
        if self.mode == "force":
            return flags | CmdFlag.FUA
        if self.mode == "discard":
            return flags & ~CmdFlag.FUA
        return flags

    async def pwrite(self, next: Next, h: Any, buf: bytes, offset: int, flags: int) -> None:
        await next.pwrite(buf, offset, self._flags(flags))

    async def trim(self, next: Next, h: Any, count: int, offset: int, flags: int) -> None:
        await next.trim(count, offset, self._flags(flags))

    async def zero(self, next: Next, h: Any, count: int, offset: int, flags: int) -> None:
        await next.zero(count, offset, self._flags(flags))

    async def flush(self, next: Next, h: Any, flags: int) -> None:
        if self.mode not in ("force", "discard"):
            await next.flush(flags)


FILTER = FuaFilter
