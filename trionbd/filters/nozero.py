"""nozero: switch off or change efficient zeroing, to test clients and compare timings.

``zeromode`` chooses what clients are offered:

* ``none`` (the default): zeroing is not advertised; clients write zeroes themselves
  like any other data.
* ``emulate``: zeroing is advertised, but every zero request is carried out here as
  writes of zeroes to the layer below, however efficiently the layer below could zero.
* ``notrim``: zero requests go to the layer below with ``NO_HOLE`` set, so the zeroed
  range stays allocated instead of being punched out.
* ``plugin``: zero requests go to the layer below unchanged (useful with
  ``fastzeromode``).

``notrim`` and ``plugin`` need a layer below that can zero; a client of an export that
cannot is refused when it opens it (with an error saying so).

``fastzeromode`` chooses what happens to fast zero requests (``FAST_ZERO``: "zero only
if that is faster than writing zeroes, else fail at once with ENOTSUP"):

* ``default``: with ``zeromode=emulate``, fast zeroing is advertised and every fast
  zero request fails at once; with ``notrim`` or ``plugin``, the layer below decides.
* ``none``: fast zeroing is not advertised.
* ``slow``: fast zeroing is advertised and every fast zero request fails at once with
  ENOTSUP (the client then writes zeroes itself).
* ``ignore``: fast zeroing is advertised and fast zero requests are done as ordinary
  zero requests. This breaks the promise of the flag; only for comparisons. With
  ``zeromode=emulate`` fast zero requests still fail, since writing zeroes is not fast.

With ``zeromode=none`` fast zeroing is never advertised. On a read-only export the
filter changes nothing.

Examples:
  trionbd --filter=nozero file disk.img
  trionbd --filter=nozero file disk.img zeromode=emulate
  trionbd --filter=nozero file disk.img zeromode=plugin fastzeromode=none
"""

from __future__ import annotations

import errno
from typing import Any

import trio

from ..chain import Filter, Layer, NBDError, Next, Param, ZeroMode, parse_choice
from ..protocol.constants import CmdFlag

ZEROMODES = ("none", "emulate", "notrim", "plugin")
FASTZEROMODES = ("default", "none", "slow", "ignore")


class NoZeroFilter(Filter):
    """Changes how zeroing and fast zeroing are advertised and done."""

    name = "nozero"
    process_safe = True
    params = (
        Param(
            "zeromode",
            "none: zeroing not advertised; emulate: done here as writes of zeroes; notrim: "
            "passed down with NO_HOLE; plugin: passed down unchanged",
            parse_choice(*ZEROMODES),
            default="none",
        ),
        Param(
            "fastzeromode",
            "default: as the zero mode implies; none: fast zero not advertised; slow: fast "
            "zero requests fail with ENOTSUP; ignore: they are done as plain zeroing",
            parse_choice(*FASTZEROMODES),
            default="default",
        ),
    )

    def __init__(self, zeromode: str = "none", fastzeromode: str = "default"):
        self.zeromode = zeromode
        self.fastzeromode = fastzeromode

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, Any]:
        next = await below.open(readonly, export_name, is_tls)
        passes = self.zeromode in ("notrim", "plugin")
        if passes and await next.can_write() and await next.can_zero() is ZeroMode.NONE:
            with trio.CancelScope(shield=True):
                await next.close()
            raise NBDError(
                errno.EINVAL,
                f"nozero: zeromode={self.zeromode} needs a layer below that can zero, and "
                f"{next.name} cannot",
            )
        return next, None

    async def can_zero(self, next: Next, h: Any) -> ZeroMode:
        if self.zeromode == "none":
            return ZeroMode.NONE
        if self.zeromode == "emulate":
            return ZeroMode.EMULATE
        return await next.can_zero()

    async def can_fast_zero(self, next: Next, h: Any) -> bool:
        if self.zeromode == "none":
            return False
        if self.fastzeromode == "default" and self.zeromode != "emulate":
            return await next.can_fast_zero()
        return self.fastzeromode != "none"

    async def zero(self, next: Next, h: Any, count: int, offset: int, flags: int) -> None:
        # Only reached with zeromode=notrim or plugin: other modes never zero here.
        if flags & CmdFlag.FAST_ZERO:
            if self.fastzeromode == "slow":
                raise NBDError(errno.ENOTSUP, "nozero: fast zeroing refused (fastzeromode=slow)")
            if self.fastzeromode == "ignore":
                flags &= ~CmdFlag.FAST_ZERO
        if self.zeromode == "notrim":
            flags |= CmdFlag.NO_HOLE
        await next.zero(count, offset, flags)


FILTER = NoZeroFilter
