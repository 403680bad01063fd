"""delay: delay requests, to simulate a slow or distant disk.

Each request waits the configured time before it goes to the layer below. The wait
holds up only that request: others of the same connection run meanwhile, so N
pipelined reads with a 100 ms delay take about 100 ms, not N times as long.

Delays are seconds (``2``, ``0.5``) or milliseconds with an ``ms`` suffix
(``100ms``); nbdkit accepts whole numbers only, trionbd also decimals.

Example:
  trionbd --filter=delay file disk.img rdelay=100ms wdelay=100ms
  trionbd --filter=delay file disk.img delay-zero=1
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterable
from typing import Any

import trio

from ..chain import ConfigError, Extent, Filter, Layer, NBDError, Next, Param, parse_bool
from ..protocol.constants import CmdFlag

_DELAY = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms)?\s*$")


def parse_delay(text: str) -> float:
    """``2``, ``0.5`` (seconds) or ``100ms`` as seconds."""
    m = _DELAY.match(text)
    if m is None:
        raise ValueError(
            f"{text!r} is not a delay (seconds like 2 or 0.5, or milliseconds like 100ms)"
        )
    return float(m.group(1)) / (1000 if m.group(2) else 1)


class DelayFilter(Filter):
    """Waits before passing each request on."""

    name = "delay"
    process_safe = True
    nonblocking = False  # requests wait: the server must give each its own task
    params = (
        Param("rdelay", "delay reads", parse_delay),
        Param("delay-read", "delay reads (another name for rdelay; give one)", parse_delay),
        Param("wdelay", "delay writes, zeroing and trims", parse_delay),
        Param("delay-write", "delay writes (wins over wdelay)", parse_delay),
        Param("delay-zero", "delay zeroing (wins over wdelay)", parse_delay),
        Param("delay-trim", "delay trims (wins over wdelay)", parse_delay),
        Param("delay-extents", "delay block status requests", parse_delay),
        Param("delay-cache", "delay cache requests", parse_delay),
        Param("delay-flush", "delay flushes (a trionbd extension)", parse_delay),
        Param("delay-open", "delay opening the export for each client", parse_delay),
        Param(
            "delay-fast-zero",
            "true: fast zero requests wait like other zeroing; false: with a zero delay set, "
            "they fail at once with ENOTSUP (the client then writes zeroes itself), and fast "
            "zeroing is advertised",
            parse_bool,
            default="true",
        ),
    )

    def __init__(
        self,
        rdelay: float | None = None,
        delay_read: float | None = None,
        wdelay: float = 0.0,
        delay_write: float | None = None,
        delay_zero: float | None = None,
        delay_trim: float | None = None,
        delay_extents: float = 0.0,
        delay_cache: float = 0.0,
        delay_flush: float = 0.0,
        delay_open: float = 0.0,
        delay_fast_zero: bool = True,
    ):
        if rdelay is not None and delay_read is not None:
            raise ConfigError("delay: rdelay and delay-read are the same setting; give one")
        self.read_delay = rdelay if rdelay is not None else (delay_read or 0.0)
        self.write_delay = wdelay if delay_write is None else delay_write
        self.zero_delay = wdelay if delay_zero is None else delay_zero
        self.trim_delay = wdelay if delay_trim is None else delay_trim
        self.extents_delay = delay_extents
        self.cache_delay = delay_cache
        self.flush_delay = delay_flush
        self.open_delay = delay_open
        self.fast_zero = delay_fast_zero

    async def open(
        self, below: Layer, readonly: bool, export_name: str, is_tls: bool
    ) -> tuple[Next, Any]:
        await trio.sleep(self.open_delay)
        return await below.open(readonly, export_name, is_tls), None

    async def can_fast_zero(self, next: Next, h: Any) -> bool:
        if self.zero_delay and not self.fast_zero:
            return True  # fast zero requests are answered here, at once
        return await next.can_fast_zero()

    async def pread(self, next: Next, h: Any, count: int, offset: int, flags: int) -> bytes:
        await trio.sleep(self.read_delay)
        return await next.pread(count, offset, flags)

    async def pwrite(self, next: Next, h: Any, buf: bytes, offset: int, flags: int) -> None:
        await trio.sleep(self.write_delay)
        await next.pwrite(buf, offset, flags)

    async def flush(self, next: Next, h: Any, flags: int) -> None:
        await trio.sleep(self.flush_delay)
        await next.flush(flags)

    async def trim(self, next: Next, h: Any, count: int, offset: int, flags: int) -> None:
        await trio.sleep(self.trim_delay)
        await next.trim(count, offset, flags)

    async def zero(self, next: Next, h: Any, count: int, offset: int, flags: int) -> None:
        if flags & CmdFlag.FAST_ZERO and self.zero_delay and not self.fast_zero:
            raise NBDError(errno.ENOTSUP, "delay: fast zeroing is refused (delay-fast-zero=false)")
        await trio.sleep(self.zero_delay)
        await next.zero(count, offset, flags)

    async def extents(
        self, next: Next, h: Any, count: int, offset: int, flags: int
    ) -> Iterable[Extent]:
        await trio.sleep(self.extents_delay)
        return await next.extents(count, offset, flags)

    async def cache(self, next: Next, h: Any, count: int, offset: int, flags: int) -> None:
        await trio.sleep(self.cache_delay)
        await next.cache(count, offset, flags)


FILTER = DelayFilter
